"""Place in line: the etcd store's member list, and what the manager does with it.

Every process of a namespace announces itself with a key bound to its lease; for
each customer, rendezvous hashing over the live leases puts one process first.
A refresh forced on everyone at once (a 401) is then sent by that one process
while the others give its lock a moment to show (``RefreshPolicy.handoff``), and
a refresh ahead of expiry comes later the further a process is in line
(``refresh_stagger``). Real etcd, the emulator over sockets, both mirrors.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from sfrtr import RefreshPolicy, TokenManager
from sfrtr.emulator import Emulator
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcd
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio


def a_store(server: LocalEtcd, namespace: str, mirror: str) -> EtcdStore:
    return EtcdStore(EtcdSettings(endpoints=[server.endpoint]), namespace=namespace,
                     lease_ttl=10, mirror=mirror)  # type: ignore[arg-type]


async def know_each_other(stores: list[EtcdStore], timeout: float = 10.0) -> None:
    """Until every store's member list holds exactly the stores' live leases."""
    async with asyncio.timeout(timeout):
        while any(s._members != {t.lease_id for t in stores} for s in stores):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def managers_of(emulator: Emulator, server: LocalEtcd, namespace: str, mirror: str,
                      count: int, **policy: object) -> list[TokenManager]:
    policy.setdefault("lease_margin", 0.5)
    managers = [TokenManager(emulator_oauth(emulator), a_store(server, namespace, mirror),
                             RefreshPolicy(**policy), worker_id=f"w{i}")  # type: ignore[arg-type]
                for i in range(count)]
    for m in managers:
        await m.store.start()  # type: ignore[attr-defined]
    await know_each_other([m.store for m in managers])  # type: ignore[misc]
    return managers


def first_in_line(managers: list[TokenManager], customer: str) -> list[TokenManager]:
    return [m for m in managers if m.store.refresh_order(customer)[0] == 0]  # type: ignore[attr-defined]


async def test_each_customer_has_one_process_first_and_a_leaver_moves_only_its_own(
        etcd_server: LocalEtcd, namespace: str, mirror: str):
    stores = [a_store(etcd_server, namespace, mirror) for _ in range(3)]
    for s in stores:
        await s.start()
    try:
        await know_each_other(stores)
        customers = [f"c{i}" for i in range(300)]
        first: dict[str, int] = {}
        for c in customers:
            orders = [s.refresh_order(c)[:2] for s in stores]
            assert sorted(orders) == [(0, 3), (1, 3), (2, 3)], c  # one order, agreed on
            first[c] = next(i for i, o in enumerate(orders) if o[0] == 0)
        counts = Counter(first.values())
        assert all(counts[i] >= 50 for i in range(3)), counts  # ~100 each (a hash)
        await stores[2].aclose()  # its lease is revoked: its member key goes with it
        await know_each_other(stores[:2])
        for c in customers:
            orders = [s.refresh_order(c)[:2] for s in stores[:2]]
            assert sorted(orders) == [(0, 2), (1, 2)]
            if first[c] != 2:  # rendezvous: only the leaver's customers move
                assert orders[first[c]] == (0, 2)
    finally:
        for s in stores:
            await s.aclose()


async def test_a_store_alone_or_without_a_lease_is_first(etcd_server: LocalEtcd,
                                                         namespace: str, mirror: str):
    store = a_store(etcd_server, namespace, mirror)
    assert store.refresh_order("acme") == (0, 1, False)  # not started: no lease, no members
    await store.start()
    try:
        await know_each_other([store])
        assert store.refresh_order("acme") == (0, 1, False)
    finally:
        await store.aclose()


async def test_a_401_on_every_process_at_once_costs_the_fleet_one_acquire(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str, mirror: str):
    """Four processes get a 401 for one customer at the same moment: the one that
    refreshed it last (first in line while it lives) acquires and commits; the other
    three see its lock during their handoff, wait on it and send nothing. (A handoff
    of 5 s: on a loaded machine the lock may take a while to show; the mechanism,
    not the default, is under test.)"""
    managers = await managers_of(emulator, etcd_server, namespace, mirror, 4, handoff=5.0)
    try:
        await managers[0].connect("acme", emulator_grant(emulator, "acme"))
        for m in managers:
            await m.token("acme")
        # managers[2] refreshed it last: every process saw its lock.
        stale = (await managers[2].refresh("acme", stale=await managers[2].token("acme"))
                 ).access_token
        async def everyone_saw_it() -> bool:
            # Every process has the new token and knows managers[2] held the lock (a
            # served mirror hears the lock's put on a watcher of its own, maybe late).
            return [await m.token("acme") for m in managers] == [stale] * 4 and \
                first_in_line(managers, "acme") == [managers[2]] and \
                all(m.store.refresh_order("acme").known for m in managers)  # type: ignore[attr-defined]

        async with asyncio.timeout(10):
            while not await everyone_saw_it():  # noqa: ASYNC110 (the watches move it)
                await asyncio.sleep(0.02)
        assert all(m.store.refresh_order("acme").known for m in managers[:2])  # type: ignore[attr-defined]
        redeemed = emulator.ledger["redemptions"]
        stores = [m.store for m in managers]
        before = [s.client.round_trips for s in stores]  # type: ignore[attr-defined]
        fresh = await asyncio.gather(*(m.refresh("acme", stale=stale) for m in managers))
        trips = [s.client.round_trips - b for s, b in zip(stores, before, strict=True)]  # type: ignore[attr-defined]
        assert len({f.access_token for f in fresh}) == 1
        assert fresh[0].access_token != stale
        assert emulator.ledger["redemptions"] == redeemed + 1
        assert emulator.ledger["reuse"] == 0
        assert trips[2] == 2  # acquire + commit, by the last holder
        assert sum(trips) == 2  # the others sent nothing
    finally:
        for m in managers:
            await m.aclose()


async def test_a_process_behind_an_idle_holder_refreshes_after_the_handoff(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str, mirror: str):
    """The process that refreshed a customer last is first in line; when another one
    gets a 401 and that one does not need the customer, the other waits out the
    handoff (no lock comes), refreshes itself, and is first from then on: the next
    401 there costs no wait (a handoff of 30 s: it is done long before)."""
    managers = await managers_of(emulator, etcd_server, namespace, mirror, 2, handoff=1.0)
    try:
        holder, other = managers
        await holder.connect("acme", emulator_grant(emulator, "acme"))
        await other.token("acme")
        refreshed = await holder.refresh("acme", stale=await holder.token("acme"))
        # Both of the holder's events must have reached the other process: the acquire's
        # lock (the order) and the commit's record (its cache). The lock's alone, on a
        # loaded machine, left the other serving the token the holder had just replaced,
        # so its "401" below was for an old token and adopted the new one at once.
        async with asyncio.timeout(10):
            while other.store.refresh_order("acme") != (1, 2, True) or \
                    await other.token("acme") != refreshed.access_token:  # type: ignore[attr-defined]  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        stale = await other.token("acme")
        started = time.monotonic()
        fresh = await other.refresh("acme", stale=stale)
        assert time.monotonic() - started >= 1.0  # it deferred to the idle holder
        assert fresh.access_token != stale
        assert other.store.refresh_order("acme") == (0, 2, True)  # type: ignore[attr-defined]
        other.policy = RefreshPolicy(lease_margin=0.5, handoff=30.0)
        async with asyncio.timeout(10):  # a third of the handoff it would wait if not first
            again = await other.refresh("acme", stale=fresh.access_token)
        assert again.access_token != fresh.access_token
        assert emulator.ledger["redemptions"] == 3
        assert emulator.ledger["reuse"] == 0
    finally:
        for m in managers:
            await m.aclose()


async def test_a_lone_401_with_no_holder_known_does_not_wait(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str, mirror: str):
    """No process has refreshed the customer yet (just connected): nobody is known to
    use it, so a 401 anywhere acquires at once, whatever the hash order says."""
    managers = await managers_of(emulator, etcd_server, namespace, mirror, 2, handoff=30.0)
    try:
        customer = next(f"c{i}" for i in range(100)
                        if first_in_line(managers, f"c{i}")[0] is managers[0])
        await managers[1].connect(customer, emulator_grant(emulator, customer))
        stale = await managers[1].token(customer)
        assert managers[1].store.refresh_order(customer) == (1, 2, False)  # type: ignore[attr-defined]
        async with asyncio.timeout(10):
            fresh = await managers[1].refresh(customer, stale=stale)
        assert fresh.access_token != stale
    finally:
        for m in managers:
            await m.aclose()


async def test_later_in_line_refreshes_later_ahead_of_expiry(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str, mirror: str):
    """Sessions estimated at 6 s, refreshed 3 s ahead, stagger 0.9: the first in line
    refreshes 3 s before the estimated expiry; the second, when that time comes,
    moves its turn to 1.65 s before. Both keep calling; the second finds the first's
    new record before its turn: one redemption and no etcd round trip from the
    second process."""
    managers = await managers_of(emulator, etcd_server, namespace, mirror, 2,
                                 session_lifetime=6.0, refresh_margin=3.0,
                                 refresh_stagger=0.9)
    try:
        customer = "acme"
        # Slow token answers (0.3 s): the second's turn (callers every 20 ms) comes
        # while the first's refresh is under way, so its place in line is applied.
        emulator.faults.set("token", latency=0.3)
        (first,) = first_in_line(managers, customer)
        second = managers[1 - managers.index(first)]
        await first.connect(customer, emulator_grant(emulator, customer))
        stale = await first.token(customer)
        assert await second.token(customer) == stale
        entries = {m: m._cache[customer] for m in managers}
        for entry in entries.values():  # the place in line is applied when the time comes
            assert entry.expires_at - entry.refresh_at == pytest.approx(3.0)
        before = second.store.client.round_trips  # type: ignore[attr-defined]
        tokens: dict[TokenManager, set[str]] = {m: set() for m in managers}

        async def keep_calling(m: TokenManager) -> None:
            while time.monotonic() < until:
                tokens[m].add(await m.token(customer))
                await asyncio.sleep(0.02)

        until = time.monotonic() + 5.0  # past the first's turn (3 s) and the second's (4.35 s)
        await asyncio.gather(*(keep_calling(m) for m in managers))
        assert emulator.ledger["redemptions"] == 1
        assert len(tokens[second] - {stale}) == 1  # it moved to the first's new token
        assert tokens[second] - {stale} == tokens[first] - {stale}
        assert second.store.client.round_trips == before  # type: ignore[attr-defined]
        # The second's old entry came due at 3 s and was moved to 1.65 s before expiry.
        assert entries[second].staggered
        assert entries[second].expires_at - entries[second].refresh_at == \
            pytest.approx(3.0 - 3.0 * 0.9 / 2)
        assert entries[first].expires_at - entries[first].refresh_at == pytest.approx(3.0)
    finally:
        for m in managers:
            await m.aclose()
