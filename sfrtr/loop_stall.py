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
import time
from types import TracebackType


class LoopStallMonitor:
    """Measures :attr:`max_stall`, the longest the running loop was unresponsive.

    Use ``async with LoopStallMonitor() as m: ...`` or ``m.start()`` (inside
    the loop) and ``m.stop()``. Resolution is about ``interval`` plus the
    loop's own scheduling jitter; the cost is one wake-up per ``interval``.
    Stalls of at least ``threshold`` seconds are also kept in :attr:`stalls`
    (the most recent ``keep`` of them) as ``(monotonic time it ended, seconds)``.
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
        self.stalls: list[tuple[float, float]] = []
        self.ticks = 0
        self._due = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start ticking on the running loop (call it from a coroutine)."""
        if self.running:
            return
        self._due = time.monotonic() + self.interval
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="loop-stall")

    def stop(self) -> float:
        """Stop ticking; a stall still in progress counts. Returns :attr:`max_stall`."""
        if self._task is not None:
            if not self._task.done():
                # The ticker may be due and not yet run: that wait is a stall too.
                self._record(time.monotonic() - self._due)
                self._task.cancel()
            self._task = None
        return self.max_stall

    def snapshot(self) -> dict[str, float | int]:
        """The figures as a JSON-ready dict (seconds)."""
        return {"max_stall": self.max_stall, "stalls_over_threshold": len(self.stalls),
                "ticks": self.ticks}

    def _record(self, late: float) -> None:
        if late > self.max_stall:
            self.max_stall = late
        if late >= self.threshold:
            self.stalls.append((time.monotonic(), late))
            del self.stalls[:-self.keep]

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.ticks += 1
            self._record(now - self._due)
            self._due = now + self.interval

    async def __aenter__(self) -> LoopStallMonitor:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        task = self._task
        self.stop()
        if task is not None:
            await asyncio.wait([task])  # unlike ``await task``, never raises its cancellation
