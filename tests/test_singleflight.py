"""Singleflight: coalescing, exceptions, cancellation, forget."""

from __future__ import annotations

import asyncio
import functools
import gc
import types
import weakref
from collections.abc import Awaitable
from typing import Any

import pytest

from sfrtr.singleflight import Singleflight

pytestmark = pytest.mark.anyio


async def test_concurrent_callers_share_one_call():
    group: Singleflight[str, int] = Singleflight()
    runs = 0
    gate = asyncio.Event()

    async def work() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return 42

    tasks = [asyncio.create_task(group.do("k", work)) for _ in range(1000)]
    await asyncio.sleep(0)
    assert group.in_flight("k")
    gate.set()
    results = await asyncio.gather(*tasks)
    assert runs == 1
    assert results == [(42, True)] * 1000
    assert not group.in_flight("k")
    assert len(group) == 0


async def test_a_lone_caller_is_not_shared_and_keys_are_independent():
    group: Singleflight[str, str] = Singleflight()

    async def echo(v: str) -> str:
        await asyncio.sleep(0.01)
        return v

    a, b = await asyncio.gather(group.do("a", lambda: echo("A")), group.do("b", lambda: echo("B")))
    assert a == ("A", False)
    assert b == ("B", False)


async def test_exception_reaches_every_caller_and_frees_the_key():
    group: Singleflight[str, int] = Singleflight()
    calls = 0

    async def boom() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("nope")

    results = await asyncio.gather(*(group.do("k", boom) for _ in range(10)),
                                   return_exceptions=True)
    assert calls == 1
    assert all(isinstance(r, RuntimeError) for r in results)

    async def ok() -> int:
        return 7

    assert await group.do("k", ok) == (7, False)


async def test_cancelling_the_first_caller_neither_cancels_the_work_nor_strands_others():
    group: Singleflight[str, int] = Singleflight()
    finished = asyncio.Event()

    async def slow() -> int:
        await asyncio.sleep(0.05)
        finished.set()
        return 1

    first = asyncio.create_task(group.do("k", slow))
    await asyncio.sleep(0)
    others = [asyncio.create_task(group.do("k", slow)) for _ in range(5)]
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert [await t for t in others] == [(1, True)] * 5
    assert finished.is_set()


async def test_work_completes_even_if_every_caller_gives_up():
    group: Singleflight[str, int] = Singleflight()
    done = asyncio.Event()

    async def slow() -> int:
        await asyncio.sleep(0.02)
        done.set()
        return 1

    callers = [asyncio.create_task(group.do("k", slow)) for _ in range(3)]
    await asyncio.sleep(0)
    for c in callers:
        c.cancel()
    await group.wait_idle()
    assert done.is_set()


async def test_forget_starts_a_new_call_while_old_waiters_keep_the_old_one():
    group: Singleflight[str, int] = Singleflight()
    gate = asyncio.Event()
    n = 0

    async def numbered() -> int:
        nonlocal n
        n += 1
        mine = n
        await gate.wait()
        return mine

    old = asyncio.create_task(group.do("k", numbered))
    await asyncio.sleep(0)
    group.forget("k")
    new = asyncio.create_task(group.do("k", numbered))
    await asyncio.sleep(0)
    gate.set()
    assert (await old)[0] == 1
    assert (await new)[0] == 2
    assert len(group) == 0


# --- Bookkeeping a caller can observe (issue 19) -----------------------------------------

class Payload:
    """A result that can be weakly referenced, to see whether the group still holds it."""


async def _settle() -> None:
    """Let the done callbacks of finished tasks run."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_finished_call_leaves_nothing_behind():
    """The manager keys flights by stale-token fingerprints: a finished call that stayed
    in the group would keep its result (tokens) alive and the group would grow forever."""
    group: Singleflight[str, Payload] = Singleflight()

    async def make() -> Payload:
        await asyncio.sleep(0)
        return Payload()

    gone = []
    for key in ("a", "b", "c"):
        value, shared = await group.do(key, make)
        assert not shared
        gone.append(weakref.ref(value))
        del value
    await _settle()
    gc.collect()
    assert [ref() for ref in gone] == [None, None, None]


class Boom(Exception):
    """A subclass, so it can be weakly referenced."""


async def test_a_failed_call_leaves_nothing_behind():
    group: Singleflight[str, int] = Singleflight()
    kept: list[weakref.ref[Exception]] = []

    async def boom() -> int:
        await asyncio.sleep(0)
        error = Boom("nope")
        kept.append(weakref.ref(error))
        raise error

    with pytest.raises(Boom):
        await group.do("k", boom)
    await _settle()
    gc.collect()
    assert kept[0]() is None


async def test_a_forgotten_call_finishing_does_not_free_the_newer_call():
    """After forget(), the old call's end must leave the new call's entry alone: a third
    caller joins the new call instead of starting a duplicate flight."""
    group: Singleflight[str, int] = Singleflight()
    old_gate, new_gate = asyncio.Event(), asyncio.Event()
    runs = 0

    async def first() -> int:
        nonlocal runs
        runs += 1
        await old_gate.wait()
        return 1

    async def second() -> int:
        nonlocal runs
        runs += 1
        await new_gate.wait()
        return 2

    old = asyncio.create_task(group.do("k", first))
    await asyncio.sleep(0)
    group.forget("k")
    new = asyncio.create_task(group.do("k", second))
    await asyncio.sleep(0)
    old_gate.set()
    assert await old == (1, False)
    await _settle()
    assert group.in_flight("k")
    third = asyncio.create_task(group.do("k", second))
    await asyncio.sleep(0)
    new_gate.set()
    assert await new == (2, True)
    assert await third == (2, True)
    assert runs == 2


async def test_len_counts_only_calls_in_flight():
    """``TokenManager.wait_idle()`` and ``aclose()`` wait while ``len()`` is not 0."""
    group: Singleflight[str, int] = Singleflight()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 1

    assert len(group) == 0
    tasks = [asyncio.create_task(group.do("a", work)), asyncio.create_task(group.do("a", work)),
             asyncio.create_task(group.do("b", work))]
    await asyncio.sleep(0)
    assert len(group) == 2
    gate.set()
    await asyncio.gather(*tasks)
    assert len(group) == 0
    await group.wait_idle()  # nothing in flight: returns at once


async def test_a_caller_arriving_as_the_call_ends_starts_a_new_call():
    """A caller woken by the call's last act runs before the call's own bookkeeping: it
    must see the key free (no call in flight, ``len()`` 0) and get a fresh result, not
    the finished call's."""
    group: Singleflight[str, int] = Singleflight()
    ending = asyncio.Event()
    runs = 0
    seen: list[object] = []

    async def work() -> int:
        nonlocal runs
        runs += 1
        ending.set()
        return runs

    async def latecomer() -> None:
        await ending.wait()
        seen.append((group.in_flight("k"), len(group)))
        seen.append(await group.do("k", work))

    late = asyncio.create_task(latecomer())
    await asyncio.sleep(0)
    assert await group.do("k", work) == (1, False)
    await late
    assert seen == [(False, 0), (2, False)]
    assert runs == 2


async def test_shared_is_true_with_exactly_two_callers():
    group: Singleflight[str, int] = Singleflight()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 5

    a = asyncio.create_task(group.do("k", work))
    b = asyncio.create_task(group.do("k", work))
    await asyncio.sleep(0)
    gate.set()
    assert await a == (5, True)
    assert await b == (5, True)


async def test_forget_of_an_absent_key_is_harmless():
    group: Singleflight[str, int] = Singleflight()
    group.forget("never")

    async def one() -> int:
        return 1

    assert await group.do("never", one) == (1, False)
    group.forget("never")
    assert not group.in_flight("never")


@pytest.mark.parametrize("ending", ["raises", "cancelled"])
async def test_an_abandoned_call_ending_badly_reports_nothing_to_the_loop(ending):
    """Every caller gave up; the call then fails (or is cancelled from within). Nobody is
    left to see it, and the loop's exception handler must not hear of it either."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        group: Singleflight[str, int] = Singleflight()
        gate = asyncio.Event()

        async def doomed() -> int:
            await gate.wait()
            if ending == "raises":
                raise RuntimeError("nobody listens")
            raise asyncio.CancelledError

        callers = [asyncio.create_task(group.do("k", doomed)) for _ in range(2)]
        await asyncio.sleep(0)
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        gate.set()
        await group.wait_idle()
        await _settle()
        del callers
        gc.collect()
        await _settle()
    finally:
        loop.set_exception_handler(previous)
    assert reported == []


async def test_a_joined_wait_cancelled_ends_only_that_wait():
    group: Singleflight[str, int] = Singleflight()
    gate = asyncio.Event()
    runs = 0

    async def work(n: int) -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return n

    first = group.join("k", work, 1)
    second = group.join("k", work, 2)  # joins: its argument is never used
    first.cancel()
    gate.set()
    assert await second == 1
    assert first.cancelled()
    assert runs == 1


async def test_callers_that_gave_up_do_not_pile_up_during_a_long_call():
    """Ten thousand callers each time out while one call runs: the group keeps only
    the futures of callers still waiting (and a bounded number of dead ones)."""
    group: Singleflight[str, int] = Singleflight()
    gate = asyncio.Event()

    async def long_call() -> int:
        await gate.wait()
        return 5

    for _ in range(10_000):
        group.join("k", long_call).cancel()  # a caller that awaited it and timed out
    patient = [group.join("k", long_call) for _ in range(10)]
    waiters = group._calls["k"].waiters
    assert len(waiters) <= 2 * 10 + 64
    gate.set()
    assert await asyncio.gather(*patient) == [5] * 10


async def test_a_caller_cancelled_just_after_the_call_failed_leaves_no_log_noise():
    """The failure reached the caller's future, then the caller was cancelled before it
    resumed: the exception was never raised to anyone, and nobody must hear of it."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        group: Singleflight[str, int] = Singleflight()
        gate = asyncio.Event()

        async def fails() -> int:
            await gate.wait()
            raise RuntimeError("refused")

        caller = asyncio.create_task(group.do("k", fails))
        watcher = asyncio.create_task(group.do("k", fails))
        await asyncio.sleep(0)
        call = group._calls["k"]
        assert call.task is not None
        # Runs right after the group's own done-callback settled the futures, before
        # the callers it woke get to run: the caller is settled, not yet resumed.
        call.task.add_done_callback(functools.partial(_cancel, caller))
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        with pytest.raises(RuntimeError):
            await watcher
        del caller, call
        gc.collect()
        await _settle()
    finally:
        loop.set_exception_handler(previous)
    assert reported == []


def _cancel(task: asyncio.Task[object], _done: object) -> None:
    task.cancel()


async def _storm(group: Singleflight[str, int], callers: int) -> list[int]:
    """``callers`` tasks awaiting ``join()`` as the manager's callers do; one call."""
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 7

    async def caller() -> int:
        return await group.join("k", work)

    tasks = [asyncio.create_task(caller()) for _ in range(callers)]
    await asyncio.sleep(0)  # every caller waits now
    gate.set()
    return await asyncio.gather(*tasks)


async def test_a_storm_wakes_each_caller_with_one_loop_callback():
    """When the call ends, each waiting caller costs the loop one callback (its own
    wake-up), as tasks awaiting one shared future do: the storm benchmark's floor.
    A shield per caller costs two more (``benchmarks/storm.py``)."""
    loop = asyncio.get_running_loop()
    scheduled = 0
    real = loop.call_soon

    def counting(*args: Any, **kwargs: Any) -> asyncio.Handle:
        nonlocal scheduled
        scheduled += 1
        return real(*args, **kwargs)

    group: Singleflight[str, int] = Singleflight()
    n = 1000
    loop.call_soon = counting  # type: ignore[method-assign]
    try:
        # Counted: each caller's start, its wake-up and gather's done-callback, and a few
        # for the call itself and this test's own waits.
        assert await _storm(group, n) == [7] * n
    finally:
        del loop.call_soon
    assert 3 * n <= scheduled <= 3 * n + 10


async def test_a_storm_leaves_no_garbage_cycles():
    """A storm's callers, their futures and the call are freed by reference counting
    when it ends. The cyclic collector walks every live waiter while a storm waits
    (``benchmarks/storm.py`` times it); cycles per caller would add their own walks
    after it, in whatever the application runs next."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        group: Singleflight[str, int] = Singleflight()
        assert await _storm(group, 1000) == [7] * 1000
        await _settle()
        gc.collect()
        ours = [o for o in gc.garbage
                if isinstance(o, asyncio.Future | types.CoroutineType | types.FrameType)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == []


async def test_a_plain_function_that_joins_its_own_key_then_raises_leaves_nobody_waiting():
    group: Singleflight[str, int] = Singleflight()
    inner: list[asyncio.Future[int]] = []

    def start() -> Awaitable[int]:
        inner.append(group.join("k", start))  # joins the call being started
        raise ValueError("no awaitable after all")

    with pytest.raises(ValueError, match="no awaitable"):
        group.join("k", start)
    assert inner[0].done()
    with pytest.raises(ValueError, match="no awaitable"):
        inner[0].result()
    assert not group.in_flight("k")
    assert await group.join("k", _seven) == 7  # the next call starts afresh


async def _seven() -> int:
    return 7
