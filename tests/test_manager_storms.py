"""Singleflight through the manager: storms of callers, one redemption each."""

from __future__ import annotations

import asyncio
import time

import pytest

from sfrtr import MemoryStore, TokenManager
from sfrtr.emulator import Emulator
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio


async def connect_expired(manager: TokenManager, emulator: Emulator, customer: str) -> str:
    """Connect ``customer`` with a record whose access token is past its estimated expiry."""
    record = await manager.connect(customer, emulator_grant(emulator, customer))
    await manager.store.put(customer, record.replace(expires_at=time.time() - 1))
    manager._cache.clear()
    emulator.expire_sessions(customer)
    return record.access_token.reveal()


async def test_ten_thousand_coroutines_one_expired_customer(emulator: Emulator, manager):
    old = await connect_expired(manager, emulator, "acme")
    emulator.faults.set("token", latency=0.05)
    tokens = await asyncio.gather(*(manager.token("acme") for _ in range(10_000)))
    assert emulator.ledger["redemptions"] == 1
    assert len(set(tokens)) == 1
    assert tokens[0] != old
    assert emulator.ledger["reuse"] == 0
    # The token they got is the one Salesforce considers live.
    assert tokens[0] in emulator.world.access_index


async def test_thousand_customers_twenty_coroutines_each(emulator: Emulator, manager):
    customers = [f"c{i}" for i in range(1000)]
    for c in customers:
        await connect_expired(manager, emulator, c)
    results = await asyncio.gather(*(manager.token(c) for c in customers for _ in range(20)))
    assert emulator.ledger["redemptions"] == 1000
    assert emulator.ledger["reuse"] == 0
    assert emulator.ledger["concurrent_rejections"] == 0
    assert len(set(results)) == 1000


async def test_cancelling_the_first_caller_mid_refresh(emulator: Emulator, manager):
    await connect_expired(manager, emulator, "acme")
    emulator.faults.set("token", latency=0.2)
    first = asyncio.create_task(manager.token("acme"))
    await asyncio.sleep(0.05)
    others = [asyncio.create_task(manager.token("acme")) for _ in range(50)]
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    tokens = await asyncio.gather(*others)
    assert len(set(tokens)) == 1
    assert emulator.ledger["redemptions"] == 1
    assert (await manager.store.read("acme")).record.access_token.reveal() == tokens[0]


async def test_two_managers_on_one_store_share_one_refresh(emulator: Emulator):
    """Two workers' managers over one store (as in one process with two pools)."""
    store = MemoryStore()
    a = TokenManager(emulator_oauth(emulator), store)
    b = TokenManager(emulator_oauth(emulator), store)
    try:
        await connect_expired(a, emulator, "acme")
        b._cache.clear()
        emulator.faults.set("token", latency=0.1)
        tokens = await asyncio.gather(*(m.token("acme") for m in (a, b) for _ in range(100)))
        assert emulator.ledger["redemptions"] == 1
        assert len(set(tokens)) == 1
        assert a.stats.redemptions + b.stats.redemptions == 1
    finally:
        await a.aclose()
        await b.oauth.aclose()
