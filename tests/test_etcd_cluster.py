"""A three-member etcd cluster (a production-recommended etcd, on loopback ports)
under member faults, with real worker processes storming it.

Each storm: 8 worker processes (``tests.etcd_cluster_worker``: the multi-process
tests' worker, given all three endpoints), half on each mirror, against the
emulator. Sessions expire in waves; a wave is *absorbed* when every customer got
a new session after it. Each scenario injects its fault, starts a wave at once
and times the absorption: that is the time from the fault to full service.

Only the leader kill runs in the default suite; ``nox -s cluster`` runs them all
(``SFRTR_CLUSTER_MATRIX=1``). Figures are printed (``-s``) for the notes.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aetcd import rpc

from sfrtr import RefreshPolicy, Secret, Status, TokenManager, TokenRecord
from sfrtr.emulator import Emulator
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdClient, EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcdCluster
from tests.conftest import emulator_grant, emulator_oauth
from tests.test_multiprocess import ROOT, Worker

pytestmark = pytest.mark.anyio
matrix = pytest.mark.cluster_matrix  # deselected (not skipped) unless SFRTR_CLUSTER_MATRIX

# Failures a worker may see while the cluster has no leader or no quorum, and only
# for that reason (a refresh is refused before the provider is called).
OUTAGE_FAILURES = {"StoreError", "CoordinationTimeout", "LeaseLost"}


async def start_worker(endpoints: list[str], em: Emulator, namespace: str,
                       customers: list[str], **options: Any) -> Worker:
    args = [sys.executable, "-m", "tests.etcd_cluster_worker", "--etcd", ",".join(endpoints),
            "--namespace", namespace, "--login-url", str(em.base_url),
            "--customers", ",".join(customers)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    process = await asyncio.create_subprocess_exec(
        *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return Worker(process)


def rotated(endpoints: list[str], i: int) -> list[str]:
    """Worker ``i`` starts on member ``i % n``: the fleet is spread over the cluster."""
    k = i % len(endpoints)
    return endpoints[k:] + endpoints[:k]


@dataclass
class Storm:
    """The emulator, the cluster, a fleet of workers, and the clock of each wave."""

    emulator: Emulator
    cluster: LocalEtcdCluster
    customers: list[str]
    issued: list[tuple[float, str]] = field(default_factory=list)
    waves: list[float] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    def wave(self) -> None:
        self.waves.append(time.monotonic())
        self.emulator.expire_sessions()

    def refreshed_since(self, t: float) -> set[str]:
        return {c for when, c in self.issued if when >= t}

    async def absorbed(self, since: float, timeout: float = 60.0) -> float:
        """Seconds from ``since`` until every customer got a session after the last wave."""
        last = self.waves[-1]
        async with asyncio.timeout(timeout):
            while self.refreshed_since(last) != set(self.customers):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        took = time.monotonic() - since
        # Let every coroutine use the new sessions before anything else happens: a
        # wave on the heels of the last one kills tokens nobody could use yet (and a
        # call sees a third 401, which the storm rightly counts as a failure).
        await asyncio.sleep(2)
        return took

    async def fault_to_service(self, name: str, since: float | None = None,
                               timeout: float = 60.0) -> float:
        """A wave now; the time from ``since`` (default: now) until it is absorbed."""
        since = time.monotonic() if since is None else since
        self.wave()
        took = await self.absorbed(since, timeout)
        self.figures[name] = round(took, 2)
        print(f"  {name}: full service {took:.2f}s")
        return took


async def run_storm(emulator: Emulator, cluster: LocalEtcdCluster,
                    fault: Callable[[Storm], Awaitable[None]], *,
                    endpoints_of: Callable[[int], list[str]] | None = None,
                    workers: int = 8, coroutines: int = 25, customers: int = 16
                    ) -> dict[str, Any]:
    """Storm the cluster with ``workers`` processes, absorb one wave, run ``fault``,
    absorb a last wave, stop, and check the invariants. Returns the figures."""
    emulator.api_limit = 10**9  # this is about etcd, not API quotas
    emulator.faults.set("token", latency=0.02, jitter=0.03)
    names = [f"c{i:02d}" for i in range(customers)]
    namespace = f"cluster/{uuid.uuid4().hex[:8]}"
    endpoints_of = endpoints_of or (lambda i: rotated(cluster.endpoints, i))
    store = EtcdStore(EtcdSettings(endpoints=cluster.endpoints), namespace=namespace,
                      lease_ttl=10)
    mine = TokenManager(emulator_oauth(emulator), store, RefreshPolicy(lease_margin=0.5))
    for c in names:
        await mine.connect(c, emulator_grant(emulator, c))
    storm = Storm(emulator, cluster, names)
    issue_access = emulator.world.issue_access

    def recorded(family: Any, now: float) -> Any:
        storm.issued.append((time.monotonic(), family.org.name))
        return issue_access(family, now)

    emulator.world.issue_access = recorded  # type: ignore[method-assign]
    # A 10 s lease and a 3 s provider timeout (4 s with its graces and margin): the
    # product's recovery policy (introspect), so a re-authorization is a finding.
    storm.workers = [await start_worker(endpoints_of(i), emulator, namespace, names,
                                        coroutines=coroutines, duration=600, pause=0.3,
                                        lease_ttl=10, timeout=3, recovery="introspect",
                                        mirror="served" if i % 2 else "namespace")
                     for i in range(workers)]
    try:
        for w in storm.workers:
            await w.expect("READY", timeout=60)
        await asyncio.sleep(1)
        await storm.fault_to_service("baseline wave (no fault)")
        await fault(storm)
        await storm.fault_to_service("wave after the fault ended")
        for w in storm.workers:
            w.signal(signal.SIGTERM)
        results = [await w.result(timeout=60) for w in storm.workers]
        states = {c: await mine.store.read(c) for c in names}
    finally:
        for w in storm.workers:
            w.signal(signal.SIGCONT)
            await w.reap()
        await mine.aclose()
        emulator.world.issue_access = issue_access  # type: ignore[method-assign]
    failures: Counter[str] = Counter()
    for r in results:
        failures.update(r["failures"])
    stalls = [round(r["max_stall"], 3) for r in results]
    ledger = emulator.ledger
    figures = {"redemptions": ledger["redemptions"], "reuse": ledger["reuse"],
               "revocations": ledger["revocations"], "max loop stall per worker": stalls,
               "failures": dict(failures), **storm.figures}
    print("figures:", figures)
    print("failures per worker (odd: served mirror):", [r["failures"] for r in results])
    # No unjustified lockout: every grant is valid and works.
    assert {c: (s.record.status.value, s.record.reason) for c, s in states.items()
            if s is None or s.record.status is not Status.VALID} == {}
    for s in states.values():
        assert s is not None
        assert s.record.access_token.reveal() in emulator.world.access_index
    assert ledger["reuse"] == 0
    assert ledger["revocations"] == 0
    assert ledger["concurrent_rejections"] == 0
    # Exactly one refresh per customer per wave, across the fleet.
    per_wave = [Counter(c for t, c in storm.issued if start <= t < end)
                for start, end in zip(storm.waves, [*storm.waves[1:], float("inf")],
                                      strict=True)]
    assert [dict(w) for w in per_wave if set(w.values()) != {1}] == []
    assert ledger["redemptions"] == customers * len(storm.waves)
    assert sum(r["redemptions"] for r in results) == ledger["redemptions"]
    assert set(failures) <= OUTAGE_FAILURES, failures
    # Coarse: nine busy processes and three etcd members share two cores.
    assert max(stalls) < 2.0
    return figures


# -- the scenarios ---------------------------------------------------------------


async def test_leader_killed_and_restarted_under_a_storm(emulator: Emulator,
                                                        etcd_cluster: LocalEtcdCluster):
    """(a) SIGKILL the leader mid-storm; the fleet is spread over the three members."""
    async def fault(storm: Storm) -> None:
        leader = etcd_cluster.wait_leader()
        etcd_cluster.members[leader].kill()
        killed = time.monotonic()
        new = await asyncio.to_thread(etcd_cluster.wait_leader)
        print(f"\n  leader m{leader} killed; m{new} elected after "
              f"{time.monotonic() - killed:.2f}s")
        await storm.fault_to_service("leader killed", since=killed)
        await asyncio.sleep(2)
        await asyncio.to_thread(etcd_cluster.members[leader].start)
        restarted = time.monotonic()
        await storm.fault_to_service("old leader restarted", since=restarted)

    await run_storm(emulator, etcd_cluster, fault)


@matrix
async def test_follower_paused_past_an_election_timeout(emulator: Emulator,
                                                       etcd_cluster: LocalEtcdCluster):
    """(b) SIGSTOP a follower for 5 election timeouts (a third of the fleet talks to it:
    their calls go silent, not refused), then SIGCONT."""
    async def fault(storm: Storm) -> None:
        leader = etcd_cluster.wait_leader()
        follower = (leader + 1) % 3
        etcd_cluster.members[follower].pause()
        paused = time.monotonic()
        print(f"\n  follower m{follower} paused")
        await storm.fault_to_service("follower paused", since=paused)
        await asyncio.sleep(max(0.0, paused + 5 * etcd_cluster.election_timeout + 3
                                - time.monotonic()))
        etcd_cluster.members[follower].resume()
        resumed = time.monotonic()
        print(f"  follower resumed after {resumed - paused:.1f}s")
        await asyncio.to_thread(etcd_cluster.wait_healthy)
        await storm.fault_to_service("follower resumed", since=resumed)

    await run_storm(emulator, etcd_cluster, fault)


@matrix
async def test_the_member_every_worker_talks_to_is_killed(emulator: Emulator,
                                                         etcd_cluster: LocalEtcdCluster):
    """(c) Every worker starts on the same follower; it is SIGKILLed. The cluster
    keeps its quorum: each worker must move to another member and keep serving."""
    leader = etcd_cluster.wait_leader()
    target = (leader + 1) % 3
    order = [etcd_cluster.endpoints[(target + k) % 3] for k in range(3)]

    async def fault(storm: Storm) -> None:
        etcd_cluster.members[target].kill()
        killed = time.monotonic()
        print(f"\n  m{target} (every worker's member, a follower) killed")
        await storm.fault_to_service("connected member killed", since=killed)
        await asyncio.to_thread(etcd_cluster.members[target].start)
        await storm.fault_to_service("member restarted")

    await run_storm(emulator, etcd_cluster, fault, endpoints_of=lambda i: order)


@matrix
async def test_quorum_lost_then_regained(emulator: Emulator, etcd_cluster: LocalEtcdCluster):
    """(d) Two members stopped: no quorum. Refreshes fail with a store error before the
    provider is called; nothing is redeemed; service returns with the quorum."""
    async def fault(storm: Storm) -> None:
        leader = etcd_cluster.wait_leader()
        down = [leader, (leader + 1) % 3]
        for i in down:
            etcd_cluster.members[i].stop()
        lost = time.monotonic()
        print(f"\n  m{down[0]} (leader) and m{down[1]} stopped: no quorum")
        await asyncio.sleep(1)  # let what was in flight end
        before = storm.emulator.ledger["redemptions"]
        storm.wave()  # every customer needs a refresh now, and none can have one
        await asyncio.sleep(8)
        during = storm.emulator.ledger["redemptions"] - before
        print(f"  redemptions without a quorum: {during}")
        assert during == 0
        assert storm.refreshed_since(storm.waves[-1]) == set()
        for i in down:
            etcd_cluster.members[i].launch()
        regained = time.monotonic()
        await asyncio.to_thread(etcd_cluster.wait_healthy)
        print(f"  quorum back after {regained - lost:.1f}s without; healthy "
              f"{time.monotonic() - regained:.2f}s after the restart")
        took = await storm.absorbed(regained)
        storm.figures["quorum regained (the outage's wave)"] = round(took, 2)
        print(f"  quorum regained: full service {took:.2f}s")

    await run_storm(emulator, etcd_cluster, fault)


# -- the adapter and the lease, without a fleet ---------------------------------------


@matrix
@pytest.mark.parametrize("mirror", ["namespace", "served"])
async def test_an_idle_store_fails_over_and_keeps_its_lease(etcd_cluster: LocalEtcdCluster,
                                                           mirror: str):
    """No call of its own to fail over with: the keepalive and the watch must move
    to another member by themselves, keep the lease and hear the writes."""
    namespace = f"cluster/{uuid.uuid4().hex[:8]}"
    target = (etcd_cluster.wait_leader() + 1) % 3  # a follower: quorum stays
    order = [etcd_cluster.endpoints[(target + k) % 3] for k in range(3)]
    store = EtcdStore(EtcdSettings(endpoints=order), namespace=namespace, lease_ttl=4,
                      mirror=mirror)  # type: ignore[arg-type]
    other = EtcdStore(EtcdSettings(endpoints=order[1:]), namespace=namespace, lease_ttl=4)
    record = TokenRecord(access_token=Secret("at"), refresh_token=Secret("rt"),
                         instance_url="https://x.my.salesforce.com", issued_at=1.0,
                         expires_at=time.time() + 3600)
    try:
        await store.start()
        await other.start()
        await other.put("acme", record)
        seen = await store.read("acme")
        assert seen is not None
        lease = store.lease_id
        etcd_cluster.members[target].kill()
        await asyncio.sleep(3 * store.lease_ttl)  # three leases' worth, idle
        assert store.lease_id == lease
        assert store.lease_remaining() > 0
        assert store.client.endpoint != etcd_cluster.members[target].endpoint
        before = store.client.round_trips
        await other.put("acme", record.replace(generation=5))
        changed = await store.wait_for_change("acme", seen.stamp, 10)
        assert changed is not None
        assert changed.record.generation == 5
        print(f"\n{mirror}: failovers {store.client.failovers}, round trips to hear the write "
              f"{store.client.round_trips - before}")
    finally:
        await store.aclose()
        await other.aclose()


@matrix
async def test_the_lease_deadline_stays_conservative_across_leader_changes(
        etcd_cluster: LocalEtcdCluster):
    """Keepalives land during elections (the leader is killed three times): the
    worker's local lease deadline is never later than etcd's own expiry."""
    store = EtcdStore(EtcdSettings(endpoints=etcd_cluster.endpoints),
                      namespace=f"cluster/{uuid.uuid4().hex[:8]}", lease_ttl=3)
    checks = 0
    worst = -1e9
    await store.start()
    try:
        for _ in range(3):
            leader = etcd_cluster.wait_leader()
            etcd_cluster.members[leader].kill()
            killed = time.monotonic()
            while time.monotonic() - killed < 4:
                lease = store.lease_id
                local = store.lease_remaining()
                asked = time.monotonic()
                if lease is not None and local:
                    server = await _server_ttl(etcd_cluster, lease)
                    if server is not None:
                        # etcd truncates its remaining TTL to whole seconds (-1: gone),
                        # and its answer is as of a moment after ``local`` was read.
                        slack = 1 + (time.monotonic() - asked)
                        worst = max(worst, local - (server + slack))
                        checks += 1
                        assert local <= server + slack, (local, server)
                await asyncio.sleep(0.1)
            await asyncio.to_thread(etcd_cluster.members[leader].start)
        print(f"\nlease checks {checks}; local deadline minus etcd's (+1 s rounding), "
              f"worst: {worst:.2f}s")
        assert checks > 20
    finally:
        await store.aclose()


async def _server_ttl(cluster: LocalEtcdCluster, lease: int) -> int | None:
    """The lease's remaining TTL as a live member sees it (None: no answer)."""
    for m in cluster.members:
        if not m.running:
            continue
        client = EtcdClient(EtcdSettings(endpoints=[m.endpoint], timeout=1.0))
        try:
            await client.connect()
            reply = await client._unary("_lease", "LeaseTimeToLive",
                                        rpc.LeaseTimeToLiveRequest(ID=lease))
            return int(reply.TTL)
        except Exception:  # a member without a leader: try the next
            continue
        finally:
            await client.close()
    return None



async def test_a_worker_on_a_stale_member_cannot_redeem_what_another_redeemed(
        emulator: Emulator, etcd_cluster: LocalEtcdCluster, namespace: str):
    """Which reads may be stale, and why that is safe: a worker's mirror (its watch,
    served by whatever member it talks to) can lag behind the cluster, and so can
    anything it decides from it. But a refresh token is presented only after an
    acquire Txn succeeded, and a Txn's compare is decided by the leader on the
    replicated log (linearizable): a worker that acts on a stale view fails its
    compare, reads the answer the failure branch carries, and uses the other
    worker's new token. Here the stale worker talks to a follower and its watch is
    stopped, the most stale a mirror can be; the other worker refreshes through the
    leader."""
    leader = etcd_cluster.wait_leader()
    follower = (leader + 1) % 3
    fresh_store = EtcdStore(EtcdSettings(endpoints=[etcd_cluster.endpoints[leader]]),
                            namespace=namespace, lease_ttl=10)
    stale_store = EtcdStore(EtcdSettings(endpoints=[etcd_cluster.endpoints[follower]]),
                            namespace=namespace, lease_ttl=10)
    fresh = TokenManager(emulator_oauth(emulator), fresh_store, RefreshPolicy())
    stale = TokenManager(emulator_oauth(emulator), stale_store, RefreshPolicy())
    try:
        record = await fresh.connect("acme", emulator_grant(emulator, "acme"))
        old = record.access_token.reveal()
        assert await stale.token("acme") == old  # the stale worker serves acme too
        watch = stale_store._tasks[1]
        watch.cancel()  # from here on its mirror hears nothing
        await asyncio.gather(watch, return_exceptions=True)
        new = (await fresh.refresh("acme", stale=old)).access_token
        assert emulator.ledger["redemptions"] == 1
        seen = stale_store._mirror["acme"]
        assert seen.record is not None
        assert seen.record.access_token.reveal() == old  # its view is stale
        before = stale_store.client.round_trips
        # The stale worker's session is refused (401): it refreshes from its view.
        got = await stale.refresh("acme", stale=old)
        assert got.access_token == new  # the other worker's token, adopted
        assert emulator.ledger["redemptions"] == 1  # never a second redemption
        assert emulator.ledger["reuse"] == 0
        assert stale_store.client.round_trips - before <= 3  # one failed acquire, a read
    finally:
        await fresh.aclose()
        await stale.aclose()
