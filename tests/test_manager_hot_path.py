"""The fresh path does no I/O; refresh-ahead keeps callers off the slow path."""

from __future__ import annotations

import time

import pytest

from sfrtr import MemoryStore, RefreshPolicy, TokenManager, Versioned
from sfrtr.emulator import Emulator
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
    started = time.monotonic()
    current = await manager.token("acme")
    assert time.monotonic() - started < 0.1  # did not wait for the refresh
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
