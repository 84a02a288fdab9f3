"""Per-key call coalescing for asyncio (after Go's ``x/sync/singleflight``).

:meth:`Singleflight.do` runs ``fn`` once per key at a time: every caller that
arrives while a call for the key is in flight waits for that call and gets
its result, or its exception. The call runs in its own task, owned by the
group rather than by any caller, so cancelling a caller (the first one
included) cancels only that caller's wait: the call goes on and the other
callers still get its result. Once the call finishes the key is free again.

Each caller waits on a future of its own, and the call's one done-callback
settles them all in arrival order. That is what ``asyncio.shield`` per caller
would give, at half the loop callbacks per caller and no closures: under a
storm of ten thousand callers of one expired customer the difference is most
of what the storm costs beyond the refresh itself (``docs/benchmarks.md``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar, TypeVarTuple

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class _Call(Generic[T]):
    __slots__ = ("callers", "group", "key", "loop", "prune_at", "task", "waiters")

    def __init__(self, group: Singleflight[Any, T], key: Hashable,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.group = group
        self.key = key
        self.loop = loop
        self.task: asyncio.Task[T] | None = None
        self.callers = 0
        # A dict, not a list: a cancelled caller leaves in O(1), and the
        # order (arrival) stays deterministic, which the simulation needs.
        self.waiters: dict[asyncio.Future[T], None] = {}
        self.prune_at = 64

    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def finished(self, task: asyncio.Task[T]) -> None:
        # A bound method as the task's done-callback: one object per call, where a
        # closure over (group, key, call) was five, all alive for the whole call.
        self.group._finished(self.key, self, task)


#: Makes the task a call runs in: ``spawn(loop, coro)``.
Spawn = Callable[[asyncio.AbstractEventLoop, Coroutine[Any, Any, T]], "asyncio.Task[T]"]


class Singleflight(Generic[K, T]):
    """A group of keyed calls; share one group among the callers to coalesce.

    ``spawn`` makes the task each call runs in (default: the loop's
    ``create_task``); the token manager's flights run in a task that holds
    outside cancels over their critical section (:mod:`sfrtr.flight_task`).
    """

    def __init__(self, spawn: Spawn[T] | None = None) -> None:
        self._calls: dict[K, _Call[T]] = {}
        self._spawn: Spawn[T] = spawn or _create_task

    async def do(self, key: K, fn: Callable[[*Ts], Awaitable[T]],
                 *args: *Ts) -> tuple[T, bool]:
        """Run ``fn(*args)`` for ``key`` unless a call is in flight; return its result.

        Returns ``(value, shared)``: ``shared`` is true when the value went to
        more than one caller. Raises what ``fn`` raised. ``args`` are passed
        only to a call this caller starts (no closure per joining caller).
        """
        waiter = self.join(key, fn, *args)
        call = self._calls[key]
        try:
            value = await waiter
        except asyncio.CancelledError:
            call.waiters.pop(waiter, None)  # only this caller's future goes
            raise
        return value, call.callers > 1

    def join(self, key: K, fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> asyncio.Future[T]:
        """Like :meth:`do`, without the ``shared`` flag: the future of this
        caller's wait, starting the call if none is in flight. Cancelling the
        future (or the task awaiting it) ends only this caller's wait.

        Not a coroutine, so a caller that awaits it directly costs no frame of
        its own: the manager's storm path.
        """
        call = self._calls.get(key)
        if call is None or (call.task is not None and call.task.done()):
            call = _Call(self, key, asyncio.get_running_loop())
            # Registered before ``fn`` runs (a plain function runs here, and may
            # join its own key) and before the task exists: a call being started
            # (no task yet) is joined, never started twice.
            self._calls[key] = call
            try:
                started = fn(*args)
            except BaseException as exc:
                del self._calls[key]  # nothing runs: the next caller starts afresh
                for joined in call.waiters:  # joined from inside fn: told, not left waiting
                    if isinstance(exc, Exception):
                        joined.set_exception(exc)
                    else:
                        joined.cancel()
                raise
            # An ``async def`` gives its coroutine: run as it is (no wrapper frame
            # for every suspension of the call); any other awaitable is wrapped.
            coro = started if asyncio.iscoroutine(started) else _run(started)
            task = self._spawn(call.loop, coro)
            call.task = task
            task.add_done_callback(call.finished)
        waiters = call.waiters
        if len(waiters) >= call.prune_at:
            # Callers that gave up leave cancelled futures behind: drop them
            # now and then (amortised O(1)), so a long call stays small.
            for gone in [w for w in waiters if w.done()]:
                del waiters[gone]
            call.prune_at = max(64, 2 * len(waiters))
        waiter: asyncio.Future[T] = call.loop.create_future()
        waiters[waiter] = None
        call.callers += 1
        return waiter

    def forget(self, key: K) -> None:
        """Let the next :meth:`do` for ``key`` start a new call.

        Callers already waiting keep waiting for the old call.
        """
        self._calls.pop(key, None)

    def in_flight(self, key: K) -> bool:
        """Whether a call for ``key`` is running now."""
        call = self._calls.get(key)
        return call is not None and call.running()

    def __len__(self) -> int:
        return sum(1 for c in self._calls.values() if c.running())

    async def wait_idle(self) -> None:
        """Wait until every call in flight now has finished (results ignored)."""
        tasks = [c.task for c in self._calls.values() if c.task is not None and c.running()]
        if tasks:
            await asyncio.wait(tasks)

    def _finished(self, key: K, call: _Call[T], task: asyncio.Task[T]) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]
        waiters, call.waiters = call.waiters, {}
        if task.cancelled():
            for waiter in waiters:
                waiter.cancel()
            return
        # Retrieved here whether or not anyone still waits: every caller may
        # have given up, and an unobserved exception would only be log noise.
        exc = task.exception()
        if exc is not None:
            for waiter in waiters:
                if not waiter.done():
                    # A caller cancelled after this but before it resumes logs
                    # nothing: the task's wake-up reads the future first.
                    waiter.set_exception(exc)
            return
        value = task.result()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(value)


def _create_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    return loop.create_task(coro)


async def _run(awaitable: Awaitable[T]) -> T:
    return await awaitable
