"""The served mirror (``EtcdStore(mirror="served")``) against a real etcd: a worker
reads and watches only the customers it uses, hears nothing of the others, lets
idle ones go, and survives a broken stream and a compaction without losing a
change. The protocol itself runs on both mirrors in the store, manager, fault and
multi-process tests; these pin what is particular to following customers one by one."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from sfrtr import Intent, Secret, TokenRecord, Versioned
from sfrtr.store.etcd_client import WatchEvent
from sfrtr.store.etcd_launcher import LocalEtcd
from tests.etcd_helpers import stop_following, store_of, until

pytestmark = pytest.mark.anyio

RECORD = TokenRecord(access_token=Secret("at-1"), refresh_token=Secret("rt-1"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0,
                     expires_at=time.time() + 3600)



async def test_start_reads_nothing_and_only_served_customers_are_followed(
        etcd_server: LocalEtcd, namespace: str):
    writer = await store_of(etcd_server, namespace)
    for i in range(50):
        await writer.put(f"c{i}", RECORD.replace(generation=i))
    served = await store_of(etcd_server, namespace, mirror="served")
    try:
        await until(lambda: served.lease_id in served._members)
        # The lease grant, its member key and the member list: no namespace load.
        assert served.client.round_trips == 3
        assert served._mirror == {}
        seen: list[tuple[str, int | None]] = []
        served.subscribe(lambda c, s: seen.append((c, s and s.record.generation)))
        got = await served.read("c7")
        assert got is not None
        assert got.record.generation == 7
        assert list(served._mirror) == ["c7"]
        assert len(served._watchers) == 3  # record, lock, rescues
        await until(lambda: not served._to_add)  # the watchers were sent
        before = served.client.round_trips
        await writer.put("c7", RECORD.replace(generation=70))
        await writer.put("c8", RECORD.replace(generation=80))  # not served here
        woke = await served.wait_for_change("c7", got.stamp, 5)
        assert woke is not None
        assert woke.record.generation == 70
        assert served.client.round_trips == before  # the watcher brought it, no read
        await asyncio.sleep(0.2)
        assert list(served._mirror) == ["c7"]  # c8's change never reached this worker
        assert seen == [("c7", 70)]
    finally:
        await served.aclose()
        await writer.aclose()


async def test_idle_customers_are_let_go_and_followed_again_on_use(
        etcd_server: LocalEtcd, namespace: str):
    writer = await store_of(etcd_server, namespace)
    served = await store_of(etcd_server, namespace, mirror="served", idle_after=1.0)
    try:
        await writer.put("acme", RECORD)
        seen: list[tuple[str, Versioned | None]] = []
        served.subscribe(lambda c, s: seen.append((c, s)))
        first = await served.read("acme")
        assert first is not None
        await until(lambda: "acme" not in served._mirror, timeout=5)
        assert served._watchers == {}
        assert served._followed == {}
        assert seen[-1] == ("acme", None)  # a cached copy must be dropped
        await until(lambda: not served._to_remove)  # the watchers were removed
        # Changed while nobody here followed it: the next use reads it afresh.
        await writer.put("acme", RECORD.replace(generation=2))
        again = await served.read("acme")
        assert again is not None
        assert again.record.generation == 2
        assert len(served._watchers) == 3
    finally:
        await served.aclose()
        await writer.aclose()


async def test_a_waiter_keeps_its_customer_followed(etcd_server: LocalEtcd, namespace: str):
    writer = await store_of(etcd_server, namespace)
    served = await store_of(etcd_server, namespace, mirror="served", idle_after=1.0)
    try:
        await writer.put("acme", RECORD)
        first = await served.read("acme")
        assert first is not None
        waiter = asyncio.create_task(served.wait_for_change("acme", first.stamp, 10))
        await asyncio.sleep(2.0)  # well past idle_after
        assert "acme" in served._followed
        await writer.put("acme", RECORD.replace(generation=3))
        woke = await waiter
        assert woke is not None
        assert woke.record.generation == 3
    finally:
        await served.aclose()
        await writer.aclose()


async def test_a_broken_stream_resumes_each_watcher_where_it_was(
        etcd_server: LocalEtcd, namespace: str):
    writer = await store_of(etcd_server, namespace)
    served = await store_of(etcd_server, namespace, mirror="served")
    try:
        await writer.put("acme", RECORD)
        seen = await served.read("acme")
        assert seen is not None
        await stop_following(served)
        # Changes while the stream is down: the record, the lock, a rescue.
        current = await writer.read("acme")
        assert current is not None
        held = await writer.acquire("acme", current.version, Intent("w", "fp", 0.0))
        assert held is not None
        await writer.save_rescue("acme", held.version, RECORD.replace(generation=9))
        waiter = asyncio.create_task(served.wait_for_change("acme", seen.stamp, 10))
        await asyncio.sleep(0.1)
        assert not waiter.done()  # nothing can reach it yet
        before = served.client.round_trips
        served._tasks[1] = asyncio.create_task(served._watch_task())
        woke = await waiter
        assert woke is not None
        # The waiter saw a state etcd held: never the old record with the new rescue
        # stamp (its watchers' replies come in any order: the rescue's may be first).
        assert (woke.version, woke.locked) == (held.version, True)
        await until(lambda: served._mirror["acme"].rescues == {held.version})
        await until(lambda: (served._mirror["acme"].version,
                             served._mirror["acme"].locked) == (held.version, True))
        # Replayed by the watchers from where each was, not read: the only round trip
        # allowed is the read that returns the woken state (an intent is re-read
        # unless its lock is known, and it is here).
        assert served.client.round_trips - before <= 2
    finally:
        await served.aclose()
        await writer.aclose()


async def test_a_compacted_watcher_reads_its_customer_again(
        etcd_server: LocalEtcd, namespace: str, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="sfrtr.store")
    writer = await store_of(etcd_server, namespace)
    served = await store_of(etcd_server, namespace, mirror="served")
    try:
        await writer.put("acme", RECORD)
        seen = await served.read("acme")
        assert seen is not None
        await stop_following(served)
        for generation in range(1, 4):
            latest = await writer.put("acme", RECORD.replace(generation=generation))
        await writer.client.compact(latest.version)
        waiter = asyncio.create_task(served.wait_for_change("acme", seen.stamp, 10))
        served._tasks[1] = asyncio.create_task(served._watch_task())
        woke = await waiter
        assert woke is not None
        assert woke.record.generation == 3
        assert "compacted" in caplog.text
        await until(lambda: len(served._watchers) == 3 and not served._to_add)
        await writer.put("acme", RECORD.replace(generation=4))  # and it follows on
        after = await served.wait_for_change("acme", woke.stamp, 5)
        assert after is not None
        assert after.record.generation == 4
    finally:
        await served.aclose()
        await writer.aclose()


async def test_a_dead_holders_lock_is_seen_going(etcd_server: LocalEtcd, namespace: str):
    holder = await store_of(etcd_server, namespace)
    served = await store_of(etcd_server, namespace, mirror="served")
    try:
        await holder.put("acme", RECORD)
        current = await holder.read("acme")
        assert current is not None
        held = await holder.acquire("acme", current.version, Intent("w", "fp", 0.0))
        assert held is not None
        seen = await served.read("acme")
        assert seen is not None
        assert seen.locked
        # The holder "dies": the lease its lock is bound to goes (read from the lock
        # key: on a loaded machine its keepalive may have re-granted the lease).
        _, lock = await holder.client.range(holder._lock("acme"))
        await holder.client.revoke(lock[0].lease)
        woke = await served.wait_for_change("acme", seen.stamp, 5)
        assert woke is not None
        assert not woke.locked
        assert woke.record.intent is not None  # the intent outlives its writer
    finally:
        await served.aclose()
        await holder.aclose()


async def test_an_intent_whose_lock_has_not_arrived_is_read_from_etcd(
        etcd_server: LocalEtcd, namespace: str):
    """Record and lock come on separate watchers: if the record's event (an intent)
    is applied before the lock's, the mirror would show an orphaned intent, which
    sends waiters into recovery. The store reads it from etcd instead."""
    holder = await store_of(etcd_server, namespace)
    served = await store_of(etcd_server, namespace, mirror="served")
    try:
        await holder.put("acme", RECORD)
        assert await served.read("acme") is not None
        await stop_following(served)  # no events: we deliver the record's by hand
        current = await holder.read("acme")
        assert current is not None
        held = await holder.acquire("acme", current.version, Intent("w", "fp", 0.0))
        assert held is not None
        _, (tok,) = await holder.client.range(served._tok("acme"))
        served._apply_event(WatchEvent("put", tok), create=False)
        m = served._mirror["acme"]
        assert (m.version, m.locked) == (held.version, False)  # the lock is behind
        before = served.client.round_trips
        got = await served.read("acme")
        assert got is not None
        assert got.locked
        assert got.record.intent is not None
        assert served.client.round_trips - before == 2  # read from etcd
    finally:
        await served.aclose()
        await holder.aclose()


async def test_a_namespace_store_keeps_records_only_of_customers_it_uses(
        etcd_server: LocalEtcd, namespace: str):
    writer = await store_of(etcd_server, namespace)
    for i in range(20):
        await writer.put(f"c{i}", RECORD.replace(generation=i))
    store = await store_of(etcd_server, namespace, idle_after=1.0)
    try:
        assert len(store._mirror) == 20
        assert all(m.record is None and m.version for m in store._mirror.values())
        got = await store.read("c3")
        assert got is not None
        assert got.record.generation == 3
        await writer.put("c3", RECORD.replace(generation=30))
        await writer.put("c4", RECORD.replace(generation=40))
        await until(lambda: store._mirror["c4"].version > 0 and
                    store._mirror["c3"].record is not None and
                    store._mirror["c3"].record.generation == 30)
        assert store._mirror["c4"].record is None  # its version moved, its body stays out
        await until(lambda: store._mirror["c3"].record is None, timeout=5)  # idle: let go
        assert store._mirror["c3"].version  # still known, for waits and compares
    finally:
        await store.aclose()
        await writer.aclose()
