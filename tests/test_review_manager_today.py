"""Adversarial review of today's coordination-core changes (grants' hosts and apps,
hooks, settling of unknown outcomes, aclose), against the emulator over real sockets
and real stores.

A test marked ``xfail(strict=True)`` reproduces a defect found by the review: it
fails today and turns into an unexpected pass (a failure under ``strict``) once
fixed, so the marker must come off with the fix. The others pin what was found
sound.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

import sfrtr.manager as manager_module
from sfrtr import (
    Hooks,
    MemoryStore,
    RefreshPolicy,
    Secret,
    SfrtrError,
    SqliteStore,
    Status,
    TokenManager,
)
from sfrtr.emulator import DEFAULT_CLIENT_ID, Emulator
from sfrtr.oauth_state import InvalidState, StateSigner
from sfrtr.store.sealing import Sealer
from tests.conftest import emulator_grant, emulator_oauth
from tests.raw_store import ring

pytestmark = pytest.mark.anyio


@pytest.fixture
async def attacker() -> AsyncIterator[Emulator]:
    """A second token endpoint: a host the grant was never issued by."""
    em = Emulator(rng_seed=2)
    async with em.serve():
        yield em


def _pending_settle_timers(manager: TokenManager) -> int:
    loop = asyncio.get_running_loop()
    return sum(1 for t in manager._settlers.values()
               if not t.cancelled() and t.when() > loop.time())


# -- findings (xfail until fixed) --------------------------------------------------------


# Found by review; fixed.
async def test_settle_timers_stay_bounded_while_an_unknown_outcome_cannot_settle(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch):
    # The retry delay shortened so rounds come fast; the growth does not depend on it.
    monkeypatch.setattr(manager_module, "_STORE_RETRY_DELAY", 0.3)
    manager = TokenManager(
        emulator_oauth(emulator, timeout=0.5, connect_timeout=0.3, answer_grace=0.1),
        MemoryStore(), RefreshPolicy(lease_margin=0.2, recovery="introspect"))
    try:
        await manager.connect("acme", emulator_grant(emulator, "acme"))
        stale = await manager.token("acme")
        # A provider outage: the refresh gets a 5xx (unknown outcome) and recovery's
        # introspection fails too, round after round.
        emulator.faults.set("token", error_rate=1.0)
        emulator.faults.set("introspect", error_rate=1.0)
        with pytest.raises(SfrtrError):
            await manager.refresh("acme", stale=stale)
        most = 0
        for _ in range(20):
            await asyncio.sleep(0.5)
            most = max(most, _pending_settle_timers(manager))
        # One customer, one unknown outcome: one timer to settle it (two at a hand-over).
        assert most <= 2, f"{most} settle timers pending for one customer"
    finally:
        emulator.faults.clear()
        await manager.aclose()


# Found by review; fixed.
async def test_aclose_lets_a_refresh_started_by_a_hook_finish(emulator: Emulator,
                                                             tmp_path: Path):
    path = tmp_path / "tokens.db"
    started = asyncio.Event()
    box: dict[str, object] = {}

    async def on_refreshed(customer: str, generation: int) -> None:
        if customer == "a":
            await asyncio.sleep(0.3)  # the application's own I/O first (an API call)
            started.set()
            manager = box["manager"]
            assert isinstance(manager, TokenManager)
            await manager.refresh("b", stale=str(box["b"]))

    manager = TokenManager(emulator_oauth(emulator, timeout=8.0), SqliteStore(path),
                           RefreshPolicy(lease_margin=0.5, store_patience=0.5),
                           hooks=Hooks(on_refreshed=on_refreshed))
    box["manager"] = manager
    await manager.connect("a", emulator_grant(emulator, "a"))
    await manager.connect("b", emulator_grant(emulator, "b"))
    box["b"] = await manager.token("b")
    await manager.refresh("a", stale=await manager.token("a"))
    emulator.faults.set("token", latency=6.0)  # b's refresh outlasts the hooks' drain
    try:
        await manager.aclose()
        assert started.is_set()
        still_running = len(manager._flights)
        assert not still_running, f"{still_running} refreshes still running after aclose"
    finally:
        emulator.faults.clear()
        with contextlib.suppress(BaseException):
            await manager._flights.wait_idle()
        for timer in [*manager._retries.values(), *manager._settlers]:
            timer.cancel()
    reader = SqliteStore(path)
    try:
        state = await reader.read("b")
        assert state is not None
        assert emulator.ledger.totals["redemptions"] == 2
        assert state.record.status is Status.VALID
        assert state.record.generation == 1
    finally:
        await reader.aclose()


# Found by review; fixed.
async def test_a_sealed_record_pointed_at_another_login_host_does_not_open(
        emulator: Emulator, attacker: Emulator, tmp_path: Path):
    path = tmp_path / "tokens.db"
    keys = ring("k1")
    grant = dataclasses.replace(emulator_grant(emulator, "acme"),
                                token_host=str(emulator.base_url),
                                client_id=DEFAULT_CLIENT_ID)
    first = TokenManager(emulator_oauth(emulator), SqliteStore(path, sealer=Sealer(keys)),
                         RefreshPolicy(lease_margin=0.5))
    await first.connect("acme", grant)
    stale = await first.token("acme")
    await first.aclose()
    # Someone with write access to the database but no key edits a clear field.
    with contextlib.closing(sqlite3.connect(path)) as db:
        (raw,) = db.execute("SELECT record FROM sfrtr_tokens WHERE customer = 'acme'").fetchone()
        data = orjson.loads(raw)
        assert "sealed" in data
        assert "refresh_token" not in data
        data["token_host"] = str(attacker.base_url)
        db.execute("UPDATE sfrtr_tokens SET record = ? WHERE customer = 'acme'",
                   (orjson.dumps(data),))
        db.commit()
    second = TokenManager(emulator_oauth(emulator), SqliteStore(path, sealer=Sealer(keys)),
                          RefreshPolicy(lease_margin=0.5))
    try:
        with contextlib.suppress(SfrtrError):
            await second.refresh("acme", stale=stale)
        reached = +attacker.ledger.totals
        assert not reached, f"the other host got a token request: {dict(reached)}"
        assert emulator.ledger.totals["rejected_refreshes"] == 0
    finally:
        await second.aclose()


# Found by review; fixed.
async def test_a_rotation_stored_by_a_reclaim_calls_on_refreshed(emulator: Emulator,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(manager_module, "_STORE_RETRY_DELAY", 0.3)
    path = tmp_path / "tokens.db"
    refreshed: list[int] = []
    manager = TokenManager(emulator_oauth(emulator), SqliteStore(path, busy_timeout=0.2),
                           RefreshPolicy(lease_margin=0.5, store_patience=0.5),
                           hooks=Hooks(on_refreshed=lambda c, g: refreshed.append(g)))
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        await manager.connect("acme", emulator_grant(emulator, "acme"))
        stale = await manager.token("acme")
        emulator.faults.set("token", latency=0.5)
        flight = asyncio.ensure_future(manager.refresh("acme", stale=stale))
        await asyncio.sleep(0.25)  # acquired; the token request is being processed
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the database
        with pytest.raises(SfrtrError):
            await flight  # rotated, not stored: kept in memory
        blocker.execute("ROLLBACK")
        for _ in range(40):  # the background retry reclaims the section
            state = await manager.store.read("acme")
            if state is not None and state.record.status is Status.VALID and \
                    state.record.generation == 1:
                break
            await asyncio.sleep(0.1)
        assert state is not None
        assert state.record.generation == 1
        assert manager.stats.reclaimed == 1
        assert emulator.ledger.totals["redemptions"] == 1
        await manager.hooks.drain()
        assert refreshed == [1]
    finally:
        emulator.faults.clear()
        blocker.close()
        await manager.aclose()


# -- sound: pinned ----------------------------------------------------------------------


async def test_hooks_fire_once_across_two_workers_sharing_a_store(emulator: Emulator,
                                                                 tmp_path: Path):
    calls: Counter[tuple[str, str]] = Counter()
    seen_args: list[tuple[object, ...]] = []

    def hooks(name: str) -> Hooks:
        def refreshed(customer: str, generation: int) -> None:
            calls[(name, "refreshed")] += 1
            seen_args.append((customer, generation))

        def dead(customer: str, reason: str) -> None:
            calls[(name, "dead")] += 1
            seen_args.append((customer, reason))

        return Hooks(on_refreshed=refreshed, on_reauth_required=dead)

    path = tmp_path / "tokens.db"
    policy = RefreshPolicy(lease_margin=0.5, busy_backoff=0.05)
    one = TokenManager(emulator_oauth(emulator), SqliteStore(path), policy, hooks=hooks("one"))
    two = TokenManager(emulator_oauth(emulator), SqliteStore(path), policy, hooks=hooks("two"))
    try:
        grant = emulator_grant(emulator, "acme")
        await one.connect("acme", grant)
        stale = await one.token("acme")
        for _ in range(3):  # three rotations, each raced by both workers
            await asyncio.gather(one.refresh("acme", stale=stale),
                                 two.refresh("acme", stale=stale))
            stale = await one.token("acme")
        await one.hooks.drain()
        await two.hooks.drain()
        refreshed = calls[("one", "refreshed")] + calls[("two", "refreshed")]
        assert emulator.ledger.totals["redemptions"] == 3
        assert emulator.ledger.totals["reuse"] == 0
        assert refreshed == 3
        # The grant revoked at the provider: both workers fail, one hook call.
        assert grant.refresh_token is not None
        await emulator_oauth(emulator).revoke(grant.refresh_token)
        results = await asyncio.gather(one.refresh("acme", stale=stale),
                                       two.refresh("acme", stale=stale),
                                       return_exceptions=True)
        assert all(isinstance(r, SfrtrError) for r in results)
        await one.hooks.drain()
        await two.hooks.drain()
        assert calls[("one", "dead")] + calls[("two", "dead")] == 1
        state = await one.store.read("acme")
        assert state is not None
        assert state.record.status is Status.REAUTH_REQUIRED
        tokens = {state.record.access_token.reveal(), state.record.refresh_token.reveal(),
                  stale}
        assert not any(str(a) in tokens for args in seen_args for a in args)
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_failing_hanging_or_reentrant_hook_never_holds_up_a_refresh(
        emulator: Emulator):
    release = asyncio.Event()
    box: dict[str, TokenManager] = {}
    reentered: list[str] = []

    async def hangs(customer: str, generation: int) -> None:
        await release.wait()

    def raises(customer: str, reason: str) -> None:
        raise RuntimeError("the application's bug")

    async def reenters(customer: str, reason: str) -> None:
        with contextlib.suppress(SfrtrError):
            await box["m"].token(customer)  # back into the manager from a hook
        reentered.append(customer)

    manager = TokenManager(emulator_oauth(emulator), MemoryStore(),
                           RefreshPolicy(lease_margin=0.5),
                           hooks=Hooks(on_refreshed=hangs, on_reauth_required=raises,
                                       on_lockout_risk=reenters))
    box["m"] = manager
    try:
        await manager.connect("acme", emulator_grant(emulator, "acme"))
        stale = await manager.token("acme")
        for _ in range(3):  # each refresh leaves one more hook call hanging
            creds = await asyncio.wait_for(manager.refresh("acme", stale=stale), 5.0)
            assert creds.access_token != stale
            stale = creds.access_token
        assert len(manager.hooks._running) == 3
        emulator.faults.set("token", error_rate=1.0)  # unknown outcome: lockout risk hook
        with pytest.raises(SfrtrError):
            await asyncio.wait_for(manager.refresh("acme", stale=stale), 5.0)
        for _ in range(50):
            if reentered:
                break
            await asyncio.sleep(0.05)
        assert reentered == ["acme"]
    finally:
        emulator.faults.clear()
        # aclose cancels the hanging calls after its drain timeout; release them first.
        release.set()
        await manager.aclose()
    assert not manager.hooks._running


def test_a_login_host_cannot_be_changed_or_added_to_a_signed_state():
    signer = StateSigner(Secret("k" * 32))
    text, _state = signer.sign("acme", "https://app.example/cb", "https://test.salesforce.com")
    assert signer.verify(text, "https://app.example/cb").login_host == \
        "https://test.salesforce.com"
    payload, mac = text.split(".")

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    fields = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields[4] = "https://evil.my.salesforce.com"
    with pytest.raises(InvalidState):
        signer.check(f"{b64(orjson.dumps(fields))}.{mac}", "https://app.example/cb")
    plain, _ = signer.sign("acme", "https://app.example/cb")
    p_payload, p_mac = plain.split(".")
    p_fields = orjson.loads(base64.urlsafe_b64decode(p_payload + "=" * (-len(p_payload) % 4)))
    with pytest.raises(InvalidState):  # a host appended to a state signed without one
        signer.check(f"{b64(orjson.dumps([*p_fields, 'https://evil.example']))}.{p_mac}",
                      "https://app.example/cb")
