"""The task a refresh flight runs in, which holds outside cancels over its critical section.

From the acquire until its outcome is stored, a flight may hold a refresh token
that the provider has already burnt and whose successor exists only in this
process: cutting it off there loses the successor (the customer then has to
re-authorize). A caller's cancellation never reaches the flight (it runs in a
task owned by the singleflight group). What can still reach it is a plain
``task.cancel()`` from outside: most often a loop torn down without
``aclose()`` (``asyncio.run`` and aiohttp's ``run_app`` cancel every task they
find, then wait for them), or code that cancels ``asyncio.all_tasks()``.

Such a cancel, arriving while the section runs, is held and delivered when the
section ends: the loop's teardown then waits for the outcome to be stored.
(The section used to run in a task of its own, which a teardown cancelled
too, and that cost a task, a future and three loop callbacks per refresh.)

A cancel held means "stop": a section that has not sent its token request
yet sends none (it puts the record back as it was), and one whose request
produced a token stores it and ends normally, handing the token to its callers
(some may have come after the cancel) instead of a ``CancelledError``: the
cancel would have stopped nothing more. Otherwise (the flight would go on
planning) the cancel is delivered when the section ends. A cancel held during
a teardown also tells the owner (``on_teardown``): flights started after the
sweep (by a hook, a retry timer) are not in its list, and must not begin a
section that nobody would wait for.

A cancel issued by one of the running loop's own callbacks goes through at
once: that is how timeouts work (the token request's deadline, aiohttp's,
``asyncio.timeout``/``wait_for`` and anyio's cancel scopes all cancel the task
from a timer or a scheduled callback), and the section needs them to end. So
does a task cancelling itself. A cancel from another task, or from outside a
running loop (a teardown), is held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class FlightTask(asyncio.Task[T]):
    """An :class:`asyncio.Task` whose :meth:`cancel` waits for :meth:`critical` to end
    when it comes from outside (see the module's docstring)."""

    # No ``__init__`` of its own: one is made per refresh, and a Python-level
    # constructor around the C one costs a frame and a keyword call each time.
    # The slots start unset (read with defaults); ``on_teardown`` is set by
    # :func:`spawn_flight`.
    __slots__ = ("_critical", "_held", "on_teardown")
    _critical: bool
    _held: list[Any] | None  # the messages of the cancels held
    on_teardown: Callable[[], None] | None

    def cancel(self, msg: Any | None = None) -> bool:
        if getattr(self, "_critical", False) and not self.done():
            loop = self.get_loop()
            tearing_down = not loop.is_running()
            if tearing_down or asyncio.current_task(loop) not in (None, self):
                held = getattr(self, "_held", None)
                if held is None:
                    held = self._held = []
                held.append(msg)
                on_teardown = getattr(self, "on_teardown", None)
                if tearing_down and on_teardown is not None:
                    on_teardown()
                return True  # requested: honoured when the section ends
        return super().cancel(msg)

    def enter_critical(self) -> None:
        """From now on a cancel from outside is held (called by the task itself)."""
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


def spawn_flight(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T],
                 on_teardown: Callable[[], None] | None = None) -> FlightTask[T]:
    """A :class:`FlightTask` running ``coro`` on ``loop``; ``on_teardown`` is called
    when a cancel is held during a loop's teardown (see the module's docstring).
    Made directly, not through a task factory the application may have set on the
    loop: a factory makes tasks of its own class, which would not hold cancels."""
    task = FlightTask(coro, loop=loop)
    task.on_teardown = on_teardown
    return task


def holding_a_cancel() -> bool:
    """Whether the running task is a flight holding a cancel (it is asked to stop:
    send nothing new)."""
    task = asyncio.current_task()
    return isinstance(task, FlightTask) and task.holds() > 0
