"""The trace of one schedule: what each worker and model did, in virtual time.

Entries name tokens by fingerprint only. The formatted trace is what the
determinism check compares byte for byte, and what a failure prints, one
timeline per worker.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from .clock import WORKER, SimLoop


class Trace:
    def __init__(self, loop: SimLoop) -> None:
        self.loop = loop
        self.entries: list[tuple[float, str, str]] = []

    def add(self, worker: str | None, text: str) -> None:
        self.entries.append((self.loop.time(), worker or "-", text))

    def lines(self) -> list[str]:
        return [f"{t:10.4f} {w:>4} {text}" for t, w, text in self.entries]

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.lines()).encode()).hexdigest()

    def timeline(self, tail: int = 60) -> str:
        """One section per worker (``-`` is the models and the plan), last lines first cut."""
        out: list[str] = []
        for who in sorted({w for _, w, _ in self.entries}):
            mine = [(t, text) for t, w, text in self.entries if w == who]
            out.append(f"--- {who} ({len(mine)} entries"
                       + (f", last {tail} shown" if len(mine) > tail else "") + ")")
            out += [f"  {t:10.4f} {text}" for t, text in mine[-tail:]]
        return "\n".join(out)


class _ToTrace(logging.Handler):
    def __init__(self, trace: Trace) -> None:
        super().__init__(logging.INFO)
        self.trace = trace

    def emit(self, record: logging.LogRecord) -> None:
        self.trace.add(WORKER.get(), f"log {record.levelname.lower()}: {record.getMessage()}")


@contextmanager
def sfrtr_logs_into(trace: Trace) -> Iterator[None]:
    """sfrtr's own log lines (they carry fingerprints only) join the timeline."""
    logger = logging.getLogger("sfrtr")
    handler = _ToTrace(trace)
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
