"""Per-key call coalescing for asyncio (after Go's ``x/sync/singleflight``).

:meth:`Singleflight.do` runs ``fn`` once per key at a time: every caller that
arrives while a call for the key is in flight waits for that call and gets
its result, or its exception. The call runs in its own task, owned by the
group rather than by any caller, so cancelling a caller (the first one
included) cancels only that caller's wait: the call goes on and the other
callers still get its result. Once the call finishes the key is free again.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass
class _Call(Generic[T]):
    task: asyncio.Task[T]
    callers: int = 1
    followers: list[asyncio.Future[None]] = field(default_factory=list)


class Singleflight(Generic[K, T]):
    """A group of keyed calls; share one group among the callers to coalesce."""

    def __init__(self) -> None:
        self._calls: dict[K, _Call[T]] = {}

    async def do(self, key: K, fn: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Run ``fn`` for ``key`` unless a call is in flight; return its result.

        Returns ``(value, shared)``: ``shared`` is true when the value went to
        more than one caller. Raises what ``fn`` raised.
        """
        call = self._calls.get(key)
        if call is None or call.task.done():
            call = _Call(asyncio.get_running_loop().create_task(_run(fn)))
            self._calls[key] = call
            call.task.add_done_callback(functools.partial(self._finished, key))
        else:
            call.callers += 1
        # shield: cancelling this caller must not cancel the shared task.
        value = await asyncio.shield(call.task)
        return value, call.callers > 1

    def forget(self, key: K) -> None:
        """Let the next :meth:`do` for ``key`` start a new call.

        Callers already waiting keep waiting for the old call.
        """
        self._calls.pop(key, None)

    def in_flight(self, key: K) -> bool:
        call = self._calls.get(key)
        return call is not None and not call.task.done()

    def __len__(self) -> int:
        return sum(1 for c in self._calls.values() if not c.task.done())

    async def wait_idle(self) -> None:
        """Wait until every call in flight now has finished (results ignored)."""
        tasks = [c.task for c in self._calls.values() if not c.task.done()]
        if tasks:
            await asyncio.wait(tasks)

    def _finished(self, key: K, task: asyncio.Task[T]) -> None:
        call = self._calls.get(key)
        if call is not None and call.task is task:
            del self._calls[key]
        if not task.cancelled():
            # Mark the exception retrieved: every caller may have given up,
            # and an unobserved exception would only be noise in the log.
            task.exception()


async def _run(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()
