"""How long the event loop went without running a ready callback, at worst.

A frozen loop is a fleet-wide outage (keepalives stop, leases expire, other
workers' refreshes become orphans), so the multi-process tests, the fault
runs and ``sfrtr demo`` measure it. A ticker task sleeps ``interval`` seconds
and measures how late it wakes: anything that keeps the loop from running
ready callbacks (a busy loop that never awaits, blocking I/O, a long CPU
burst) delays the ticker by as much.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import NamedTuple


class Stall(NamedTuple):
    """One stall of at least the monitor's threshold (seconds)."""

    ended: float
    """``time.monotonic()`` when the ticker finally ran."""
    seconds: float
    """How late the ticker ran."""
    busy: float
    """CPU time the loop's thread spent in the window: callbacks running."""
    waited: float
    """Time the thread was ready to run but waited for a core (Linux's schedstat;
    0.0 where the kernel does not tell)."""

    @property
    def own(self) -> float:
        """The loop's own share: late, less the time the machine kept it from a core."""
        return max(0.0, self.seconds - self.waited)


def _schedstat_reader() -> Callable[[], float]:
    """Seconds this thread has spent waiting on a run queue, or 0.0 where unknown."""
    try:
        fd = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
    except OSError:
        return lambda: 0.0

    def read() -> float:
        try:
            return int(os.pread(fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    weakref.finalize(read, os.close, fd)
    return read


class LoopStallMonitor:
    """Measures :attr:`max_stall`, the longest the running loop was unresponsive.

    Use ``async with LoopStallMonitor() as m: ...`` or ``m.start()`` (inside
    the loop) and ``m.stop()``. Resolution is about ``interval`` plus the
    loop's own scheduling jitter; the cost is one wake-up per ``interval``.
    Stalls of at least ``threshold`` seconds are also kept in :attr:`stalls`
    (the most recent ``keep`` of them) as :class:`Stall` records, which tell the
    loop's own share of a stall (its thread running callbacks, or blocked in a
    call) from the machine's (the thread ready to run, waiting for a core that
    other processes held), so a test on a loaded machine can hold the loop's own
    share to a bound without measuring the machine.
    """

    def __init__(self, interval: float = 0.005, *, threshold: float = 0.1,
                 keep: int = 100) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self.threshold = threshold
        self.keep = keep
        self.max_stall = 0.0
        """Seconds: the longest the loop went without running the ticker when it was due."""
        self.stalls: list[Stall] = []
        self.ticks = 0
        self._due = 0.0
        self._cpu = 0.0
        self._waited = 0.0
        self._run_queue_wait: Callable[[], float] = lambda: 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start ticking on the running loop (call it from a coroutine)."""
        if self.running:
            return
        self._run_queue_wait = _schedstat_reader()
        self._due = time.monotonic() + self.interval
        self._cpu, self._waited = time.thread_time(), self._run_queue_wait()
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="loop-stall")

    def stop(self) -> float:
        """Stop ticking; a stall still in progress counts. Returns :attr:`max_stall`."""
        if self._task is not None:
            if not self._task.done():
                # The ticker may be due and not yet run: that wait is a stall too.
                self._record(time.monotonic() - self._due, time.thread_time() - self._cpu,
                             self._run_queue_wait() - self._waited)
                self._task.cancel()
            self._task = None
        return self.max_stall

    def snapshot(self) -> dict[str, float | int]:
        """The figures as a JSON-ready dict (seconds)."""
        return {"max_stall": self.max_stall, "stalls_over_threshold": len(self.stalls),
                "ticks": self.ticks}

    @property
    def max_own_stall(self) -> float:
        """The largest :attr:`Stall.own` among the kept stalls (0.0 if none)."""
        return max((stall.own for stall in self.stalls), default=0.0)

    def _record(self, late: float, busy: float, waited: float) -> None:
        if late > self.max_stall:
            self.max_stall = late
        if late >= self.threshold:
            self.stalls.append(Stall(time.monotonic(), late, busy, waited))
            del self.stalls[:-self.keep]

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now, cpu, waited = time.monotonic(), time.thread_time(), self._run_queue_wait()
            self.ticks += 1
            self._record(now - self._due, cpu - self._cpu, waited - self._waited)
            self._due, self._cpu, self._waited = now + self.interval, cpu, waited

    async def __aenter__(self) -> LoopStallMonitor:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        task = self._task
        self.stop()
        if task is not None:
            await asyncio.wait([task])  # unlike ``await task``, never raises its cancellation
