"""The etcd model's multiplexed watch stream and pinned reads, on their own.

The store's served mode relies on what ``EtcdClient.watch_stream`` and
``range(revision=R)`` promise; these tests hold the model to the same promises
(see ``sfrtr/store/etcd_client.py``), so a simulation failure is the store's,
not the model's.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any

import pytest

from sfrtr.errors import StoreError
from sfrtr.store.etcd_client import StreamBroken, WatchBatch, prefix_end, put

from .clock import SimLoop, in_worker
from .etcd_model import EtcdModel, ModelClient, ModelWatchStream


def _setup() -> tuple[SimLoop, EtcdModel, ModelClient]:
    loop = SimLoop()
    model = EtcdModel(loop, random.Random(1), lambda who, text: None,
                      watch_rng=random.Random(2))
    return loop, model, ModelClient(model, "w0")


def _run(loop: SimLoop, coro: Coroutine[Any, Any, Any], worker: str = "w0") -> Any:
    task = loop.create_task(coro, context=in_worker(worker))
    return loop.run_until_complete(task)


async def _write(client: ModelClient, key: bytes, value: bytes = b"v") -> int:
    result = await client.txn([], [put(key, value)])
    return result.revision


async def _drain(stream: ModelWatchStream, loop: SimLoop,
                 until: float) -> list[tuple[int, WatchBatch]]:
    out = []
    while loop.time() < until:
        try:
            out.append(await asyncio.wait_for(stream.read(), until - loop.time()))
        except TimeoutError:
            break
    return out


def test_watchers_get_their_events_in_order_with_catch_up() -> None:
    loop, _model, client = _setup()

    async def go() -> list[tuple[int, WatchBatch]]:
        r1 = await _write(client, b"ns/tok/a")
        stream = await client.watch_stream()
        await stream.add(1, b"ns/tok/a", b"", r1 + 1)
        await stream.add(2, b"ns/rescue/a/", prefix_end(b"ns/rescue/a/"), r1 + 1)
        await _write(client, b"ns/tok/a")  # before the watchers exist: caught up
        await _write(client, b"ns/tok/b")  # nobody watches it
        await asyncio.sleep(1.0)
        await _write(client, b"ns/rescue/a/7")
        await _write(client, b"ns/tok/a")
        return await _drain(stream, loop, loop.time() + 1.0)

    got = _run(loop, go())
    ids = [wid for wid, _ in got]
    assert ids == [1, 2, 1]
    revs = [[e.kv.mod_revision for e in b.events] for _, b in got]
    assert revs[0] == [3]
    assert revs[1] == [5]
    assert revs[2] == [6]
    assert all(not b.compacted for _, b in got)


def test_a_compacted_start_or_a_lagging_watcher_is_cancelled_alone() -> None:
    loop, model, client = _setup()
    model.faults.lag = lambda worker, now: 5.0  # events wait 5 s on their way

    async def go() -> list[tuple[int, WatchBatch]]:
        await _write(client, b"k/a")
        await _write(client, b"k/b")
        stream = await client.watch_stream()
        model.compact(model.revision)
        await stream.add(1, b"k/a", b"", 2)  # compacted away
        await stream.add(2, b"k/b", b"", 0)
        await asyncio.sleep(1.0)
        await _write(client, b"k/b")
        model.compact(model.revision)  # watcher 2 still owes that event
        return await _drain(stream, loop, loop.time() + 10.0)

    got = _run(loop, go())
    assert [(wid, b.compacted) for wid, b in got] == [(1, True), (2, True)]
    assert not model._by_key


def test_a_broken_stream_raises_and_a_removed_watcher_goes_quiet() -> None:
    loop, model, client = _setup()

    async def go() -> None:
        stream = await client.watch_stream()
        await stream.add(1, b"k/a", b"", 0)
        await stream.add(2, b"k/b", b"", 0)
        await asyncio.sleep(1.0)
        await stream.remove(1)
        await _write(client, b"k/a")
        await _write(client, b"k/b")
        wid, batch = await stream.read()
        assert wid == 2
        assert len(batch.events) == 1
        model.break_watches("w0", "UNAVAILABLE")
        with pytest.raises(StreamBroken):
            await stream.read()
        with pytest.raises(StreamBroken):
            await stream.add(3, b"k/c", b"", 0)

    _run(loop, go())
    assert not model.streams
    assert not model._by_key


def test_a_paused_worker_hears_nothing_until_it_resumes() -> None:
    loop, model, client = _setup()
    other = ModelClient(model, "w1")
    heard: list[float] = []

    async def listen() -> None:
        stream = await client.watch_stream()
        await stream.add(1, b"k/a", b"", 0)
        await stream.read()
        heard.append(loop.time())

    async def write() -> None:
        await asyncio.sleep(2.0)
        loop.pause("w0", 10.0)
        await _write(other, b"k/a")
        await asyncio.sleep(20.0)

    loop.create_task(listen(), context=in_worker("w0"))
    _run(loop, write(), "w1")
    assert heard
    assert heard[0] >= 10.0


def test_pinned_reads_answer_the_state_at_that_revision() -> None:
    loop, model, client = _setup()

    async def go() -> None:
        r1 = await _write(client, b"k/a", b"one")
        r2 = await _write(client, b"k/a", b"two")
        await _write(client, b"k/b", b"x")
        _, kvs = await client.range(b"k/a", revision=r1)
        assert [kv.value for kv in kvs] == [b"one"]
        _, kvs = await client.range(b"k/", prefix=True, revision=r2)
        assert [(kv.key, kv.value) for kv in kvs] == [(b"k/a", b"two")]
        rev, kvs = await client.range(b"k/", prefix=True, keys_only=True)
        assert rev == model.revision
        assert [kv.key for kv in kvs] == [b"k/a", b"k/b"]
        model.compact(r2)
        _, kvs = await client.range(b"k/a", revision=r2)
        assert [kv.value for kv in kvs] == [b"two"]
        with pytest.raises(StoreError, match="compacted"):
            await client.range(b"k/a", revision=r1)

    _run(loop, go())
