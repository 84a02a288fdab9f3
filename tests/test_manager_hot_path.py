"""The fresh path does no I/O; refresh-ahead keeps callers off the slow path."""

from __future__ import annotations

import asyncio
import time

import pytest

from sfrtr import (
    InstanceUrlPolicy,
    MemoryStore,
    OAuthClient,
    OAuthConfig,
    RefreshPolicy,
    Secret,
    TokenManager,
    TokenRecord,
    Versioned,
)
from sfrtr import manager as manager_module
from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import token_grant
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio


class CountingStore(MemoryStore):
    """A memory store that counts every call the manager makes to it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def read(self, customer: str) -> Versioned | None:
        self.calls += 1
        return await super().read(customer)

    async def acquire(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        return await super().acquire(*args, **kwargs)


async def test_fresh_token_calls_touch_neither_store_nor_network(emulator: Emulator):
    store = CountingStore()
    manager = TokenManager(emulator_oauth(emulator), store)
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    before_store, before_ledger = store.calls, dict(emulator.ledger.totals)
    tokens = {await manager.token("acme") for _ in range(10_000)}
    creds = await manager.credentials("acme")
    assert len(tokens) == 1
    assert creds.access_token in tokens
    assert creds.instance_url == emulator.base_url
    assert store.calls == before_store
    assert dict(emulator.ledger.totals) == before_ledger
    await manager.aclose()


async def test_background_refresh_returns_the_current_token_at_once(emulator: Emulator):
    manager = TokenManager(emulator_oauth(emulator), MemoryStore(),
                           RefreshPolicy(background_refresh=True, refresh_margin=600))
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    # Inside the refresh margin, not yet expired.
    put = await manager.store.put("acme", record.replace(expires_at=time.time() + 60))
    # As if this worker had cached it an hour and a half ago:
    manager._cache_put("acme", put.record, put.version)
    emulator.faults.set("token", latency=0.2)
    current = await manager.token("acme")
    # Answered while the refresh it started is still pending: it did not wait for it.
    assert manager._background
    assert not any(task.done() for task in manager._background)
    assert current == record.access_token.reveal()
    await manager.wait_idle()
    assert await manager.token("acme") != current
    assert emulator.ledger["redemptions"] == 1
    await manager.aclose()


async def test_learn_expiry_uses_introspection(emulator: Emulator):
    manager = TokenManager(emulator_oauth(emulator), MemoryStore(),
                           RefreshPolicy(learn_expiry=True, session_lifetime=100_000,
                                         refresh_margin=60))
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    await manager.refresh("acme", stale=record.access_token.reveal())
    entry = manager._cache["acme"]
    # The emulator's sessions last 7200 s, not the configured 100,000 s guess.
    assert entry.expires_at - time.monotonic() == pytest.approx(7200, abs=5)
    await manager.aclose()


# -- what bounds the clock-free hot path (see the sfrtr.manager module doc) ----------
#
# These run on loops of their own whose time is a clock the test moves by hand, shared
# with the manager's monotonic clock: nothing here depends on how fast the machine is.


class HandClock:
    """Monotonic time that moves only when told; counts how often it is read."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


@pytest.fixture
def hand_clock(monkeypatch: pytest.MonkeyPatch) -> HandClock:
    clock = HandClock()
    monkeypatch.setattr(manager_module, "_monotonic", clock)
    return clock


def hand_loop(clock: HandClock) -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.time = clock  # type: ignore[method-assign]  # timers fire by the hand clock
    return loop


def offline_manager(policy: RefreshPolicy | None = None) -> tuple[TokenManager, CountingStore]:
    """A manager whose flights never need the network: the stored record stays fresh by
    the provider's clock, so a flight re-reads it and uses it (one counted store read)."""
    store = CountingStore()
    oauth = OAuthClient(OAuthConfig(client_id="hot", client_secret=Secret("s"),
                                    login_url="http://127.0.0.1:9",
                                    instance_policy=InstanceUrlPolicy.for_emulator()))
    return TokenManager(oauth, store, policy), store


async def loop_turns() -> None:
    """Let the loop run what is due: this task's wake-up first, then the timers."""
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.mark.parametrize("margin", [300.0, 0.0])
def test_the_owning_loop_stops_the_cache_at_the_refresh_time(hand_clock: HandClock,
                                                             margin: float):
    """Served without reading the clock until refresh_at; not one call after it once
    the loop that owns the timer has run (with margin 0: never past the expiry)."""
    loop = hand_loop(hand_clock)

    async def scenario() -> None:
        manager, store = offline_manager(RefreshPolicy(refresh_margin=margin))
        await manager.connect("acme", token_grant(Emulator(), "acme"))
        token = await manager.token("acme")
        entry = manager._cache["acme"]
        assert entry.loop is loop
        assert entry.timer is not None
        reads, clock_reads = store.calls, hand_clock.reads
        for _ in range(6_400):
            assert await manager.token("acme") == token
        assert store.calls == reads
        assert hand_clock.reads - clock_reads <= 6_400 // manager_module._CHECK_EVERY
        hand_clock.now = entry.refresh_at - 0.001
        await loop_turns()
        assert await manager.token("acme") == token
        assert store.calls == reads
        hand_clock.now = entry.refresh_at
        await loop_turns()
        assert entry.calls == 0  # the timer ran
        await manager.token("acme")
        assert store.calls == reads + 1  # the first call after it went to a flight
        assert manager._cache["acme"] is not entry
        assert entry.timer is None
        await manager.aclose()

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


def test_a_loop_that_runs_no_timer_is_bounded_by_the_call_count(hand_clock: HandClock):
    """The clock jumps past refresh_at and the loop never gets to run the timer (one
    callback that never yields): the cache still answers at most _CHECK_EVERY more
    calls before one reads the clock and goes to a flight."""
    loop = hand_loop(hand_clock)

    async def scenario() -> None:
        manager, store = offline_manager()
        await manager.connect("acme", token_grant(Emulator(), "acme"))
        await manager.token("acme")
        entry = manager._cache["acme"]
        reads = store.calls
        hand_clock.now = entry.refresh_at + 3_600  # past the expiry too; no yield below
        from_cache = 0
        while True:
            await manager.token("acme")  # a fresh entry never suspends: no loop turn
            if store.calls != reads:
                break  # this call read the clock and went to a flight
            from_cache += 1
        assert from_cache <= manager_module._CHECK_EVERY
        await manager.aclose()

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


def test_an_entry_timed_on_a_closed_loop_is_timed_again_on_the_next(hand_clock: HandClock):
    """The entry remembers its loop. On another loop (the first one closed: its timer
    can never fire) the next clock read arms a timer there, and past refresh_at the
    cache answers at most _CHECK_EVERY calls."""
    manager, store = offline_manager()
    first = hand_loop(hand_clock)

    async def on_first() -> str:
        await manager.connect("acme", token_grant(Emulator(), "acme"))
        return await manager.token("acme")

    try:
        token = first.run_until_complete(on_first())
    finally:
        first.close()
    entry = manager._cache["acme"]
    assert entry.loop is first
    second = hand_loop(hand_clock)

    async def on_second() -> None:
        for _ in range(manager_module._CHECK_EVERY + 1):
            assert await manager.token("acme") == token
        assert entry.loop is second
        assert entry.timer is not None
        reads = store.calls
        hand_clock.now = entry.refresh_at
        await loop_turns()
        await manager.token("acme")
        assert store.calls == reads + 1  # the timer on this loop ended it

    async def stale_on_third() -> None:
        now_entry = manager._cache["acme"]
        reads = store.calls
        hand_clock.now = now_entry.refresh_at + 1  # its timer is on the closed loop
        from_cache = 0
        while True:
            await manager.token("acme")
            if store.calls != reads:
                break
            from_cache += 1
        assert from_cache <= manager_module._CHECK_EVERY
        await manager.aclose()

    try:
        second.run_until_complete(on_second())
    finally:
        second.close()
    third = hand_loop(hand_clock)
    try:
        third.run_until_complete(stale_on_third())
    finally:
        third.close()


async def test_a_401_refreshes_whatever_the_cache_says(emulator: Emulator):
    manager = TokenManager(emulator_oauth(emulator), MemoryStore())
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    old = await manager.token("acme")
    entry = manager._cache["acme"]
    assert entry.calls > 0  # vouched for: the next calls skip the clock
    fresh = await manager.refresh("acme", stale=old)
    assert emulator.ledger["redemptions"] == 1
    assert fresh.access_token != old
    assert await manager.token("acme") == fresh.access_token
    assert entry.calls == 0
    assert entry.timer is None
    await manager.aclose()


async def test_async_with_closes_the_manager(emulator: Emulator):
    async with TokenManager(emulator_oauth(emulator), MemoryStore()) as manager:
        await manager.connect("acme", emulator_grant(emulator, "acme"))
        await manager.token("acme")
        entry = manager._cache["acme"]
        assert entry.timer is not None
        session = manager.oauth.session
    assert session.closed
    assert entry.timer is None  # the loop holds nothing of a closed manager


async def test_a_write_told_twice_keeps_the_cached_entry():
    """A mirror may notify one write twice (a Txn's record and lock events): the
    cached entry of that version stays (its timer, its place in line, a learned
    expiry), not replaced by a copy."""
    manager = TokenManager(OAuthClient(OAuthConfig(client_id="c", client_secret=Secret("s"))),
                           MemoryStore())
    try:
        record = TokenRecord(access_token=Secret("at-1"), refresh_token=Secret("rt-1"),
                             instance_url="https://x.my.salesforce.com", issued_at=1.0,
                             expires_at=time.time() + 3600)
        state = await manager.store.put("acme", record)
        entry = manager._cache["acme"]
        entry.staggered = True
        manager._on_store_change("acme", state)
        assert manager._cache["acme"] is entry
        newer = await manager.store.put("acme", record.replace(access_token=Secret("at-2")))
        assert newer.version > state.version
        assert manager._cache["acme"] is not entry
        assert manager._cache["acme"].token == "at-2"
    finally:
        await manager.aclose()
