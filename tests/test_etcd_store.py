"""The etcd store against a real etcd: each operation, fencing, the watch, the lease."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from sfrtr import Intent, LeaseLost, Secret, Status, TokenRecord
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings

pytestmark = pytest.mark.anyio

RECORD = TokenRecord(access_token=Secret("at-1"), refresh_token=Secret("rt-1"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0,
                     expires_at=time.time() + 3600)
INTENT = Intent("w1", "fp", 1.0)


async def other_store(server, namespace: str) -> EtcdStore:
    store = EtcdStore(EtcdSettings(endpoints=[server.endpoint]), namespace=namespace,
                      lease_ttl=3)
    await store.start()
    return store


async def test_put_read_round_trip_and_customers(etcd_store):
    assert await etcd_store.read("acme/eu west") is None
    written = await etcd_store.put("acme/eu west", RECORD)
    got = await etcd_store.read("acme/eu west")
    assert got == written
    assert got.record == RECORD
    assert not got.locked
    assert await etcd_store.customers() == ["acme/eu west"]


async def test_acquire_is_exclusive_and_fences(etcd_server, etcd_store, namespace):
    other = await other_store(etcd_server, namespace)
    try:
        v0 = await etcd_store.put("acme", RECORD)
        await asyncio.sleep(0.1)  # let the other process's watch see it
        mine, theirs = await asyncio.gather(
            etcd_store.acquire("acme", v0.version, INTENT),
            other.acquire("acme", v0.version, Intent("w2", "fp", 1.0)))
        assert (mine is None) != (theirs is None)
        winner_store, won = (etcd_store, mine) if mine else (other, theirs)
        assert won.locked
        assert won.record.status is Status.REFRESHING
        assert won.record.intent.lease == winner_store.lease_id
        # A commit against a stale fence is refused; the right fence wins.
        assert await etcd_store.commit("acme", v0.version, RECORD) is None
        done = await winner_store.commit("acme", won.version, RECORD.replace(generation=1))
        assert done is not None
        assert not done.locked
        assert (await etcd_store.client.range(etcd_store._lock("acme")))[1] == []
    finally:
        await other.aclose()


async def test_the_watch_tells_other_processes(etcd_server, etcd_store, namespace):
    other = await other_store(etcd_server, namespace)
    seen: list[tuple[str, object]] = []
    other.subscribe(lambda c, state: seen.append((c, state and state.record.generation)))
    try:
        v0 = await etcd_store.put("acme", RECORD)
        waited = asyncio.create_task(other.wait_for_change("acme", 0, 5))
        got = await waited
        assert got is not None
        assert got.version == v0.version
        before = other.client.round_trips
        assert (await other.read("acme")).version == v0.version  # from the mirror
        assert other.client.round_trips == before
        acquired = await etcd_store.acquire("acme", v0.version, INTENT)
        changed = await other.wait_for_change("acme", v0.version, 5)
        assert changed.locked
        await etcd_store.commit("acme", acquired.version, RECORD.replace(generation=1))
        final = await other.wait_for_change("acme", acquired.version, 5)
        assert final.record.generation == 1
        assert ("acme", 1) in seen
    finally:
        await other.aclose()


async def test_wait_for_change_times_out(etcd_store):
    v0 = await etcd_store.put("acme", RECORD)
    started = time.monotonic()
    assert await etcd_store.wait_for_change("acme", v0.version, 0.3) is None
    assert time.monotonic() - started >= 0.3


async def test_lock_dies_with_the_lease_and_wakes_waiters(etcd_server, etcd_store, namespace):
    holder = await other_store(etcd_server, namespace)
    v0 = await holder.put("acme", RECORD)
    acquired = await holder.acquire("acme", v0.version, INTENT)
    await asyncio.sleep(0.1)
    assert (await etcd_store.read("acme")).locked
    # As if the process died: the lease the lock is bound to goes (read from the lock
    # key: on a loaded machine the holder's keepalive may have re-granted its lease).
    _, lock = await holder.client.range(holder._lock("acme"))
    await holder.client.revoke(lock[0].lease)
    changed = await etcd_store.wait_for_change("acme", acquired.version, 5)
    assert changed is not None
    assert not changed.locked
    assert changed.record.status is Status.REFRESHING  # the intent outlives the lock
    await holder.aclose()


async def test_a_revoked_lease_refuses_the_intent(etcd_store):
    v0 = await etcd_store.put("acme", RECORD)
    await etcd_store.client.revoke(etcd_store.lease_id)
    with pytest.raises(LeaseLost):
        await etcd_store.acquire("acme", v0.version, INTENT)
    assert (await etcd_store.read("acme")).record.status is Status.VALID
    # The keepalive loop takes a new lease for what comes next.
    for _ in range(100):
        if etcd_store.lease_id is not None and etcd_store.lease_remaining() > 0:
            break
        await asyncio.sleep(0.05)
    assert await etcd_store.acquire("acme", v0.version, INTENT) is not None


async def test_keepalive_keeps_the_lease(etcd_store):
    lease = etcd_store.lease_id
    await asyncio.sleep(4)  # longer than the 3 s TTL
    assert etcd_store.lease_id == lease
    assert etcd_store.lease_remaining() > 1


async def test_rescues(etcd_store):
    await etcd_store.put("acme", RECORD)
    await etcd_store.save_rescue("acme", 20, RECORD.replace(generation=2))
    await etcd_store.save_rescue("acme", 9, RECORD.replace(generation=1))
    found = await etcd_store.rescues("acme")
    assert [(f, r.generation) for f, r in found] == [(9, 1), (20, 2)]
    await etcd_store.drop_rescue("acme", 9)
    assert [f for f, _ in await etcd_store.rescues("acme")] == [20]
    await etcd_store.delete("acme")
    assert await etcd_store.rescues("acme") == []
    assert await etcd_store.read("acme") is None


async def test_watch_resumes_after_compaction(etcd_server, etcd_store, namespace, caplog):
    caplog.set_level(logging.WARNING, logger="sfrtr.store")
    writer = await other_store(etcd_server, namespace)
    try:
        v0 = await etcd_store.put("acme", RECORD)
        # The watch stream breaks (we stop it); history moves on and is compacted.
        watch_task = etcd_store._tasks[1]
        watch_task.cancel()
        await asyncio.gather(watch_task, return_exceptions=True)
        for gen in range(1, 4):
            latest = await writer.put("acme", RECORD.replace(generation=gen))
        await writer.client.compact(latest.version)
        waiter = asyncio.create_task(etcd_store.wait_for_change("acme", v0.version, 10))
        await asyncio.sleep(0.1)
        assert not waiter.done()  # the mirror cannot know yet
        # The watch comes back from its old revision, finds it compacted, resyncs.
        etcd_store._tasks[1] = asyncio.create_task(etcd_store._watch_task())
        woke = await waiter
        assert woke is not None
        assert woke.version == latest.version
        assert woke.record.generation == 3
        assert "compacted" in caplog.text  # it was the compaction path, not a replay
        # And it keeps following new writes afterwards.
        await writer.put("acme", RECORD.replace(generation=4))
        after = await etcd_store.wait_for_change("acme", latest.version, 5)
        assert after.record.generation == 4
    finally:
        await writer.aclose()


async def test_a_record_created_elsewhere_is_found_before_the_watch_brings_it(
        etcd_server, etcd_store, namespace):
    writer = await other_store(etcd_server, namespace)
    try:
        for i in range(20):  # no sleep: read right after another process's write
            await writer.put(f"new-{i}", RECORD)
            got = await etcd_store.read(f"new-{i}")
            assert got is not None
            assert got.record == RECORD
    finally:
        await writer.aclose()
