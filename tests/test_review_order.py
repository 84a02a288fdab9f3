"""Adversarial review of place in line (commits 0cd3f0b, 2c57fbb): the etcd member
list and ``refresh_order``, ``RefreshPolicy.handoff`` and ``refresh_stagger``, and the
served mirror's ``_catch_up``.

Five findings, each fixed (the comment above each test says how; its docstring says
what broke); the other tests check a suspicion that held.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import pytest

import sfrtr.store.etcd as etcd_module
from sfrtr import (
    CoordinationTimeout,
    Intent,
    MemoryStore,
    OAuthClient,
    RefreshPolicy,
    Secret,
    TokenManager,
    TokenRecord,
    Versioned,
)
from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import oauth_config
from sfrtr.store.base import RefreshOrder
from sfrtr.store.etcd import EtcdStore, _rendezvous
from sfrtr.store.etcd_client import EtcdSettings, WatchEvent, delete, put
from sfrtr.store.etcd_launcher import LocalEtcd
from tests.conftest import emulator_grant, emulator_oauth
from tests.etcd_helpers import stop_following, until
from tests.etcd_helpers import store_of as _store_of

pytestmark = pytest.mark.anyio
store_of = functools.partial(_store_of, lease_ttl=6)

RECORD = TokenRecord(access_token=Secret("at-1"), refresh_token=Secret("rt-1"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0,
                     expires_at=time.time() + 3600)




def offline_oauth() -> OAuthClient:
    """An OAuth client that is never called (nothing listens on port 1)."""
    return OAuthClient(oauth_config("http://127.0.0.1:1", timeout=2.0, connect_timeout=1.0))


# -- finding 1: a lock deleted by its lease's expiry costs every served reader 0.25 s --


# Found by review; fixed: a lock deleted ahead of its record (a commit's, or a lease
# running out: it cannot tell) is given 25 ms, not 0.25 s: the pair's events come
# back to back on one stream.
async def test_served_read_of_a_lock_gone_with_its_lease_does_not_sleep(
        etcd_server: LocalEtcd, namespace: str) -> None:
    """Served mirror. Another process holds acme's lock (bound to its lease) and
    dies: etcd deletes the lock when the lease goes, one event on the lock watcher at
    a revision of its own, and nothing on the record watcher (the record keeps its
    intent). The served view now has ``lock_at > observed == changed``-wise split:
    ``_split()`` is true and ``read()`` waits in ``_catch_up`` for a record event that
    will never come, 0.25 s, then reads etcd anyway.

    Before 0cd3f0b the read went to etcd at once (one round trip, ~1 ms). Every
    reader pays it: each waiter woken by the lock's deletion (``wait_for_change``
    returns ``await self.read()``), in every process that follows the customer. It
    delays the start of the orphan's grace by 0.25 s and adds 0.25 s to a
    re-planning flight each time the lock of an orphan goes.

    Fix: a lock event needs a record event at its revision only when the Txn wrote
    both; a lock *delete* whose revision is newer than the record's can be a lease
    expiry. Rather than guess, ask the stream: a progress request
    (``WatchRequest.progress_request``) is answered after every event up to its
    revision has been sent on the stream, so one progress reply settles whether the
    other half exists (a round trip on the watch stream instead of a 0.25 s sleep);
    or skip the catch-up for lock deletes (commits put their record event first in
    most replies, and the cost of a miss is the old round trip)."""
    holder = await store_of(etcd_server, namespace)
    served = await store_of(etcd_server, namespace, mirror="served")
    try:
        await holder.put("acme", RECORD)
        assert await served.read("acme") is not None
        current = await holder.read("acme")
        assert current is not None
        held = await holder.acquire("acme", current.version,
                                    Intent("dying", "fp", 0.0, id="i1"))
        assert held is not None
        m = served._mirror["acme"]
        await until(lambda: m.locked and m.observed == m.lock_at == held.version)
        lease = holder.lease_id
        assert lease is not None
        await holder.client.revoke(lease)  # the holder's process is gone
        await until(lambda: not m.locked)
        assert m.lock_at > m.observed  # the lock's deletion, and nothing else
        started = time.monotonic()
        seen = await served.read("acme")
        took = time.monotonic() - started
        assert seen is not None
        assert not seen.locked
        assert seen.record.intent is not None
        assert took < 0.15, f"read() of an orphan slept {took:.3f}s waiting for no event"
    finally:
        await served.aclose()
        await holder.aclose()


# -- finding 2: O(processes) blake2b per record event, on the watch callback ------


# Found by review; fixed: the stagger is applied when an entry's refresh time first comes
# (TokenManager._stagger), once per refresh; a record event computes no order.
def test_a_record_event_costs_no_work_per_process() -> None:
    """``_on_store_change`` runs inside the store's watch task for every record change
    of a customer this process uses: on the namespace mirror, every event of a watch
    batch in one synchronous loop (``_apply_batch``). Since 2c57fbb each one calls
    ``refresh_order``, which hashes the customer with *every* live lease (one
    blake2b each, ~0.8 us with the loop around it). Measured here: ~9 us at 10
    processes, ~78 us at 100, ~790 us at 1,000, per event. A batch of 1,000 refreshes
    (a storm after an outage, a fleet connected at once, whose sessions all end
    together) stalls the loop ~80 ms with 100 workers, ~0.8 s with 1,000 (the shape
    ``docs/operations.md`` plans for with the served mirror) where it cost ~5 ms
    before: keepalives and every caller wait behind it (invariant 5's frozen loop;
    invariant 3's hot path itself is untouched: ``token()`` never calls it, see
    ``test_the_hot_path_never_asks_for_the_order``).

    Fix: make the order O(log P) or cached. A consistent-hash ring over the live
    leases' hashes (sorted once per membership change) gives each customer its
    successor list by bisect; or cache ``(place, processes)`` per customer keyed by
    a membership generation counter, and compute the stagger lazily (only when the
    entry's unstaggered refresh time comes, once per session rather than per event)."""
    store = EtcdStore(namespace="review-order")  # never started: no I/O below
    store._lease_id = 1
    store._members = set(range(1, 1001))
    manager = TokenManager(offline_oauth(), store, RefreshPolicy(lease_margin=0.5))
    calls = 0
    real = etcd_module._rendezvous

    def counting(lease: int, customer: bytes) -> bytes:
        nonlocal calls
        calls += 1
        return real(lease, customer)

    etcd_module._rendezvous = counting
    try:
        for version in range(1, 11):
            manager._on_store_change("acme", Versioned(RECORD, version, False, stamp=version))
    finally:
        etcd_module._rendezvous = real
    assert calls <= 10 * 16, f"{calls} hashes for 10 record events with 1,000 processes"


async def test_the_hot_path_never_asks_for_the_order() -> None:
    """Held: a fresh-token call (``token()``, ``credentials()``) reads the cached
    entry only; ``refresh_order`` is called when an entry is made, never per call
    (invariant 3)."""
    asked = 0

    class Ordered(MemoryStore):
        def refresh_order(self, customer: str) -> tuple[int, int]:
            nonlocal asked
            asked += 1
            return 1, 3

    store = Ordered()
    manager = TokenManager(offline_oauth(), store, RefreshPolicy(lease_margin=0.5))
    await store.put("acme", RECORD)
    first = await manager.token("acme")  # a flight: Use, one cache entry
    made = asked
    for _ in range(10_000):
        assert await manager.token("acme") == first
        assert (await manager.credentials("acme")).access_token == first
    assert asked == made
    await manager.aclose()


# -- the stagger's arithmetic --------------------------------------------------------


@pytest.mark.parametrize("margin", [0.0, 1.0, 300.0])
@pytest.mark.parametrize("stagger", [0.0, 0.5, 0.999999])
@pytest.mark.parametrize("order", [(0, 1), (1, 2), (999, 1000), (5, 3)])
def test_the_stagger_never_serves_past_the_estimated_expiry(
        margin: float, stagger: float, order: tuple[int, int]) -> None:
    """Held: ``refresh_at = expires_at - margin * (1 - stagger * place / processes)``
    with ``place < processes`` and ``stagger < 1`` is at or before the estimated
    expiry for every margin (equal to it at margin 0, as before), and never earlier
    than the unstaggered time. (``(5, 3)``, a place past the count, cannot come from
    ``refresh_order``; even then the entry stays inside the session as long as
    ``stagger * place / processes <= 1``; with stagger < 1 and place < processes
    that always holds.) The policy refuses ``refresh_stagger`` outside [0, 1)."""
    place, processes = order

    class Ordered(MemoryStore):
        def refresh_order(self, customer: str) -> tuple[int, int]:
            return place, processes

    manager = TokenManager(offline_oauth(), Ordered(),
                           RefreshPolicy(lease_margin=0.5, refresh_margin=margin,
                                         refresh_stagger=stagger))
    entry = manager._cache_put("acme", RECORD, 1)
    if stagger * place / processes <= 1:
        assert entry.refresh_at <= entry.expires_at
    assert entry.refresh_at >= entry.expires_at - margin - 1e-6
    for bad in (1.0, -0.1, 2.0):
        with pytest.raises(Exception, match="refresh_stagger"):
            RefreshPolicy(refresh_stagger=bad)


# -- finding 3: the handoff spends the flight's deadline --------------------------


class Behind(MemoryStore):
    """A memory store whose process is second of two in line for every customer."""

    def refresh_order(self, customer: str) -> RefreshOrder:
        return RefreshOrder(1, 2, True)


async def released_at_the_deadline(emulator: Emulator, handoff: float) -> Any:
    """Another worker holds acme's lock; the flight of a 401 waits on it; the holder
    gives up without sending (NOT_SENT: the record back as it was, lock released)
    just as the flight's ``wait_timeout`` runs out. Returns the flight's result (or
    its exception)."""
    store = Behind()
    manager = TokenManager(emulator_oauth(emulator), store,
                           RefreshPolicy(lease_margin=0.5, wait_timeout=0.5,
                                         handoff=handoff))
    try:
        record = await manager.connect("acme", emulator_grant(emulator, "acme"))
        stale = record.access_token.reveal()
        current = await store.read("acme")
        assert current is not None
        held = await store.acquire("acme", current.version, Intent("other", "fp", 0.0,
                                                                   id="o1"))
        assert held is not None
        real_wait = store.wait_for_change

        async def holder_gives_up_at_the_deadline(customer: str, after: int,
                                                  timeout: float) -> Versioned | None:
            if customer in store._locked:
                await asyncio.sleep(timeout + 0.01)
                back = await store.commit("acme", held.version, current.record)
                assert back is not None
                return None
            return await real_wait(customer, after, timeout)

        store.wait_for_change = holder_gives_up_at_the_deadline  # type: ignore[method-assign]
        try:
            return await manager.refresh("acme", stale=stale)
        except CoordinationTimeout as exc:
            return exc
    finally:
        await manager.aclose()


async def test_without_handoff_a_flight_freed_at_its_deadline_refreshes(
        emulator: Emulator) -> None:
    """The control for the test below: with ``handoff=0`` the flight that finds the
    customer free as its deadline passes refreshes it (as before 2c57fbb)."""
    got = await released_at_the_deadline(emulator, handoff=0.0)
    assert not isinstance(got, Exception), got
    assert emulator.ledger["redemptions"] == 1


# Found by review; fixed: no handoff once the flight's deadline has passed; RefreshPolicy refuses
# handoff >= wait_timeout.
async def test_a_flight_freed_at_its_deadline_is_not_failed_by_the_handoff(
        emulator: Emulator) -> None:
    """Default handoff (0.2 s), this process second in line. A 401's flight waits on
    another worker's lock; that worker's section ends without sending (connection
    refused, lease too short: the record is put back, the lock released) just as the
    flight's ``wait_timeout`` runs out. The flight re-plans: Redeem, urgent (a stale
    token), not first in line, so it goes to ``_wait(cap=handoff)``, and ``_wait``
    raises ``CoordinationTimeout`` because the deadline has passed, though nobody
    holds the customer and a refresh could start at once (and did, before 2c57fbb:
    see the control above). The same happens whenever ``wait_timeout`` is spent
    before the first Redeem (a slow Wait, a long catch-up) and, with a
    ``wait_timeout`` shorter than ``handoff`` (the policy does not refuse it), the
    handoff alone uses the whole budget, so a flight that then finds the first's lock
    raises at once instead of waiting on it.

    Fix: the handoff is advice, never a reason to fail: skip it when the deadline
    has passed (``if deadline - _monotonic() > 0``), and cap it at what is left
    without raising; and refuse ``handoff >= wait_timeout`` in the policy."""
    got = await released_at_the_deadline(emulator, handoff=0.2)
    assert not isinstance(got, Exception), got
    assert emulator.ledger["redemptions"] == 1


# -- a member that outlives its process: the wait is bounded, once per flight ------


async def test_a_dead_first_in_line_costs_one_handoff_per_flight(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str, mirror: str) -> None:
    """Held. A member key whose process is gone but whose lease has not expired yet
    (a SIGKILLed or paused process: up to a lease TTL) is first in line for a
    customer. A 401 on a live process: its flight defers once (one wait capped at
    ``handoff``), then refreshes itself. The flight re-plans through Wait (another
    worker took the lock meanwhile and gave up without sending) and comes back to
    Redeem: no second handoff. Everyone else deferring to the dead process pays the
    same once per flight while its key lives."""
    live = await store_of(etcd_server, namespace, mirror=mirror)
    other = await store_of(etcd_server, namespace)
    manager = TokenManager(emulator_oauth(emulator), live,
                           RefreshPolicy(lease_margin=0.5, handoff=1.0))
    ghost_lease, _ = await live.client.grant(60)
    try:
        await live.client.txn([], [put(live._member_prefix() + b"%016x" % ghost_lease, b"",
                                       lease=ghost_lease)])
        leases = {live.lease_id, other.lease_id, ghost_lease}
        await until(lambda: live._members == leases)
        customer = next(c for c in (f"c{i}" for i in range(1000))
                        if max(leases, key=lambda lease: _rendezvous(
                            lease, c.encode())) == ghost_lease)
        record = await manager.connect(customer, emulator_grant(emulator, customer))
        # The ghost refreshed the customer last: its lock came and went.
        lock = live._lock(customer)
        await live.client.txn([], [put(lock, b"ghost", lease=ghost_lease)])
        await live.client.txn([], [delete(lock)])
        await until(lambda: live.refresh_order(customer).place > 0 and
                    live.refresh_order(customer).known and
                    not live._mirror[customer].locked)
        stale = record.access_token.reveal()
        caps: list[float | None] = []
        handing_off = asyncio.Event()
        real_wait = manager._wait

        async def recording(customer_: str, seen: Versioned, deadline: float,
                            cap: float | None = None) -> None:
            caps.append(cap)
            if cap == 1.0:
                handing_off.set()
            await real_wait(customer_, seen, deadline, cap)

        manager._wait = recording  # type: ignore[method-assign]
        started = time.monotonic()
        asking = asyncio.create_task(manager.refresh(customer, stale=stale))
        await asyncio.wait_for(handing_off.wait(), 5)
        current = await other.read(customer)
        assert current is not None
        held = await other.acquire(customer, current.version,
                                   Intent("other", "fp", 0.0, id="x1"))
        assert held is not None
        await asyncio.sleep(0.3)  # the flight sees the lock: Wait
        assert not asking.done()
        assert await other.commit(customer, held.version, current.record) is not None
        fresh = await asyncio.wait_for(asking, 10)
        took = time.monotonic() - started
        assert fresh.access_token != stale
        assert emulator.ledger["redemptions"] == 1
        assert caps.count(1.0) == 1, caps  # one handoff, not one per Redeem
        assert None in caps  # it did wait on the other's lock in between
        assert took < 1.0 + 0.3 + 2.5 + 1.0, took
    finally:
        await manager.aclose()
        await other.aclose()
        await live.client.revoke(ghost_lease)


# -- _catch_up beside wait_for_change and the idle sweep ----------------------------


async def test_catch_up_beside_a_waiter_loses_no_wake_up_and_keeps_its_customer(
        etcd_server: LocalEtcd, namespace: str) -> None:
    """Held. Served mirror, its watch stopped so the test delivers the events: an
    acquire's lock event is applied, its record event is not (a split view). A
    ``wait_for_change`` from the state before (woken by the lock event, it reads,
    and so enters ``_catch_up`` too) and a ``read()`` wait side by side on the one
    shared event of ``_waiters``; the idle sweep runs meanwhile with every
    customer past its idle time. The sweep keeps the customer (both waits count in
    ``_waiting``); when the record event comes, both wake, the read answers the
    whole acquire (locked, with its intent) from the mirror with no round trip, and
    the waiter gets it too. Then neither leaves an event behind in ``_waiters``."""
    holder = await store_of(etcd_server, namespace)
    served = await store_of(etcd_server, namespace, mirror="served")
    try:
        await holder.put("acme", RECORD)
        seen = await served.read("acme")
        assert seen is not None
        await stop_following(served)
        held = await holder.acquire("acme", seen.version, Intent("w", "fp", 0.0, id="i1"))
        assert held is not None

        async def event_of(key: bytes) -> WatchEvent:
            _, (kv,) = await served.client.range(key)
            return WatchEvent("put", kv)

        lock_event, tok_event = await event_of(served._lock("acme")), \
            await event_of(served._tok("acme"))
        waiting = asyncio.create_task(served.wait_for_change("acme", seen.stamp, 5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        trips = served.client.round_trips
        served._apply_event(lock_event, create=False)
        m = served._mirror["acme"]
        assert served._split("acme", m)
        reading = asyncio.create_task(served.read("acme"))
        await asyncio.sleep(0.05)  # both in _catch_up now, on one event
        served._let_go_idle(time.monotonic() + 1000)
        assert "acme" in served._mirror
        assert "acme" in served._followed
        assert not reading.done()
        assert not waiting.done()
        served._apply_event(tok_event, create=False)
        got = await asyncio.wait_for(reading, 0.2)
        assert got is not None
        assert got.locked
        assert got.version == held.version
        assert got.record.intent is not None
        woke = await asyncio.wait_for(waiting, 1.0)
        assert woke is not None
        assert woke.version == held.version
        assert woke.locked
        assert served.client.round_trips == trips
        assert "acme" not in served._waiters
        assert "acme" not in served._waiting
    finally:
        await served.aclose()
        await holder.aclose()


# -- finding 4: in a routed fleet, the first in line is almost never interested ----


# Found by review; fixed: the last lock holder (a process known to use the customer) is first in
# line while it lives, and only such a known first is deferred to; none known: no handoff.
async def test_the_only_process_that_uses_a_customer_does_not_wait_for_the_handoff(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str) -> None:
    """Two processes, default policy (handoff 0.2 s). Only the second ever uses
    ``acme``-like customers (requests routed by customer: ``docs/operations.md``
    plans a 1,000-worker fleet with each customer served by k of them); the first is
    first in line for half of them. A 401 on the second waits the full handoff before
    it acquires, every time: with P processes and k serving each customer, a share
    (P - k) / P of every urgent refresh pays it (99.8% at P=1,000, k=2), where it cost
    nothing before 2c57fbb. The refresh itself is one acquire either way.

    This contradicts ``test_refresh_order.py::test_a_process_behind_an_idle_first_
    refreshes_after_the_handoff``, which accepts the wait as designed; it is here as a
    design finding. Fix options: put only interested processes in line (the last
    refresher's lease, written into the record at commit, is a live signal of
    interest: let it be first when it is a live member, the rendezvous order
    otherwise); or a far shorter default handoff (a lock reaches a mirror on the same
    network in a few ms; 0.2 s buys slack on loaded test machines)."""
    stores = [await store_of(etcd_server, namespace, mirror="served") for _ in range(2)]
    manager = TokenManager(emulator_oauth(emulator), stores[1], RefreshPolicy(lease_margin=0.5))
    try:
        await until(lambda: all(s._members == {t.lease_id for t in stores} for s in stores))
        customer = next(c for c in (f"c{i}" for i in range(100))
                        if stores[0].refresh_order(c)[0] == 0)
        record = await manager.connect(customer, emulator_grant(emulator, customer))
        started = time.monotonic()
        fresh = await manager.refresh(customer, stale=record.access_token.reveal())
        took = time.monotonic() - started
        assert fresh.access_token != record.access_token.reveal()
        assert took < 0.1, f"a lone 401 took {took:.3f}s: it waited for an idle first in line"
    finally:
        await manager.aclose()
        for s in stores:
            await s.aclose()


# -- finding 5: a membership announcement that failed is never made again ----------


# Found by review; fixed: _announce tries again every second while its lease is the process's.
async def test_a_failed_announcement_is_made_again(etcd_server: LocalEtcd,
                                                   namespace: str) -> None:
    """A process whose member key could not be written right after its grant (one
    failed Txn) is never announced: the others' ``refresh_order`` leaves it out for as
    long as its lease lives (days, for a healthy process), so it is never first in
    anyone's line; for the customers it ranks first for in its own view, it and the
    others' first both go at once (two acquires, one fails its compare: the
    behaviour before 0cd3f0b, for that share of customers). Only the optimisation is
    lost, never safety. Fix: retry the put from the keepalive loop while the lease's
    own key is missing from ``_members`` (the member watch tells)."""
    from sfrtr.errors import StoreError

    first = await store_of(etcd_server, namespace)
    second = EtcdStore(EtcdSettings(endpoints=[etcd_server.endpoint]), namespace=namespace,
                       lease_ttl=6)
    real_txn = second.client.txn
    failed = 0

    async def flapping(compares: Any, success: Any, failure: Any = ()) -> Any:
        nonlocal failed
        if not failed:
            failed += 1
            raise StoreError("etcd unavailable (injected)")
        return await real_txn(compares, success, failure)

    second.client.txn = flapping  # type: ignore[method-assign]
    await second.start()
    try:
        await until(lambda: failed == 1)
        want = {first.lease_id, second.lease_id}
        try:
            await until(lambda: first._members == want == second._members, timeout=4.0)
        except TimeoutError:
            pytest.fail(f"the second process is not a member after 4 s: {first._members}")
    finally:
        await second.aclose()
        await first.aclose()


# -- the member list through lease loss, restarts and compaction -------------------


async def test_a_regranted_process_counts_twice_only_until_its_old_lease_expires(
        etcd_server: LocalEtcd, namespace: str) -> None:
    """Held. A process that drops its lease locally (its deadline passed: a stall, a
    slow keepalive answer) takes a new one and announces it; its old lease still
    lives on etcd until its TTL runs out, and its member key with it. Meanwhile the
    other processes count it twice (three places for two processes; the old lease
    may even be first in line for some customers, and they defer to it once per
    flight, as to a dead process); the process itself knows the old lease for its
    own. It ends with the old lease's TTL: the member list is exact again, in both
    processes."""
    one = await store_of(etcd_server, namespace, lease_ttl=3)
    two = await store_of(etcd_server, namespace, lease_ttl=3)
    try:
        await until(lambda: one._members == two._members == {one.lease_id, two.lease_id})
        old = one.lease_id
        one._lose_lease("test: the local deadline passed")
        await until(lambda: one.lease_id is not None)
        new = one.lease_id
        assert new != old
        await until(lambda: one._members == two._members == {old, new, two.lease_id})
        # The other process counts it twice; it knows its old lease for its own.
        assert (one.refresh_order("acme")[1], two.refresh_order("acme")[1]) == (2, 3)
        # The old lease is no longer kept alive: gone within its TTL (plus etcd's
        # expiry sweep), and its key with it.
        await until(lambda: one._members == two._members == {new, two.lease_id},
                    timeout=3 + 3)
        assert {one.refresh_order("acme")[1], two.refresh_order("acme")[1]} == {2}
    finally:
        await one.aclose()
        await two.aclose()


async def test_the_member_list_is_rebuilt_after_a_restart_past_a_compaction(
        etcd_server: LocalEtcd, namespace: str) -> None:
    """Held. The member watch of a process is down (its task stopped, as when its
    stream died silently) while a process leaves and etcd compacts its history past
    the leave; ``_restart_watch`` (a broken keepalive stream) starts it again: it
    reloads the list at one revision and watches from there, so the leaver is gone
    and a process that joins afterwards is seen."""
    stores = [await store_of(etcd_server, namespace) for _ in range(3)]
    late: EtcdStore | None = None
    try:
        leases = {s.lease_id for s in stores}
        await until(lambda: all(s._members == leases for s in stores))
        watcher = stores[0]
        members_task = watcher._tasks[3]
        members_task.cancel()
        await asyncio.gather(members_task, return_exceptions=True)
        await stores[2].aclose()  # leaves: its lease is revoked, its key deleted
        revision, _ = await watcher.client.range(b"nothing")
        await watcher.client.compact(revision)
        assert watcher._members == leases  # stale while the watch is down
        watcher._restart_watch()
        live = {stores[0].lease_id, stores[1].lease_id}
        await until(lambda: watcher._members == live)
        late = await store_of(etcd_server, namespace)
        await until(lambda: watcher._members == live | {late.lease_id})
    finally:
        for s in [*stores, *([late] if late else [])]:
            await s.aclose()


async def test_catch_up_ends_when_its_customer_is_unfollowed(etcd_server: LocalEtcd,
                                                             namespace: str) -> None:
    """Held. A read waiting in ``_catch_up`` on a split view whose customer's watcher
    is compacted (``_read_watchers``: unfollow, forget, wake, follow again): the wake
    ends the wait at once (the customer is no longer followed, so the view is no
    longer "one event short"), and the read answers from the fresh load, consistent
    (the acquire, locked), well inside the 0.25 s."""
    holder = await store_of(etcd_server, namespace)
    served = await store_of(etcd_server, namespace, mirror="served")
    try:
        await holder.put("acme", RECORD)
        seen = await served.read("acme")
        assert seen is not None
        await stop_following(served)
        held = await holder.acquire("acme", seen.version, Intent("w", "fp", 0.0, id="i1"))
        assert held is not None
        _, (kv,) = await served.client.range(served._lock("acme"))
        served._apply_event(WatchEvent("put", kv), create=False)
        assert served._split("acme", served._mirror["acme"])
        started = time.monotonic()
        reading = asyncio.create_task(served.read("acme"))
        await asyncio.sleep(0.02)
        assert not reading.done()
        # What _read_watchers does with a compacted watcher:
        watch_id = served._followed["acme"] + 1
        served._unfollow("acme", gone=watch_id)
        served._forget("acme")
        served._wake("acme")
        served._spawn(served._refollow("acme"))
        got = await asyncio.wait_for(reading, 1.0)
        assert time.monotonic() - started < 0.2
        assert got is not None
        assert got.locked
        assert got.version == held.version
    finally:
        await served.aclose()
        await holder.aclose()
