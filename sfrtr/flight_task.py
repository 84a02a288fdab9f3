"""The task a refresh flight runs in, which holds other tasks' cancels over its critical section.

From the acquire until its outcome is stored, a flight may hold a refresh token
that the provider has already burnt and whose successor exists only in this
process: cutting it off there loses the successor (the customer then has to
re-authorize). A caller's cancellation never reaches the flight (it runs in a
task owned by the singleflight group). What can still reach it is a plain
``task.cancel()`` of the flight's task by another task (code that cancels
``asyncio.all_tasks()`` from a task, say). Such a cancel, arriving while the
section runs, is held until the section ends. (The section used to run in a
task of its own for this, at a task, a future and three loop callbacks per
refresh.)

A cancel held means "stop": a section that has not sent its token request yet
sends none (it puts the record back as it was), and one whose request produced
a token stores it and ends normally, handing the token to its callers (some may
have come after the cancel) instead of a ``CancelledError``: the cancel would
have stopped nothing more. Otherwise (the flight would go on planning) the
cancel is delivered when the section ends.

What goes through at once:

- a cancel from one of the running loop's own callbacks: that is how timeouts
  work (the token request's deadline, aiohttp's, ``asyncio.timeout``/
  ``wait_for`` and anyio's cancel scopes cancel the task from a timer or a
  scheduled callback), and the section needs them to end; a task cancelling
  itself too;
- a cancel while the loop is not running: a loop torn down without
  ``aclose()`` (``asyncio.run`` and aiohttp's ``run_app`` cancel every task
  they find). Holding that one was tried: the teardown then waits for the
  section, but flights that hooks, retry timers or cleanup code start during
  it are in nobody's list and are cut off when the loop closes, and a loop
  whose stray tasks are swept between jobs is indistinguishable from one being
  torn down. A teardown cuts the section off, as a crash does, and recovery
  settles it; ``aclose()`` is what lets sections finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class FlightTask(asyncio.Task[T]):
    """An :class:`asyncio.Task` whose :meth:`cancel`, coming from another task while
    the task is in its critical section, waits for the section to end (see the
    module's docstring)."""

    # No ``__init__`` of its own: one is made per refresh, and a Python-level
    # constructor around the C one costs a frame and a keyword call each time.
    # The slots start unset (read with defaults).
    __slots__ = ("_critical", "_held")
    _critical: bool
    _held: list[Any] | None  # the messages of the cancels held

    def cancel(self, msg: Any | None = None) -> bool:
        if getattr(self, "_critical", False) and not self.done():
            loop = self.get_loop()
            if loop.is_running() and asyncio.current_task(loop) not in (None, self):
                held = getattr(self, "_held", None)
                if held is None:
                    held = self._held = []
                held.append(msg)
                return True  # requested: honoured when the section ends
        return super().cancel(msg)

    def enter_critical(self) -> None:
        """From now on another task's cancel is held (called by the task itself)."""
        self._critical = True

    def leave_critical(self, *, deliver: bool = True) -> None:
        """End the section (called by the task itself, so nothing it awaits is cut
        off). The cancels held are delivered (the task is cancelled at its next
        step), or with ``deliver=False`` dropped: the section finished what they
        would have stopped."""
        self._critical = False
        held = getattr(self, "_held", None)
        self._held = None
        if deliver:
            for msg in held or ():
                super().cancel(msg)

    def holds(self) -> int:
        """How many cancels are held now (for tests and diagnostics)."""
        return len(getattr(self, "_held", None) or ())


def spawn_flight(loop: asyncio.AbstractEventLoop,
                 coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A :class:`FlightTask` running ``coro`` on ``loop`` (the singleflight group's
    spawner). Made directly, not through a task factory the application may have
    set on the loop: a factory makes tasks of its own class, which would not hold."""
    return FlightTask(coro, loop=loop)


def holding_a_cancel() -> bool:
    """Whether the running task is a flight holding a cancel (it is asked to stop:
    send nothing new)."""
    task = asyncio.current_task()
    return isinstance(task, FlightTask) and task.holds() > 0
