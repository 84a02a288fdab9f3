"""The multi-process proof, one harness for every shared store.

P worker processes x C coroutines x K customers call the emulator's REST API
through their own ``TokenManager`` on one shared store while the emulator
expires every session in waves; the harness records which customer got a new
session when, stops the workers once the last wave is absorbed, and checks
the invariants: never two refreshes of one customer for one expiry across the
processes, every customer refreshed after the last wave, every grant valid,
no reuse, no revocation, no failed call.

Size: ``SFRTR_PROOF_SIZE=issue`` runs the issue's 8 x 200 x 50 with 5 expiries
(``nox -s proof``); the default keeps CI's run short on two cores.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sfrtr import Status, TokenManager
from sfrtr.emulator import Emulator


@dataclass(frozen=True)
class ProofSize:
    processes: int
    coroutines: int
    customers: int
    expiries: int
    spacing: float

    @classmethod
    def from_env(cls, default: ProofSize) -> ProofSize:
        if os.environ.get("SFRTR_PROOF_SIZE") == "issue":
            return ISSUE_SIZE
        return default


ISSUE_SIZE = ProofSize(processes=8, coroutines=200, customers=50, expiries=5, spacing=3.0)
CI_SIZE = ProofSize(processes=6, coroutines=100, customers=30, expiries=4, spacing=2.5)


@dataclass
class ProofRun:
    size: ProofSize
    customers: list[str]
    results: list[dict[str, Any]]
    states: dict[str, Any]
    per_wave: list[Counter[str]]
    ledger: Any
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return sum(r["calls"] for r in self.results)

    @property
    def own_stalls(self) -> list[float]:
        return [round(r["max_own_stall"], 3) for r in self.results]

    @property
    def stalls(self) -> list[float]:
        return [r["max_stall"] for r in self.results]

    def summary(self, store: str) -> str:
        s = self.size
        return (f"{store}: {s.processes} processes x {s.coroutines} coroutines x "
                f"{s.customers} customers x {s.expiries} expiries: {self.calls} calls in "
                f"{self.seconds:.1f}s, redemptions {self.ledger['redemptions']}, per process "
                f"{[r['redemptions'] for r in self.results]}, new sessions per wave "
                f"{[sum(w.values()) for w in self.per_wave]}, max loop stall per process "
                f"{[round(x, 3) for x in self.stalls]}, its own share per process "
                f"{self.own_stalls}, stalls over 100 ms (s after READY, s, loop CPU in it, "
                f"waiting for a core in it) {[r['stalls'] for r in self.results if r['stalls']]}")

    def check(self, *, max_own_stall: float = 1.0, max_stall: float = 5.0) -> None:
        """The invariants, and the loop's responsiveness.

        A worker's loop must not be kept from its ready callbacks by anything of its
        own: callbacks running or a call blocking its thread (``max_own_stall``: a
        stall less the time the thread waited for a core). The goal is 100 ms, met in
        most runs (0.02-0.10 s; 0.22 s at a load of 16 on two cores), but one run at
        a load of 9 saw 0.75 s not yet explained, so the assertion holds the own share
        to the bound the wall-clock stall had before (1 s): a blocking call or a
        busy-wait of that size still breaks it at any load. How late the loop ran in
        wall time also counts the time the OS gave the cores to the other busy
        processes: ``max_stall`` only catches the pathological (the busy-wait that
        froze fleets for 40 s). Every figure is printed for the notes.
        """
        assert {c: (s.record.status.value, s.record.reason) for c, s in self.states.items()
                if s.record.status is not Status.VALID} == {}
        assert [r["failures"] for r in self.results if r["failures"]] == []
        # Never two refreshes of one customer for one expiry, across the processes...
        assert [c for w in self.per_wave for c, n in w.items() if n > 1] == []
        # ...every customer refreshed after the last one; a wave absorbed late (the
        # emulator answering after the next wave) serves both: at most one per wave.
        assert set(self.per_wave[-1]) == set(self.customers)
        assert self.ledger["redemptions"] <= len(self.customers) * self.size.expiries
        assert sum(r["redemptions"] for r in self.results) == self.ledger["redemptions"]
        assert self.ledger["reuse"] == 0
        assert self.ledger["revocations"] == 0
        assert self.ledger["concurrent_rejections"] == 0
        assert max(self.stalls) < max_stall
        assert max(r["max_own_stall"] for r in self.results) < max_own_stall
        assert self.calls > self.size.processes * self.size.coroutines


async def run_proof(emulator: Emulator, mine: TokenManager, customers: list[str],
                    size: ProofSize, start_worker: Callable[[int], Awaitable[Any]],
                    *, settle: float = 1.0) -> ProofRun:
    """Start ``size.processes`` workers (``start_worker(i)`` returns a tests.test_multiprocess
    Worker in storm mode, told ``--waves size.expiries``), expire every session
    ``size.expiries`` times, collect."""
    emulator.faults.set("token", latency=0.02, jitter=0.03)
    workers = [await start_worker(i) for i in range(size.processes)]
    try:
        for w in workers:
            await w.expect("READY")
        started = time.monotonic()
        await asyncio.sleep(settle)
        issued: list[tuple[float, str]] = []
        issue_access = emulator.world.issue_access

        def recorded(family: Any, now: float) -> Any:
            issued.append((time.monotonic(), family.org.name))
            return issue_access(family, now)

        emulator.world.issue_access = recorded  # type: ignore[method-assign]
        waves: list[float] = []
        for _ in range(size.expiries):
            waves.append(time.monotonic())
            emulator.expire_sessions()
            await asyncio.sleep(size.spacing)
        for _ in range(150):  # until the last wave is absorbed: every customer refreshed
            if {c for t, c in issued if t >= waves[-1]} == set(customers):
                break
            await asyncio.sleep(0.1)
        # The workers run until told to stop once every wave was absorbed: a fixed
        # duration let the last wave land as the first-started workers finished.
        for w in workers:
            w.signal(signal.SIGTERM)
        results = [await w.result(timeout=60) for w in workers]
        states = {c: await mine.store.read(c) for c in customers}
        seconds = time.monotonic() - started
    finally:
        for w in workers:
            await w.reap()
        await mine.aclose()
    per_wave = [Counter(c for t, c in issued if start <= t < end)
                for start, end in zip(waves, [*waves[1:], float("inf")], strict=True)]
    return ProofRun(size, customers, results, states, per_wave, emulator.ledger, seconds)
