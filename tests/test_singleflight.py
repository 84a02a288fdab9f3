"""Singleflight: coalescing, exceptions, cancellation, forget."""

from __future__ import annotations

import asyncio

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
