"""Every refresh outcome, driven by the emulator, ends in the documented state."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sfrtr import (
    ConfigurationError,
    MemoryStore,
    NotConnected,
    ReauthorizationRequired,
    RefreshIndeterminate,
    RefreshPolicy,
    Secret,
    Status,
    TokenEndpointUnavailable,
    TokenManager,
)
from sfrtr.emulator import Emulator
from sfrtr.protocol import dead_record
from tests.conftest import emulator_grant, emulator_oauth
from tests.emulator_calls import refresh as raw_refresh

pytestmark = pytest.mark.anyio


async def stored(manager: TokenManager, customer: str = "acme"):
    current = await manager.store.read(customer)
    assert current is not None
    return current


async def leave_orphan(manager: TokenManager, record) -> int:  # type: ignore[no-untyped-def]
    """A worker announced a redemption of ``record`` and died: intent, no lock.
    Returns the orphan's version (the dead worker's fence)."""
    orphan = record.replace(status=Status.REFRESHING, intent=manager._intent(record))
    fence = (await manager.store.put("acme", orphan)).version
    manager._cache.clear()
    return fence


async def test_unknown_customer_is_not_connected(manager):
    with pytest.raises(NotConnected):
        await manager.token("nobody")


async def test_401_with_a_replaced_token_causes_no_refresh(emulator: Emulator, manager):
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    t0 = await manager.token("acme")
    t1 = (await manager.refresh("acme", stale=t0)).access_token
    assert t1 != t0
    assert emulator.ledger["redemptions"] == 1
    # Late reporters of the same 401 get the replacement, without a refresh.
    assert (await manager.refresh("acme", stale=t0)).access_token == t1
    assert emulator.ledger["redemptions"] == 1
    # Another worker whose cache still holds t0 adopts t1 from the store.
    other = TokenManager(emulator_oauth(emulator), manager.store)
    assert (await other.refresh("acme", stale=t0)).access_token == t1
    assert emulator.ledger["redemptions"] == 1
    await other.oauth.aclose()
    # A 401 with the current token refreshes exactly once.
    t2 = (await manager.refresh("acme", stale=t1)).access_token
    assert t2 not in (t0, t1)
    assert emulator.ledger["redemptions"] == 2
    assert (await stored(manager)).record.generation == 2


async def test_invalid_grant_after_another_writer_rotated_is_adopted(emulator: Emulator,
                                                                       manager):
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    t0 = await manager.token("acme")
    emulator.faults.set("token", latency=0.3)
    task = asyncio.create_task(manager.refresh("acme", stale=t0))
    await asyncio.sleep(0.1)
    # Meanwhile the customer re-authorized elsewhere and the old grant died.
    (old_family,) = emulator.world.families.values()
    emulator.world.revoke_family(old_family)
    new_grant = emulator_grant(emulator, "acme")
    await manager.store.put("acme", (await stored(manager)).record.replace(
        access_token=new_grant.access_token, refresh_token=new_grant.refresh_token,
        status=Status.VALID, intent=None))
    creds = await task
    assert creds.access_token == new_grant.access_token.reveal()
    assert (await stored(manager)).record.status is Status.VALID
    assert manager.stats.adopted == 1


async def test_invalid_grant_on_a_revoked_grant_requires_reauthorization(emulator: Emulator,
                                                                           manager, http):
    grant = emulator_grant(emulator, "acme")
    await manager.connect("acme", grant)
    async with http.post(f"{emulator.base_url}/services/oauth2/revoke",
                         data={"token": grant.refresh_token.reveal()}) as r:
        assert r.status == 200
    with pytest.raises(ReauthorizationRequired) as info:
        await manager.refresh("acme", stale=grant.access_token.reveal())
    assert info.value.customer == "acme"
    assert "expired access/refresh token" in str(info.value)
    assert (await stored(manager)).record.status is Status.REAUTH_REQUIRED
    calls = dict(emulator.ledger.totals)
    # Every later caller, in this worker or another, fails fast without HTTP.
    with pytest.raises(ReauthorizationRequired):
        await manager.token("acme")
    other = TokenManager(emulator_oauth(emulator), manager.store)
    with pytest.raises(ReauthorizationRequired):
        await other.token("acme")
    assert dict(emulator.ledger.totals) == calls
    await other.oauth.aclose()
    # Re-authorizing brings the customer back.
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    assert await manager.token("acme")


async def test_not_sent_leaves_the_record_untouched(emulator: Emulator):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    store = MemoryStore()
    broken = TokenManager(emulator_oauth(emulator, login_url=dead), store)
    record = await broken.connect("acme", emulator_grant(emulator, "acme"))
    with pytest.raises(TokenEndpointUnavailable):
        await broken.refresh("acme", stale=record.access_token.reveal())
    after = (await store.read("acme")).record
    assert after.status is Status.VALID
    assert after.refresh_token == record.refresh_token
    assert after.intent is None
    # Nothing was burnt: a working client redeems the same token fine.
    working = TokenManager(emulator_oauth(emulator), store)
    await working.refresh("acme", stale=record.access_token.reveal())
    assert emulator.ledger["redemptions"] == 1
    assert emulator.ledger["reuse"] == 0
    await broken.aclose()
    await working.aclose()


async def test_client_refused_is_a_configuration_error(emulator: Emulator):
    bad = TokenManager(emulator_oauth(emulator, client_secret=Secret("wrong")), MemoryStore())
    record = await bad.connect("acme", emulator_grant(emulator, "acme"))
    with pytest.raises(ConfigurationError, match="invalid_client"):
        await bad.refresh("acme", stale=record.access_token.reveal())
    assert (await bad.store.read("acme")).record.status is Status.VALID
    await bad.aclose()


def _manager(emulator: Emulator, **policy: object) -> TokenManager:
    policy.setdefault("lease_margin", 0.5)
    policy.setdefault("busy_backoff", 0.05)
    return TokenManager(emulator_oauth(emulator), MemoryStore(), RefreshPolicy(**policy))


async def test_rotate_then_drop_fails_closed_without_a_second_redemption(emulator: Emulator):
    manager = _manager(emulator, recovery="fail_closed")
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    emulator.faults.set("token", drop_after_rotation=1)
    with pytest.raises(RefreshIndeterminate) as info:
        await manager.refresh("acme", stale=record.access_token.reveal())
    assert "may be lost" in str(info.value)
    assert (await stored(manager)).record.status is Status.REAUTH_REQUIRED
    with pytest.raises(ReauthorizationRequired):
        await manager.token("acme")
    assert emulator.ledger["redemptions"] == 1
    assert emulator.ledger["reuse"] == 0
    assert emulator.ledger["revocations"] == 0
    await manager.aclose()


async def test_server_error_is_indeterminate_under_fail_closed(emulator: Emulator):
    manager = _manager(emulator, recovery="fail_closed")
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    emulator.faults.set("token", error_rate=1.0, error_status=503)
    with pytest.raises(RefreshIndeterminate):
        await manager.refresh("acme", stale=record.access_token.reveal())
    assert (await stored(manager)).record.status is Status.REAUTH_REQUIRED
    assert emulator.ledger["reuse"] == 0
    await manager.aclose()


async def test_introspect_refreshes_a_token_that_was_not_rotated(emulator: Emulator, manager):
    """The default policy: an unknown outcome is left indeterminate, then settled by
    introspection once no request can be in flight. Sent but never processed:
    the token is live, so it ends in a refresh, not a lockout (invariant 4)."""
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    emulator.faults.set("token", reset_before=1)  # sent, but never processed
    with pytest.raises(TokenEndpointUnavailable, match="unknown outcome"):
        await manager.refresh("acme", stale=record.access_token.reveal())
    assert (await stored(manager)).record.status is Status.INDETERMINATE
    loop = asyncio.get_running_loop()
    started = loop.time()
    creds = await manager.refresh("acme", stale=record.access_token.reveal())
    # Introspection waited until the first request could no longer be in flight.
    assert loop.time() - started >= manager.oauth.config.exchange_limit
    assert creds.access_token != record.access_token.reveal()
    assert emulator.ledger["redemptions"] == 1
    assert emulator.ledger["reuse"] == 0
    assert (await stored(manager)).record.status is Status.VALID


async def test_introspect_marks_a_rotated_token_lost(emulator: Emulator, manager):
    """Rotated and the answer lost: the successor is gone, re-authorization is justified."""
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    emulator.faults.set("token", drop_after_rotation=1)
    with pytest.raises(TokenEndpointUnavailable):
        await manager.refresh("acme", stale=record.access_token.reveal())
    with pytest.raises(RefreshIndeterminate, match="successor is lost"):
        await manager.refresh("acme", stale=record.access_token.reveal())
    assert emulator.ledger["redemptions"] == 1
    assert emulator.ledger["reuse"] == 0
    assert (await stored(manager)).record.status is Status.REAUTH_REQUIRED


async def test_introspection_error_is_unknown_never_active(emulator: Emulator, manager):
    """Issue 10, item 8: an introspection that fails says nothing: wait, never redeem."""
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    emulator.faults.set("token", reset_before=1)
    with pytest.raises(TokenEndpointUnavailable):
        await manager.refresh("acme", stale=record.access_token.reveal())
    emulator.faults.set("introspect", error_rate=1.0, error_status=503)
    with pytest.raises(TokenEndpointUnavailable, match="cannot settle"):
        await manager.refresh("acme", stale=record.access_token.reveal())
    assert emulator.ledger["redemptions"] == 0
    assert (await stored(manager)).record.status is Status.INDETERMINATE
    emulator.faults.set("introspect", error_rate=0.0)
    fresh = await manager.refresh("acme", stale=record.access_token.reveal())
    assert fresh.access_token != record.access_token.reveal()
    assert emulator.ledger["redemptions"] == 1
    assert emulator.ledger["reuse"] == 0


async def test_reuse_window_policy_redeems_again(emulator: Emulator):
    emulator.add_app("leeway", "leeway-secret", reuse_window=30.0)
    mgr = TokenManager(emulator_oauth(emulator, client_id="leeway",
                                      client_secret=Secret("leeway-secret")),
                       MemoryStore(), RefreshPolicy(recovery="reuse_window", reuse_window=30.0))
    record = await mgr.connect("acme", emulator_grant(emulator, "acme", "leeway",
                                                      "leeway-secret"))
    emulator.faults.set("token", drop_after_rotation=1)
    with pytest.raises(TokenEndpointUnavailable, match="unknown outcome"):
        await mgr.refresh("acme", stale=record.access_token.reveal())
    # Once the first request cannot be in flight any more, and inside the window,
    # the token is presented again and the provider hands over its successor.
    creds = await mgr.refresh("acme", stale=record.access_token.reveal())
    assert creds.access_token in emulator.world.access_index
    assert emulator.ledger["reuse_in_window"] == 1
    assert emulator.ledger["reuse"] == 0
    assert (await mgr.store.read("acme")).record.status is Status.VALID
    await mgr.aclose()


def test_reuse_window_that_recovery_cannot_meet_is_refused(emulator: Emulator):
    """Issue 10, item 9: a takeover comes at the earliest a lease TTL after the first
    request; a window shorter than that cannot be used, so the configuration is refused."""

    class LeasedStore(MemoryStore):
        @property
        def lease_ttl(self) -> float:
            return 30.0

    with pytest.raises(ConfigurationError, match="reuse_window"):
        TokenManager(emulator_oauth(emulator), LeasedStore(),
                     RefreshPolicy(recovery="reuse_window", reuse_window=30.0))
    TokenManager(emulator_oauth(emulator), LeasedStore(),
                 RefreshPolicy(recovery="reuse_window", reuse_window=60.0))
    with pytest.raises(ConfigurationError):
        RefreshPolicy(recovery="reuse_window")


async def test_busy_is_never_counted_as_reuse(emulator: Emulator, manager, http):
    grant = emulator_grant(emulator, "acme")
    await manager.connect("acme", grant)
    emulator.faults.set("token", latency=0.3)
    # A client outside sfrtr redeems the same refresh token at the same time.
    outsider = asyncio.create_task(raw_refresh(http, emulator, grant.refresh_token.reveal()))
    await asyncio.sleep(0.05)
    with pytest.raises(TokenEndpointUnavailable, match="concurrently"):
        await manager.refresh("acme", stale=grant.access_token.reveal())
    assert (await outsider)[0] == 200
    assert emulator.ledger["concurrent_rejections"] == 1
    assert emulator.ledger["reuse"] == 0
    assert emulator.ledger["revocations"] == 0
    assert emulator.ledger["redemptions"] == 1  # the outsider's


async def test_orphan_that_never_sent_ends_in_a_refresh(emulator: Emulator, manager):
    """A worker that died before its request left must not cost a re-authorization."""
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    await leave_orphan(manager, record)
    loop = asyncio.get_running_loop()
    started = loop.time()
    token = await manager.token("acme")
    assert loop.time() - started >= manager.oauth.config.exchange_limit  # the grace period
    assert token != record.access_token.reveal()
    assert emulator.ledger["redemptions"] == 1
    assert emulator.ledger["reuse"] == 0
    assert (await stored(manager)).record.status is Status.VALID


async def test_orphaned_intent_fails_closed_after_grace(emulator: Emulator):
    manager = _manager(emulator, recovery="fail_closed", recovery_grace=0.2)
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    await leave_orphan(manager, record)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RefreshIndeterminate, match="interrupted"):
        await manager.token("acme")
    assert loop.time() - started >= 0.2  # the grace period
    assert emulator.ledger["redemptions"] == 0  # never a blind second redemption
    assert (await stored(manager)).record.status is Status.REAUTH_REQUIRED
    await manager.aclose()


async def test_orphan_writer_committing_during_grace_is_adopted(emulator: Emulator, manager):
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    fence = await leave_orphan(manager, record)
    fresh = emulator_grant(emulator, "acme")

    async def late_commit() -> None:
        await asyncio.sleep(0.1)
        await manager.store.commit("acme", fence, record.replace(
            access_token=fresh.access_token, refresh_token=fresh.refresh_token, generation=1))

    task = asyncio.create_task(late_commit())
    assert await manager.token("acme") == fresh.access_token.reveal()
    await task
    assert emulator.ledger["redemptions"] == 0


async def test_rescued_tokens_are_adopted_by_the_next_holder(emulator: Emulator, manager):
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    fence = await leave_orphan(manager, record)
    fresh = emulator_grant(emulator, "acme")
    await manager.store.save_rescue("acme", fence, record.replace(
        access_token=fresh.access_token, refresh_token=fresh.refresh_token, generation=1))
    assert await manager.token("acme") == fresh.access_token.reveal()
    assert (await stored(manager)).record.status is Status.VALID
    assert await manager.store.rescues("acme") == []
    assert manager.stats.rescues_adopted == 1


async def test_fenced_out_commit_goes_to_rescue_and_revives_a_dead_record(emulator: Emulator,
                                                                          manager):
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    emulator.faults.set("token", latency=0.3)
    task = asyncio.create_task(manager.refresh("acme", stale=record.access_token.reveal()))
    await asyncio.sleep(0.1)
    # A takeover declared the grant dead while our redemption was in flight.
    await manager.store.put("acme", dead_record(record, "taken over"))
    creds = await task
    after = (await stored(manager)).record
    assert after.status is Status.VALID
    assert after.access_token.reveal() == creds.access_token
    assert manager.stats.rescued == 1
    assert manager.stats.rescues_adopted == 1
    assert await manager.store.rescues("acme") == []
    assert emulator.ledger["redemptions"] == 1
    assert emulator.ledger["reuse"] == 0
