"""Interleavings found by the adversarial review of the served mirror and the
keys-only namespace mirror (commits ccfcd59, de1b1da), replayed against a real etcd.

Each test fails on the code it was written against. Most force their order by
stopping a store's watch task and delivering the watch events by hand, in an order
etcd really produces: a Txn that writes the record and the lock (acquire, commit)
produces one WatchResponse *per watcher*, and etcd sends a revision's responses to
the watchers of one stream in Go map order, so the record's event and the lock's
come in either order, and grpc.aio yields to the event loop between the two reads.
``test_served_manager_waiter_is_not_held_until_its_deadline_by_a_commit`` shows the
same thing happening on its own, through the token manager, with no injection.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sfrtr import Intent, RefreshPolicy, Secret, TokenManager, TokenRecord, Versioned
from sfrtr.emulator import Emulator
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import KV, WatchEvent
from sfrtr.store.etcd_launcher import LocalEtcd
from tests.conftest import emulator_grant, emulator_oauth
from tests.etcd_helpers import store_of, until

pytestmark = pytest.mark.anyio

RECORD = TokenRecord(access_token=Secret("at-1"), refresh_token=Secret("rt-1"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0,
                     expires_at=time.time() + 3600)




async def stop_watching(store: EtcdStore) -> None:
    """No more events reach ``store`` on their own: the test delivers them."""
    task = store._tasks[1]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def put_event(reader: EtcdStore, key: bytes) -> WatchEvent:
    """The put event of ``key``'s current value, as its watcher would deliver it."""
    _, (kv,) = await reader.client.range(key)
    return WatchEvent("put", kv)


def delete_event(key: bytes, revision: int) -> WatchEvent:
    return WatchEvent("delete", KV(key, b"", revision, 0, 0))


async def served_and_holding(etcd_server: LocalEtcd, namespace: str
                             ) -> tuple[EtcdStore, EtcdStore, Versioned, Versioned]:
    """A served store following ``acme`` (its watch stopped) that has seen another
    process's acquire, record and lock both: ``(holder, served, held, seen)``."""
    holder = await store_of(etcd_server, namespace)
    served = await store_of(etcd_server, namespace, mirror="served")
    await holder.put("acme", RECORD)
    assert await served.read("acme") is not None
    await until(lambda: not served._to_add)
    await stop_watching(served)
    current = await holder.read("acme")
    assert current is not None
    held = await holder.acquire("acme", current.version, Intent("w", "fp", 0.0, id="i1"))
    assert held is not None
    served._apply_event(await put_event(holder, served._tok("acme")), create=False)
    served._apply_event(await put_event(holder, served._lock("acme")), create=False)
    seen = await served.read("acme")
    assert seen is not None
    assert seen.locked
    assert seen.record.intent is not None
    assert seen.version == held.version
    return holder, served, held, seen


async def test_served_lock_release_arriving_after_the_commit_wakes_the_waiter(
        etcd_server: LocalEtcd, namespace: str) -> None:
    """Served mirror, the commit's record event before its lock event (both at
    revision C, on two watchers).

    1. Another process holds acme's lock (intent at A); this process follows acme.
    2. It commits at C (record valid, lock deleted, one Txn).
    3. The record watcher's event C is applied; the woken waiter reads the mirror:
       the committed record *with the lock still held* (the lock's event is the
       next reply on the stream), stamp C. ``plan()`` says Wait (locked comes first).
    4. The lock watcher's delete at C is applied: ``changed = max(C, C)`` does not
       move, so ``wait_for_change(stamp=C)`` is never woken, though the lock it was
       waiting on is gone. Nothing else changes the customer until its next refresh:
       the manager's flight (and every caller joined to it) sleeps until
       ``wait_timeout`` (60 s by default) before it reads the record and uses it.

    Breaks the wait_for_change contract ("wait until anything kept for the
    customer changes after the state whose stamp is ``after``") and invariant 5's
    promise that waiters wake on the commit: a stall of wait_timeout after every
    such commit. Seen without injection in about 1 commit in 10 on a real etcd."""
    holder, served, held, _ = await served_and_holding(etcd_server, namespace)
    try:
        committed = await holder.commit("acme", held.version, RECORD.replace(generation=1))
        assert committed is not None
        served._apply_event(await put_event(holder, served._tok("acme")), create=False)
        mid = await served.read("acme")
        assert mid is not None
        assert mid.version == committed.version
        # Fixed by reading such a half-applied customer from etcd: the view is the
        # state etcd holds (committed and unlocked), never "committed but locked",
        # so no waiter is left waiting on a lock that is already gone.
        assert not mid.locked
        # And a waiter from that state is not woken by the lock's late echo into
        # a spin: it returns at most once, then waits.
        served._apply_event(delete_event(served._lock("acme"), committed.version),
                            create=False)
        assert await served.wait_for_change("acme", mid.stamp, 0.3) is None
    finally:
        await served.aclose()
        await holder.aclose()


async def test_served_lock_release_arriving_before_the_commit_is_no_orphan(
        etcd_server: LocalEtcd, namespace: str) -> None:
    """Served mirror, the commit's lock event before its record event.

    1. Another process holds acme's lock (intent at A); this process follows acme.
    2. It commits at C. The lock watcher's delete at C is applied first:
       ``locked=False, lock_at=C``; the record watcher is still at A (the intent).
    3. ``read()`` trusts the mirror because ``lock_at (C) >= version (A)``, and
       returns the intent at A without its lock, stamp C: an orphaned intent,
       a state etcd never held at any revision. ``plan()`` says Recover(orphan).
    4. The manager waits the orphan grace (lease TTL + request limit) with
       ``wait_for_change(stamp=C)``; the record's event at C does not move the
       stamp, so the commit never wakes it either: the caller waits the whole
       grace (or until its deadline) for a refresh that finished at once.

    ``lock_at >= version`` shows the lock as of a revision at or after the record's,
    but not that the record is still current at ``lock_at`` (that needs
    ``observed >= lock_at``). Breaks the read contract (a state that never existed)
    and invariant 5 (a waiter that does not wake on the commit); a false orphan."""
    holder, served, held, _ = await served_and_holding(etcd_server, namespace)
    try:
        committed = await holder.commit("acme", held.version, RECORD.replace(generation=1))
        assert committed is not None
        served._apply_event(delete_event(served._lock("acme"), committed.version),
                            create=False)
        got = await served.read("acme")
        assert got is not None
        orphan = got.record.intent is not None and not got.locked
        assert not orphan, (f"read() shows an orphaned intent (version {got.version}, "
                            f"stamp {got.stamp}) although its holder committed at "
                            f"{committed.version}")
    finally:
        await served.aclose()
        await holder.aclose()


async def test_served_manager_waiter_is_not_held_until_its_deadline_by_a_commit(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str) -> None:
    """The two interleavings above, happening on their own (no injection).

    A served-mirror manager asks for a token newer than the one that got a 401
    while another process holds the customer's lock; the holder commits a moment
    later. The manager's flight should wake on the commit and use the new record
    at once. On the current code, whenever etcd sends the commit's record and lock
    events in separate replies (the usual case: one reply per watcher) and the
    waiter runs between them, the flight either waits on a lock it thinks held or
    recovers a false orphan, and in both cases the stamp never moves again: it
    sleeps until ``wait_timeout``. Over 20 rounds this happened in several of them
    in every run tried (about 1 round in 10 in each direction)."""
    holder = await store_of(etcd_server, namespace)
    store = await store_of(etcd_server, namespace, mirror="served", lease_ttl=4)
    manager = TokenManager(emulator_oauth(emulator, timeout=1.2, connect_timeout=0.5), store,
                           RefreshPolicy(lease_margin=0.5, wait_timeout=3.0))
    slow: list[tuple[int, float]] = []
    try:
        for round_ in range(20):
            customer = f"c{round_}"
            record = await manager.connect(customer, emulator_grant(emulator, customer))
            current = await holder.read(customer)
            assert current is not None
            held = await holder.acquire(customer, current.version,
                                        Intent("holder", "fp", 0.0, id=f"h{round_}"))
            assert held is not None
            m = store._mirror[customer]
            await until(lambda m=m, v=held.version: m.locked and m.version == v)
            stale = record.access_token.reveal()
            asking = asyncio.create_task(manager.refresh(customer, stale=stale))
            await asyncio.sleep(0.1)  # the flight is waiting on the holder
            assert not asking.done()
            new = record.replace(access_token=Secret(f"at-new-{round_}"), generation=1)
            committed = await holder.commit(customer, held.version, new)
            assert committed is not None
            started = time.monotonic()
            creds = await asking
            took = time.monotonic() - started
            assert creds.access_token == f"at-new-{round_}"
            if took > 1.0:
                slow.append((round_, round(took, 2)))
        assert not slow, f"flights slept to their deadline after the commit: {slow}"
    finally:
        await manager.aclose()
        await holder.aclose()


async def test_served_subscriber_hears_a_change_made_while_its_watcher_was_compacted(
        etcd_server: LocalEtcd, namespace: str) -> None:
    """Served mirror, a compaction.

    1. This process serves acme (the manager caches its token; the subscriber is
       how that cache follows other processes' writes).
    2. Its watch stream is down; meanwhile another process deletes acme (a
       disconnect), and etcd compacts past the watchers' resume point.
    3. The stream comes back; the watchers are told ``compacted``; the store
       unfollows acme (no ``None`` to subscribers) and reads it again in the
       background (``_refollow`` -> ``_load`` -> ``_observe``): the mirror now
       knows the record is gone, but ``_observe`` notifies nobody.

    The subscriber never hears of the deletion: the manager's hot path keeps handing
    out the deleted customer's access token (no store read, invariant 3 makes sure
    of that) until the customer happens to be let go for idleness (``idle_after``,
    600 s by default) or a 401 comes back. Breaks ``subscribe``'s contract: "after
    every change to the record of a customer this process uses ... None: the record
    was deleted, or the store no longer keeps it current here"."""
    writer = await store_of(etcd_server, namespace)
    served = await store_of(etcd_server, namespace, mirror="served")
    try:
        await writer.put("acme", RECORD)
        seen: list[tuple[str, Versioned | None]] = []
        served.subscribe(lambda c, s: seen.append((c, s)))
        assert await served.read("acme") is not None
        await until(lambda: not served._to_add)
        await stop_watching(served)
        await writer.delete("acme")
        latest = await writer.put("other", RECORD)
        await writer.client.compact(latest.version)
        served._tasks[1] = asyncio.create_task(served._watch_task())
        # The compaction is noticed and acme is read again (it is gone).
        await until(lambda: "acme" in served._followed and
                    served._mirror["acme"].version == 0)
        await asyncio.sleep(0.2)
        assert ("acme", None) in seen, f"the subscriber heard only {seen}"
    finally:
        await served.aclose()
        await writer.aclose()


async def test_namespace_read_of_a_new_customer_does_not_answer_none(
        etcd_server: LocalEtcd, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Namespace mirror (the default), a customer created after this process loaded
    the namespace, read while a later event for it is on its way.

    1. Another process connects acme (put at P) and, a moment later, writes it
       again (an acquire, a re-authorization: revision P2).
    2. This process needs acme before the watch has brought either event: the
       mirror has no entry, so ``_use`` marks nothing used and ``read()`` reads
       etcd directly (at R, P <= R < P2).
    3. While that read's answer travels, the watch applies the events P and P2:
       ``_apply_event`` creates the entry *not used*, so it keeps the version
       (P2) and ``observed = P2`` but not the record body.
    4. The direct read's ``_observe(R)`` is skipped (R < observed); ``read()``
       returns ``_view(m)`` with no record body: ``None``.

    The manager turns that ``None`` into ``NotConnected`` for a customer that is
    connected (and has been since before the read). Breaks ``read()``'s contract
    (the current record) and, through the manager, refuses a good customer."""
    writer = await store_of(etcd_server, namespace)
    store = await store_of(etcd_server, namespace)
    try:
        await stop_watching(store)  # the events arrive when the test says
        await writer.put("acme", RECORD)
        created = await put_event(writer, store._tok("acme"))
        real_get_pair = store.client.get_pair

        async def get_pair_then_events(first_key: bytes, second: bytes) -> Any:
            answer = await real_get_pair(first_key, second)
            # While the answer travels: another write, and the watch applies both.
            await writer.put("acme", RECORD.replace(generation=2))
            for event in (created, await put_event(writer, store._tok("acme"))):
                store._apply_event(event, create=True)
            return answer

        monkeypatch.setattr(store.client, "get_pair", get_pair_then_events)
        got = await store.read("acme")
        assert got is not None, "read() answered None for a connected customer"
    finally:
        await store.aclose()
        await writer.aclose()


async def test_served_customer_whose_wait_timed_out_is_still_let_go(
        etcd_server: LocalEtcd, namespace: str) -> None:
    """Served mirror, a wait that times out.

    ``wait_for_change`` puts an Event in ``_waiters[customer]`` and, on timeout,
    returns without taking it out; only a later change of the customer (``_wake``)
    pops it. ``_let_go_idle`` skips every customer in ``_waiters``, so a customer
    whose last wait timed out and that never changes again stays followed (three
    watchers, its record in memory, its subscriber entries) forever, though nobody
    uses it: the served mirror's promise that memory and watch traffic follow the
    customers in use leaks one customer per timed-out wait. Lower severity (no
    invariant of the five; the documented ``idle_after`` contract)."""
    writer = await store_of(etcd_server, namespace)
    served = await store_of(etcd_server, namespace, mirror="served", idle_after=1.0)
    try:
        await writer.put("acme", RECORD)
        seen = await served.read("acme")
        assert seen is not None
        assert await served.wait_for_change("acme", seen.stamp, 0.1) is None  # nothing moved
        await asyncio.sleep(3.0)  # well past idle_after, and two idle sweeps
        assert "acme" not in served._followed, "an unused customer is never let go"
    finally:
        await served.aclose()
        await writer.aclose()
