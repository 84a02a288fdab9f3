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

A cancel issued by one of the running loop's own callbacks goes through at
once: that is how timeouts work (the token request's deadline, aiohttp's,
``asyncio.timeout``/``wait_for`` and anyio's cancel scopes all cancel the task
from a timer or a scheduled callback), and the section needs them to end. So
does a task cancelling itself. A cancel from another task, or from outside a
running loop (a teardown), is held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class FlightTask(asyncio.Task[T]):
    """An :class:`asyncio.Task` whose :meth:`cancel` waits for :meth:`critical` to end
    when it comes from outside (see the module's docstring)."""

    __slots__ = ("_critical", "_held")

    def __init__(self, coro: Coroutine[Any, Any, T], *,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(coro, loop=loop)
        self._critical = False
        self._held: list[Any] | None = None  # the messages of the cancels held

    def cancel(self, msg: Any | None = None) -> bool:
        if self._critical and not self.done():
            loop = self.get_loop()
            if not loop.is_running() or asyncio.current_task(loop) not in (None, self):
                if self._held is None:
                    self._held = []
                self._held.append(msg)
                return True  # requested: it will be delivered
        return super().cancel(msg)

    def enter_critical(self) -> None:
        """From now on a cancel from outside is held (called by the task itself)."""
        self._critical = True

    def leave_critical(self) -> None:
        """Deliver the cancels held, if any: the task is cancelled at its next step
        (called by the task itself, so nothing it awaits is cut off by it)."""
        self._critical = False
        held, self._held = self._held, None
        for msg in held or ():
            super().cancel(msg)

    def holds(self) -> int:
        """How many cancels are held now (for tests and diagnostics)."""
        return len(self._held or ())


def spawn_flight(loop: asyncio.AbstractEventLoop,
                 coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A :class:`FlightTask` for ``coro`` on ``loop`` (the singleflight group's spawner).

    Made directly, not through a task factory the application may have set on
    the loop: a factory makes tasks of its own class, which would not hold."""
    return FlightTask(coro, loop=loop)
