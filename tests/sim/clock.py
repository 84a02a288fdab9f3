"""Virtual time: an asyncio loop that never sleeps, and per-worker clocks.

The loop's ``time()`` is virtual. When no callback is ready it jumps to the
next timer instead of waiting, so ten simulated minutes cost only the
callbacks they run. Every callback carries the ``contextvars.Context`` it was
scheduled in; :data:`WORKER` in that context says which simulated process
owns it, which is how a worker is *paused* (its callbacks are held back) or
*killed* (its callbacks are dropped, with no cleanup, like SIGKILL).

sfrtr reads ``time.monotonic()``/``time.time()`` directly. :func:`patched_time`
swaps the ``time`` module of every ``sfrtr`` module for :class:`FakeTime`,
whose clocks are the virtual time plus the current worker's offset and skew.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import sys
import time as real_time
import types
from collections.abc import Callable, Iterator
from typing import Any

WORKER: contextvars.ContextVar[str | None] = contextvars.ContextVar("sim_worker", default=None)
"""The simulated process a task belongs to (``None``: the models, the fault plan)."""

EPOCH = 1_750_000_000.0
"""Wall-clock time at virtual 0: any fixed value keeps runs byte-identical."""


class Spin(BaseException):
    """A worker kept running while virtual time stood still (a busy wait).

    A BaseException so that no ``except Exception`` in the code under test
    swallows it.
    """


class SimLoop(asyncio.BaseEventLoop):
    """A deterministic event loop over virtual time.

    Only ``_run_once`` differs from asyncio's: timers fire by jumping the
    clock, and ready callbacks of paused or killed workers are filtered out.
    """

    def __init__(self, spin_limit: int = 20_000) -> None:
        super().__init__()
        self._now = 0.0
        self.paused: dict[str, float] = {}
        """worker -> virtual time at which it resumes."""
        self.killed: set[str] = set()
        self._held: dict[str, list[asyncio.Handle]] = {}
        self.spin_limit = spin_limit
        self._instant = -1.0
        self._steps_at_instant: dict[str | None, int] = {}
        self.spin: str | None = None
        """Set to a description when a spin was detected; the runner stops."""
        self.steps = 0
        self.set_exception_handler(_quiet)

    # -- clock -----------------------------------------------------------------

    def time(self) -> float:
        return self._now

    # -- workers -----------------------------------------------------------------

    def pause(self, worker: str, until: float) -> None:
        self.paused[worker] = max(until, self.paused.get(worker, 0.0))
        # A wake-up timer in the plan's context, so the loop has a reason to
        # reach ``until`` even when everything else is held.
        self.call_at(until, self._resume_due, context=contextvars.Context())

    def kill(self, worker: str) -> None:
        self.killed.add(worker)
        self.paused.pop(worker, None)
        self._held.pop(worker, None)

    def _resume_due(self) -> None:
        for worker, until in list(self.paused.items()):
            if until <= self._now:
                del self.paused[worker]
                self._ready.extend(self._held.pop(worker, []))

    # -- the loop --------------------------------------------------------------------

    def _run_once(self) -> None:
        while self._scheduled and self._scheduled[0]._cancelled:
            self._timer_cancelled_count -= 1
            heapq.heappop(self._scheduled)._scheduled = False
        if not self._ready and self._scheduled and not self._stopping:
            when = self._scheduled[0]._when
            self._now = max(self._now, when)  # the jump: nothing ready, so no sleeping
        while self._scheduled and self._scheduled[0]._when <= self._now:
            handle = heapq.heappop(self._scheduled)
            handle._scheduled = False
            self._ready.append(handle)
        if self._now != self._instant:
            self._instant = self._now
            self._steps_at_instant.clear()
        for _ in range(len(self._ready)):
            handle = self._ready.popleft()
            if handle._cancelled:
                continue
            worker = handle._context.get(WORKER) if handle._context is not None else None
            if worker is not None:
                if worker in self.killed:
                    continue
                if worker in self.paused:
                    self._held.setdefault(worker, []).append(handle)
                    continue
                n = self._steps_at_instant.get(worker, 0) + 1
                self._steps_at_instant[worker] = n
                if n > self.spin_limit and self.spin is None:
                    self.spin = (f"worker {worker} ran {n} callbacks at t={self._now:.3f} "
                                 "without virtual time advancing")
                    self.stop()
            self.steps += 1
            handle._run()
        if not self._ready and not self._scheduled and not self._stopping:
            # Nothing can ever run again: every live task waits on something
            # only a held or dropped callback would deliver.
            self.stop()

    # asyncio.BaseEventLoop leaves these to subclasses; no I/O ever happens here.
    def _process_events(self, event_list: Any) -> None:
        return None

    def _write_to_self(self) -> None:
        return None

    def _asyncgen_finalizer_hook(self, agen: Any) -> None:
        # Generators of killed workers are collected after the run; their
        # cleanup would need a loop that is gone. Drop them silently.
        return None


def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Pending tasks of killed workers are destroyed by design: no noise."""
    return None


class FakeTime(types.ModuleType):
    """Stands in for the ``time`` module inside ``sfrtr``.

    ``monotonic()`` is virtual time plus a per-worker offset (monotonic
    clocks of two hosts share no origin); ``time()`` is the epoch plus
    virtual time plus the worker's skew. Both count their calls per virtual
    instant: a loop that polls the clock without ever yielding (no callback
    boundary for :class:`SimLoop` to see) is stopped with :class:`Spin`.
    """

    def __init__(self, loop: SimLoop, offsets: dict[str, float], skews: dict[str, float],
                 spin_limit: int = 50_000) -> None:
        super().__init__("time")
        self._loop = loop
        self._offsets = offsets
        self._skews = skews
        self._limit = spin_limit
        self._instant = -1.0
        self._calls = 0
        self.sleep = real_time.sleep
        self.perf_counter = real_time.perf_counter
        self.process_time = real_time.process_time

    def _tick(self) -> float:
        now = self._loop._now
        if now != self._instant:
            self._instant, self._calls = now, 0
        self._calls += 1
        if self._calls > self._limit:
            message = (f"worker {WORKER.get()} read the clock {self._calls} times at "
                       f"t={now:.3f} without yielding")
            if self._loop.spin is None:
                self._loop.spin = message
            self._loop.stop()
            raise Spin(message)
        return now

    def monotonic(self) -> float:
        now = self._tick()
        return now + self._offsets.get(WORKER.get() or "", 0.0)

    def time(self) -> float:
        now = self._tick()
        return EPOCH + now + self._skews.get(WORKER.get() or "", 0.0)


@contextlib.contextmanager
def patched_time(fake: FakeTime) -> Iterator[None]:
    """Point every imported ``sfrtr`` module's clock at ``fake``, then restore it."""
    saved: list[tuple[types.ModuleType, str, Any]] = []
    clocks: dict[Any, Callable[[], float]] = {real_time.monotonic: fake.monotonic,
                                              real_time.time: fake.time}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "sfrtr" or name.startswith("sfrtr.")):
            continue
        for attr, value in list(vars(module).items()):
            if value is real_time:
                saved.append((module, attr, value))
                setattr(module, attr, fake)
            elif callable(value) and any(value is c for c in clocks):
                # ``_monotonic = time.monotonic`` style module globals.
                saved.append((module, attr, value))
                setattr(module, attr, clocks[value])
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def in_worker(worker: str | None) -> contextvars.Context:
    """A fresh context owned by ``worker``: tasks created in it inherit the owner."""
    ctx = contextvars.Context()
    ctx.run(WORKER.set, worker)
    return ctx


__all__ = ["EPOCH", "WORKER", "FakeTime", "SimLoop", "Spin", "in_worker", "patched_time"]
