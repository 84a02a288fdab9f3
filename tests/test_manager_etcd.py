"""The token manager on the etcd store, several "processes" (stores with their own
leases) in one test process: round trips, storms, cancellation, recovery."""

from __future__ import annotations

import asyncio
import random
import sys
import time

import pytest

from sfrtr import (
    LeaseLost,
    RefreshIndeterminate,
    RefreshPolicy,
    Status,
    TokenManager,
)
from sfrtr.emulator import Emulator
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcd
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio


MIRROR = "namespace"


@pytest.fixture(autouse=True, params=["namespace", "served"])
def _every_mirror(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs on both of the etcd store's mirrors."""
    monkeypatch.setattr(sys.modules[__name__], "MIRROR", request.param)


async def etcd_manager(em: Emulator, server, namespace: str, **policy: object) -> TokenManager:
    """A manager on its own store and lease (a process, as etcd sees it).

    Short lease (4 s) and provider timeout (1.2 s, 1.7 s with its answer graces) so
    lease expiry is quick to test; the manager refuses a lease too short for them.
    """
    store = EtcdStore(EtcdSettings(endpoints=[server.endpoint]), namespace=namespace,
                      lease_ttl=4, mirror=MIRROR)  # type: ignore[arg-type]
    await store.start()
    policy.setdefault("lease_margin", 0.5)
    return TokenManager(emulator_oauth(em, timeout=1.2, connect_timeout=0.5), store,
                        RefreshPolicy(**policy))  # type: ignore[arg-type]


async def test_uncontended_refresh_costs_two_round_trips_and_fresh_calls_none(
        emulator: Emulator, etcd_server, namespace):
    manager = await etcd_manager(emulator, etcd_server, namespace)
    store = manager.store
    assert isinstance(store, EtcdStore)
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    await asyncio.sleep(0.1)  # the watch echo of our own write
    before = store.client.round_trips
    creds = await manager.refresh("acme", stale=record.access_token.reveal())
    assert store.client.round_trips - before == 2  # acquire + commit
    before = store.client.round_trips
    for _ in range(1000):
        assert await manager.token("acme") == creds.access_token
    assert store.client.round_trips - before == 0
    assert emulator.ledger["redemptions"] == 1
    await manager.aclose()


async def test_other_process_learns_the_new_token_from_the_watch(emulator: Emulator,
                                                                  etcd_server, namespace):
    a = await etcd_manager(emulator, etcd_server, namespace)
    b = await etcd_manager(emulator, etcd_server, namespace)
    record = await a.connect("acme", emulator_grant(emulator, "acme"))
    # b serves acme (its first use reads the record: the mirror keeps records only
    # of customers this process uses); from then on the watch keeps it current.
    assert await b.token("acme") == record.access_token.reveal()
    creds = await a.refresh("acme", stale=record.access_token.reveal())
    for _ in range(100):
        if b._cache.get("acme") and b._cache["acme"].token == creds.access_token:
            break
        await asyncio.sleep(0.02)
    before = b.store.client.round_trips  # type: ignore[attr-defined]
    assert await b.token("acme") == creds.access_token
    assert b.store.client.round_trips == before  # type: ignore[attr-defined]
    await a.aclose()
    await b.aclose()


async def test_storm_across_four_stores_one_redemption_per_expiry(emulator: Emulator,
                                                                   etcd_server, namespace):
    managers = [await etcd_manager(emulator, etcd_server, namespace) for _ in range(4)]
    customers = [f"c{i}" for i in range(10)]
    for c in customers:
        await managers[0].connect(c, emulator_grant(emulator, c))
    await asyncio.sleep(0.2)
    emulator.faults.set("token", latency=0.05)
    for round_ in range(3):
        stale = {c: await managers[0].token(c) for c in customers}
        emulator.expire_sessions()
        results = await asyncio.gather(*(m.refresh(c, stale=stale[c]) for m in managers
                                         for c in customers for _ in range(20)))
        assert emulator.ledger["redemptions"] == 10 * (round_ + 1)
        for c in customers:
            assert len({r.access_token for r, (_, cc) in zip(
                results, [(m, c2) for m in managers for c2 in customers for _ in range(20)],
                strict=True) if cc == c}) == 1
    assert emulator.ledger["reuse"] == 0
    assert emulator.ledger["concurrent_rejections"] == 0
    for m in managers:
        await m.aclose()


async def test_cancelling_callers_at_every_point_strands_nobody(emulator: Emulator,
                                                                etcd_server, namespace):
    manager = await etcd_manager(emulator, etcd_server, namespace)
    emulator.faults.set("token", latency=0.1)
    rng = random.Random(7)
    for round_ in range(8):
        customer = f"c{round_}"
        record = await manager.connect(customer, emulator_grant(emulator, customer))
        stale = record.access_token.reveal()
        callers = [asyncio.create_task(manager.refresh(customer, stale=stale))
                   for _ in range(30)]
        # Cancel a third of them, each at a different moment of the refresh.
        doomed = rng.sample(callers, 10)
        for task in doomed:
            await asyncio.sleep(rng.uniform(0, 0.03))
            task.cancel()
        survivors = [t for t in callers if t not in doomed]
        tokens = {(await t).access_token for t in survivors}
        assert len(tokens) == 1
        for task in doomed:
            if not task.cancelled():  # finished before the cancel landed
                assert (await task).access_token in tokens
        current = await manager.store.read(customer)
        assert current.record.status is Status.VALID
        assert not current.locked
    assert emulator.ledger["redemptions"] == 8
    await manager.aclose()


async def test_lease_revoked_before_the_intent_never_calls_the_provider(
        emulator: Emulator, etcd_server, namespace):
    manager = await etcd_manager(emulator, etcd_server, namespace)
    store = manager.store
    assert isinstance(store, EtcdStore)
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    await store.client.revoke(store.lease_id)  # from outside, as an operator would
    with pytest.raises(LeaseLost):
        await manager.refresh("acme", stale=record.access_token.reveal())
    assert emulator.ledger["redemptions"] == 0
    current = await store.read("acme")
    assert current.record.status is Status.VALID
    await manager.aclose()


@pytest.mark.parametrize("recovery", ["introspect", "fail_closed"])
async def test_orphan_of_a_dead_process_is_recovered_after_its_lease(emulator: Emulator,
                                                                     etcd_server, namespace,
                                                                     recovery):
    """A process died holding the lock, before sending: under the default policy the
    customer ends in a refresh (invariant 4); ``fail_closed`` pays a re-authorization."""
    dead = await etcd_manager(emulator, etcd_server, namespace)
    survivor = await etcd_manager(emulator, etcd_server, namespace, recovery=recovery)
    try:
        record = await dead.connect("acme", emulator_grant(emulator, "acme"))
        current = await dead.store.read("acme")
        assert await dead.store.acquire("acme", current.version, dead._intent(record))
        # The process dies holding the lock: no commit, no release, no revoke.
        tasks = dead.store._tasks  # type: ignore[attr-defined]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        started = time.monotonic()
        grace = survivor._grace(orphan=True)
        if recovery == "introspect":
            creds = await survivor.refresh("acme", stale=record.access_token.reveal())
            assert creds.access_token != record.access_token.reveal()
            assert emulator.ledger["redemptions"] == 1
            assert (await survivor.store.read("acme")).record.status is Status.VALID
        else:
            with pytest.raises(RefreshIndeterminate):
                await survivor.refresh("acme", stale=record.access_token.reveal())
            assert emulator.ledger["redemptions"] == 0
            assert (await survivor.store.read("acme")).record.status is Status.REAUTH_REQUIRED
        took = time.monotonic() - started
        print(f"\norphan of a dead process ({recovery}): settled in {took:.1f}s")
        assert grace <= took < 4 + grace + 2  # lease TTL + grace + slack
        assert emulator.ledger["reuse"] == 0
    finally:
        await survivor.aclose()
        await dead.store.client.close()  # type: ignore[attr-defined]


async def test_a_spread_acquire_waits_on_a_lock_it_sees_instead_of_a_failed_compare(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str):
    """Two processes refresh one customer at once with ``acquire_spread``: the one that
    looks second sees the first one's lock in its mirror and waits on it, so etcd gets
    the winner's acquire and commit and no acquire that cannot win. (The worker ids
    seed the spread: 4 ms and 243 ms, far apart whatever the machine's load.)"""
    policy = RefreshPolicy(acquire_spread=0.4, lease_margin=0.5, handoff=0.0)
    managers = [TokenManager(emulator_oauth(emulator), EtcdStore(
        EtcdSettings(endpoints=[etcd_server.endpoint]), namespace=namespace, lease_ttl=10),
        policy, worker_id=name) for name in ("spread-a", "spread-b")]
    try:
        await managers[0].connect("acme", emulator_grant(emulator, "acme"))
        stale = await managers[0].token("acme")
        assert await managers[1].token("acme") == stale
        stores = [m.store for m in managers]
        before = [s.client.round_trips for s in stores]  # type: ignore[attr-defined]
        fresh = await asyncio.gather(*(m.refresh("acme", stale=stale) for m in managers))
        trips = [s.client.round_trips - b for s, b in zip(stores, before, strict=True)]  # type: ignore[attr-defined]
        assert fresh[0].access_token == fresh[1].access_token != stale
        assert emulator.ledger["redemptions"] == 1
        assert sorted(trips) == [0, 2]  # acquire + commit; the other sent nothing
    finally:
        for m in managers:
            await m.aclose()
