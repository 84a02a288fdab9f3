"""One regression test per fault of the fault-correctness issue (issue 10).

Each test names the item it covers. They run against the emulator over real
sockets and, where the fault is about coordination, a real etcd; the waits
run with production defaults (lease TTL 30 s, provider timeout 10 s, the
derived recovery grace) unless a test says otherwise and why.
"""

from __future__ import annotations

import asyncio
import sys
import time
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

import sfrtr.manager
import sfrtr.provider_clock
from sfrtr import (
    ConfigurationError,
    LeaseLost,
    MemoryStore,
    OAuthClient,
    OAuthConfig,
    ReauthorizationRequired,
    RefreshIndeterminate,
    RefreshPolicy,
    Secret,
    SessionRefused,
    Status,
    StoreError,
    TokenEndpointUnavailable,
    TokenManager,
)
from sfrtr.cli.admin import RefusedToClear, clear
from sfrtr.emulator import Emulator
from sfrtr.loop_stall import LoopStallMonitor
from sfrtr.oauth.client import REDIRECT_REFUSED
from sfrtr.oauth.outcome import OutcomeKind
from sfrtr.protocol import dead_record
from sfrtr.records import Intent
from sfrtr.salesforce import Client
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings, TxnResult
from sfrtr.store.etcd_launcher import LocalEtcd
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio
MAX_STALL = 0.1
"""The longest the loop itself may stall (its own share: a loaded machine that keeps it
from a core is not the loop freezing; a busy-wait is all its own)."""


def production_oauth(em: Emulator) -> OAuthClient:
    """The emulator's app with the product's default timeouts (10 s, graces 2.25 s)."""
    return emulator_oauth(em, timeout=10.0, connect_timeout=5.0, head_grace=0.25,
                          answer_grace=2.0)


MIRROR = "namespace"


@pytest.fixture(params=["namespace", "served"])
def every_mirror(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test on both of the etcd store's mirrors."""
    monkeypatch.setattr(sys.modules[__name__], "MIRROR", request.param)


async def production_manager(em: Emulator, server: LocalEtcd, namespace: str) -> TokenManager:
    store = EtcdStore(EtcdSettings(endpoints=[server.endpoint]), namespace=namespace,
                      mirror=MIRROR)  # type: ignore[arg-type]
    await store.start()
    return TokenManager(production_oauth(em), store, RefreshPolicy())


# -- item 1: busy-wait ---------------------------------------------------------


@pytest.mark.usefixtures("every_mirror")
async def test_item1_waiting_on_a_lock_its_lease_dropped_never_freezes_the_loop(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str):
    """The lock of a dead holder is deleted by lease expiry; the intent stays. With
    production defaults the survivor waits ~44 s of grace: it must wait, not spin."""
    holder = await production_manager(emulator, etcd_server, namespace)
    survivor = await production_manager(emulator, etcd_server, namespace)
    try:
        record = await holder.connect("acme", emulator_grant(emulator, "acme"))
        current = await holder.store.read("acme")
        assert await holder.store.acquire("acme", current.version, holder._intent(record))
        await holder.store.client.revoke(holder.store.lease_id)  # the holder "dies"
        async with LoopStallMonitor() as monitor:
            waiter = asyncio.create_task(
                survivor.refresh("acme", stale=record.access_token.reveal()))
            reads_before = survivor.store.client.round_trips
            await asyncio.sleep(1.5)
            assert not waiter.done()  # inside the grace
        waiter.cancel()
        print(f"\nitem 1 (lock deleted by lease expiry): max stall {monitor.max_stall:.3f}s, "
              f"own {monitor.max_own_stall:.3f}s")
        assert monitor.max_own_stall < MAX_STALL  # the loop's own share, not the machine's
        assert survivor.store.client.round_trips - reads_before < 5  # no polling either
        assert emulator.ledger["redemptions"] == 0
    finally:
        await holder.store.aclose()
        await survivor.store.aclose()


async def test_item1_a_resync_that_finds_the_lock_retaken_never_freezes_the_loop(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str):
    """While the waiter's watch is down, the holder finishes and a new refresh takes the
    lock again (locked at a newer version), and history moves on. The resync marks the
    customer changed at the store's revision: the waiter must go back to waiting, not
    loop plan -> wait -> read until its timeout (it did on 0df84fe)."""
    holder = await production_manager(emulator, etcd_server, namespace)
    survivor = await production_manager(emulator, etcd_server, namespace)
    try:
        record = await holder.connect("acme", emulator_grant(emulator, "acme"))
        current = await holder.store.read("acme")
        first = await holder.store.acquire("acme", current.version, holder._intent(record))
        assert first
        await asyncio.sleep(0.2)
        async with LoopStallMonitor() as monitor:
            waiter = asyncio.create_task(
                survivor.refresh("acme", stale=record.access_token.reveal()))
            await asyncio.sleep(0.3)
            store: Any = survivor.store
            watch = store._tasks[1]
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            await holder.store.commit("acme", first.version, record)  # done...
            again = await holder.store.read("acme")
            assert await holder.store.acquire("acme", again.version, holder._intent(record))
            await holder.store.put("other", record)  # ...again, and history moves on
            store._synced = False
            store._tasks[1] = asyncio.create_task(store._watch_loop())
            await asyncio.sleep(1.5)
            assert not waiter.done()
        waiter.cancel()
        print(f"\nitem 1 (resync, lock retaken): max stall {monitor.max_stall:.3f}s, "
              f"own {monitor.max_own_stall:.3f}s")
        assert monitor.max_own_stall < MAX_STALL  # the loop's own share, not the machine's
    finally:
        await holder.store.aclose()
        await survivor.store.aclose()


# -- item 3: a proxy refusing CONNECT -------------------------------------------


@pytest.fixture
async def refusing_proxy() -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTP proxy on loopback that answers every CONNECT with 407."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        seen.append(line.decode(errors="replace").split(" ")[0])
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                     b"Proxy-Authenticate: Basic realm=x\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", seen


async def test_item3_a_proxy_refusing_connect_is_not_sent(emulator: Emulator,
                                                          refusing_proxy):
    proxy, seen = refusing_proxy
    oauth = OAuthClient(OAuthConfig(client_id="c", client_secret=Secret("s"),
                                    login_url="https://login.salesforce.com", proxy=proxy,
                                    timeout=3.0, connect_timeout=1.0))
    outcome = await oauth.refresh(Secret("rt"))
    assert seen == ["CONNECT"]
    assert outcome.kind is OutcomeKind.NOT_SENT
    manager = TokenManager(oauth, MemoryStore(), RefreshPolicy(recovery="fail_closed"))
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    with pytest.raises(TokenEndpointUnavailable):
        await manager.refresh("acme", stale=record.access_token.reveal())
    # Nothing was sent: even fail_closed must not mark the customer dead.
    assert (await manager.store.read("acme")).record.status is Status.VALID
    await manager.aclose()


# -- item 4: an acquire that etcd applied but whose answer was lost -------------


def lose_answers(store: EtcdStore, *, retry: bool) -> list[int]:
    """The next acquire Txn is applied by etcd, then its answer is lost: raised as a
    StoreError, or (``retry``) re-sent once as the adapter does on UNAVAILABLE, whose
    compare then fails. Returns a list that counts the answers lost."""
    real = store.client.txn
    lost: list[int] = []

    async def txn(compares: Any, success: Any, failure: Any = ()) -> TxnResult:
        result = await real(compares, success, failure)
        if not lost and len(compares) == 2:  # the acquire: version + lock compares
            lost.append(result.revision)
            if not retry:
                raise StoreError("etcd Txn failed: DEADLINE_EXCEEDED")
            return await real(compares, success, failure)
        return result

    store.client.txn = txn  # type: ignore[method-assign]
    return lost


@pytest.mark.parametrize("retry", [False, True], ids=["answer-lost", "retried"])
@pytest.mark.usefixtures("every_mirror")
async def test_item4_an_applied_acquire_whose_answer_was_lost_is_recognised(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str, retry: bool):
    manager = await production_manager(emulator, etcd_server, namespace)
    try:
        record = await manager.connect("acme", emulator_grant(emulator, "acme"))
        # The watch lags (here: stopped), so the mirror keeps showing the record as
        # it was before the lost acquire: the next flight tries again from there.
        store: Any = manager.store
        watch = store._tasks[1]
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        lost = lose_answers(manager.store, retry=retry)  # type: ignore[arg-type]
        started = time.monotonic()
        if retry:  # the store sees its own intent in the failed compare's answer
            creds = await manager.refresh("acme", stale=record.access_token.reveal())
        else:  # the caller gets the error; the next call releases and refreshes
            with pytest.raises(StoreError):
                await manager.refresh("acme", stale=record.access_token.reveal())
            creds = await manager.refresh("acme", stale=record.access_token.reveal())
        assert lost
        assert time.monotonic() - started < 5  # not a 60 s CoordinationTimeout
        assert creds.access_token != record.access_token.reveal()
        assert emulator.ledger["redemptions"] == 1
        assert emulator.ledger["reuse"] == 0
        final = await manager.store.read("acme")
        assert final.record.status is Status.VALID
        assert not final.locked
    finally:
        await manager.aclose()


# -- item 5: the lease check comes after the OAuth queue ---------------------------


class LeasedMemoryStore(MemoryStore):
    """A memory store whose "lease" the test controls: lease_remaining() is what the
    manager's budget reads, as an etcd store's keepalive would have it."""

    remaining = 60.0

    def lease_remaining(self, lease: int | None = None) -> float | None:
        return self.remaining

    @property
    def lease_ttl(self) -> float:
        return 60.0


async def test_item5_a_refresh_queued_behind_a_storm_checks_its_lease_when_it_sends(
        emulator: Emulator):
    store = LeasedMemoryStore()
    oauth = emulator_oauth(emulator, max_concurrent=1)
    manager = TokenManager(oauth, store, RefreshPolicy(lease_margin=0.5))
    first = await manager.connect("first", emulator_grant(emulator, "first"))
    queued = await manager.connect("queued", emulator_grant(emulator, "queued"))
    emulator.faults.set("token", latency=0.6)
    a = asyncio.create_task(manager.refresh("first", stale=first.access_token.reveal()))
    await asyncio.sleep(0.2)  # "first" holds the only slot
    b = asyncio.create_task(manager.refresh("queued", stale=queued.access_token.reveal()))
    await asyncio.sleep(0.1)  # "queued" acquired its lock and waits for the slot
    store.remaining = 1.0  # meanwhile its lease ran low (a takeover is coming)
    await a
    with pytest.raises(LeaseLost):
        await b
    assert emulator.ledger["redemptions"] == 1  # "queued"'s token was never presented
    after = await store.read("queued")
    assert after.record.status is Status.VALID
    assert after.record.refresh_token == queued.refresh_token
    await manager.aclose()


def test_item5_the_lease_must_cover_the_whole_request_with_its_graces(emulator: Emulator):
    """A lease margin below the answer graces let a request outlive its lease."""
    with pytest.raises(ConfigurationError, match="lease TTL"):
        TokenManager(production_oauth(emulator), type("S", (LeasedMemoryStore,), {
            "lease_ttl": property(lambda self: 20.0)})(), RefreshPolicy())
    TokenManager(production_oauth(emulator), LeasedMemoryStore(), RefreshPolicy())


# -- item 6: re-authorization during an in-flight refresh -------------------------


async def test_item6_a_reauthorization_during_a_refresh_wins(emulator: Emulator, manager):
    old = await manager.connect("acme", emulator_grant(emulator, "acme"))
    emulator.faults.set("token", latency=0.4)
    flight = asyncio.create_task(manager.refresh("acme", stale=old.access_token.reveal()))
    await asyncio.sleep(0.1)
    new = await manager.connect("acme", emulator_grant(emulator, "acme"))  # re-authorized
    late = await flight
    # The late flight's tokens belong to the old grant: neither the cache nor the
    # store may hand them out instead of the new grant's.
    assert late.access_token == new.access_token.reveal()
    assert await manager.token("acme") == new.access_token.reveal()
    stored = (await manager.store.read("acme")).record
    assert stored.grant_id == new.grant_id
    assert stored.access_token == new.access_token
    # Its rescue never revives anything: kill the new grant, nothing comes back.
    rescues = await manager.store.rescues("acme")
    assert [r.grant_id for _, r in rescues] == [old.grant_id]
    current = await manager.store.read("acme")
    await manager.store.commit("acme", current.version, dead_record(stored, "revoked"))
    with pytest.raises(ReauthorizationRequired):
        await manager.token("acme")
    assert (await manager.store.read("acme")).record.status is Status.REAUTH_REQUIRED
    assert await manager.store.rescues("acme") == []  # dropped: it can never help
    assert emulator.ledger["reuse"] == 0


# -- item 7: a rescue saved while a takeover holds the lock ---------------------------


async def test_item7_a_rescue_saved_under_a_takeover_revives_the_grant(emulator: Emulator,
                                                                       manager):
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    store = manager.store
    v0 = await store.read("acme")
    late_fence = (await store.acquire("acme", v0.version, manager._intent(record))).version
    # The late writer stalled; a takeover acquired over its orphan...
    v1 = await store.read("acme")
    await store.commit("acme", late_fence, v1.record)  # (its lock died with its lease)
    v2 = await store.read("acme")
    takeover = await store.acquire("acme", v2.version, Intent("takeover", "f", 0.0, id="t"))
    # ...the late writer redeemed, its commit was fenced out: it saves a rescue while
    # the takeover holds the lock, sees "locked" and leaves it to others...
    fresh = emulator_grant(emulator, "acme")
    await store.save_rescue("acme", late_fence, record.replace(
        access_token=fresh.access_token, refresh_token=fresh.refresh_token, generation=1))
    # ...and the takeover, finding no rescue when it looked, marks the customer dead.
    await store.commit("acme", takeover.version, dead_record(record, "lost"))
    manager._cache.clear()
    assert await manager.token("acme") == fresh.access_token.reveal()
    assert (await store.read("acme")).record.status is Status.VALID
    assert manager.stats.rescues_adopted == 1


# -- item 8: introspection racing the original request ---------------------------


async def test_item8_introspection_waits_until_the_original_request_cannot_be_in_flight(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str):
    """The holder's request is slow at the provider; its lock disappears mid-request.
    Introspecting then reads "active" and a second redemption lands after the
    rotation: reuse. The survivor must wait out the whole request first."""

    async def worker() -> TokenManager:
        store = EtcdStore(EtcdSettings(endpoints=[etcd_server.endpoint]), namespace=namespace,
                          lease_ttl=4)
        await store.start()
        return TokenManager(emulator_oauth(emulator, timeout=1.5), store,
                            RefreshPolicy(lease_margin=0.5))

    holder, survivor = await worker(), await worker()
    try:
        record = await holder.connect("acme", emulator_grant(emulator, "acme"))
        emulator.faults.set("token", latency=1.2)
        flight = asyncio.create_task(holder.refresh("acme", stale=record.access_token.reveal()))
        await asyncio.sleep(0.3)  # sent, being processed
        await holder.store.client.revoke(holder.store.lease_id)  # its lock vanishes
        creds = await survivor.refresh("acme", stale=record.access_token.reveal())
        await flight
        assert creds.access_token in emulator.world.access_index
        assert emulator.ledger["redemptions"] == 1
        assert emulator.ledger["reuse"] == 0
        assert emulator.ledger["revocations"] == 0
    finally:
        await holder.aclose()
        await survivor.aclose()


async def test_item8_a_timed_out_request_is_not_introspected_while_it_runs(
        emulator: Emulator):
    """The provider is still processing when the client's deadline passes. Introspecting
    at once read "active"; the retry was refused as concurrent, a second look still read
    "active", and the token about to be rotated was put back: the next refresh presented
    it after the rotation (reuse, family revoked: 0df84fe did exactly that)."""
    manager = TokenManager(
        emulator_oauth(emulator, timeout=1.0, connect_timeout=0.5, answer_grace=1.0),
        MemoryStore(), RefreshPolicy(lease_margin=0.5, busy_backoff=0.05))
    try:
        record = await manager.connect("acme", emulator_grant(emulator, "acme"))
        emulator.faults.set("token", latency=1.7)  # past the deadline, inside the limit
        with pytest.raises(TokenEndpointUnavailable):
            await manager.refresh("acme", stale=record.access_token.reveal())
        emulator.faults.set("token", latency=0.0)
        await asyncio.sleep(0.6)  # the first request has been processed by now
        # Its answer was lost to the deadline: the successor is gone, and saying so is
        # justified (the old token is inactive); presenting it again would be theft.
        with pytest.raises(RefreshIndeterminate, match="successor is lost"):
            await manager.refresh("acme", stale=record.access_token.reveal())
        assert emulator.ledger["reuse"] == 0
        assert emulator.ledger["revocations"] == 0
        assert emulator.ledger["redemptions"] == 1
    finally:
        await manager.aclose()


def test_item8_a_grace_shorter_than_a_request_is_refused_under_introspect(emulator: Emulator):
    with pytest.raises(ConfigurationError, match="recovery_grace"):
        TokenManager(production_oauth(emulator), MemoryStore(), RefreshPolicy(recovery_grace=1))


# -- item 10: a 401 that a refresh cannot cure ----------------------------------------


async def test_item10_a_refreshed_session_refused_again_stops_the_refreshes(
        emulator: Emulator, manager):
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    client = Client("acme", manager)
    emulator.faults.set("api", error_rate=1.0, error_status=401)  # every call refused
    errors = []
    for _ in range(50):
        with pytest.raises(SessionRefused) as info:
            await client.query("SELECT Id FROM Account")
        errors.append(info.value)
    assert emulator.ledger["redemptions"] == 1  # one refresh tried, then a backoff
    assert "injected fault" in errors[0].reason  # the provider's message
    assert (await manager.store.read("acme")).record.refresh_after > time.time()


# -- item 11: the watch-created reply -------------------------------------------------


async def test_item11_events_behind_the_watch_created_reply_are_applied(
        etcd_server: LocalEtcd, etcd_store: EtcdStore, namespace: str, emulator: Emulator):
    writer = EtcdStore(EtcdSettings(endpoints=[etcd_server.endpoint]), namespace=namespace)
    await writer.start()
    try:
        record = await TokenManager(emulator_oauth(emulator), writer).connect(
            "acme", emulator_grant(emulator, "acme"))
        await asyncio.sleep(0.2)
        store: Any = etcd_store
        watch = store._tasks[1]
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        for gen in range(1, 4):  # written while our watch is down, not compacted
            latest = await writer.put("acme", record.replace(generation=gen))
        # The watch resumes from where it was: a created reply (carrying the store's
        # revision) comes before the events it still owes.
        store._tasks[1] = asyncio.create_task(store._watch_loop())
        for _ in range(100):
            current = await etcd_store.read("acme")
            if current.version == latest.version:
                break
            await asyncio.sleep(0.02)
        assert current.version == latest.version
        assert current.record.generation == 3
    finally:
        await writer.aclose()


# -- item 12 ------------------------------------------------------------------------


async def test_item12_clear_never_deletes_a_record_revived_meanwhile(emulator: Emulator,
                                                                    manager):
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    store = manager.store
    await store.put("acme", dead_record(record, "revoked"))
    real_read = store.read

    async def read_then_revive(customer: str):  # type: ignore[no-untyped-def]
        seen = await real_read(customer)
        await store.commit(customer, seen.version, record)  # revived by a rescue
        return seen

    store.read = read_then_revive  # type: ignore[method-assign]
    with pytest.raises(RefusedToClear, match="changed"):
        await clear(store, "acme")
    store.read = real_read  # type: ignore[method-assign]
    assert (await store.read("acme")).record.status is Status.VALID


async def test_item12_a_plain_cancel_of_the_flight_does_not_drop_the_commit(
        emulator: Emulator, manager):
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    emulator.faults.set("token", latency=0.3)
    caller = asyncio.create_task(manager.refresh("acme", stale=record.access_token.reveal()))
    await asyncio.sleep(0.1)
    flight = manager._flights._calls["acme"].task
    flight.cancel()  # as a loop teardown without aclose() would
    fresh = await caller  # held until the section stored the token, then dropped
    await manager.wait_idle()
    stored = (await manager.store.read("acme")).record
    assert stored.status is Status.VALID
    assert stored.refresh_token != record.refresh_token  # the rotated token was stored
    assert fresh.access_token == stored.access_token.reveal()
    assert await manager.token("acme") == stored.access_token.reveal()
    assert emulator.ledger["redemptions"] == 1


async def test_item12_token_posts_never_follow_redirects():
    hits: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path == "/services/oauth2/token":
            raise web.HTTPTemporaryRedirect("/elsewhere")
        return web.Response(text="stolen")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    oauth = OAuthClient(OAuthConfig(client_id="c", client_secret=Secret("s"),
                                    login_url=f"http://127.0.0.1:{port}"))
    try:
        outcome = await oauth.refresh(Secret("rt"))
        assert outcome.kind is OutcomeKind.NOT_SENT
        assert outcome.error == REDIRECT_REFUSED
        assert hits == ["/services/oauth2/token"]  # the secret never went elsewhere
    finally:
        await oauth.aclose()
        await runner.cleanup()


class FlakyCommits(MemoryStore):
    """Commits fail while ``down`` (an etcd outage longer than the store patience)."""

    down = False

    async def commit(self, customer: str, fence: int, record: Any) -> Any:
        if self.down:
            raise StoreError("etcd Txn failed: UNAVAILABLE")
        return await super().commit(customer, fence, record)


async def test_item12_tokens_the_store_refused_are_kept_and_stored_later(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sfrtr.manager, "_STORE_RETRY_DELAY", 0.2)
    store = FlakyCommits()
    manager = TokenManager(emulator_oauth(emulator), store,
                           RefreshPolicy(store_patience=0.3, lease_margin=0.5))
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    store.down = True
    with pytest.raises(StoreError):
        await manager.refresh("acme", stale=record.access_token.reveal())
    store.down = False
    for _ in range(50):  # the background retry stores the kept tokens
        stored = (await store.read("acme")).record
        if stored.status is Status.VALID and stored.refresh_token != record.refresh_token:
            break
        await asyncio.sleep(0.05)
    assert stored.status is Status.VALID
    assert stored.refresh_token != record.refresh_token
    assert stored.refresh_token.reveal() in emulator.world.refresh_index
    assert emulator.ledger["redemptions"] == 1
    await manager.aclose()


async def test_item12_a_clock_far_ahead_does_not_refresh_on_every_call(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch):
    ahead = types.SimpleNamespace(time=lambda: time.time() + 3 * 3600,
                                  monotonic=time.monotonic)
    monkeypatch.setattr(sfrtr.manager, "time", ahead)  # only this worker's clocks
    monkeypatch.setattr(sfrtr.provider_clock, "time", ahead)
    manager = TokenManager(emulator_oauth(emulator), MemoryStore(),
                           RefreshPolicy(lease_margin=0.5))
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    for _ in range(20):
        await manager.token("acme")
    # The first call sees the record as 3 h old and refreshes; the answer tells the
    # worker how far its clock is off, and no call refreshes after that.
    assert emulator.ledger["redemptions"] == 1
    await manager.aclose()
