"""``claim_once`` and ``async with`` on every store: memory, SQLite, Postgres, etcd.

Two instances of one store stand for two worker processes (the memory store has
only one process: both are the same instance). Real servers, nothing mocked.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from sfrtr import StoreError
from sfrtr.store.base import OnceStore
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from tests.once_stores import STORES, make_store

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres_server", "tests.once_stores"]  # the pair fixture



async def test_a_key_is_claimed_once_across_processes(pair):
    _, first, second = pair
    assert isinstance(first, OnceStore)
    assert await first.claim_once("state/n1", 60) is True
    assert await first.claim_once("state/n1", 60) is False
    assert await second.claim_once("state/n1", 60) is False
    # Another key is its own claim; odd characters are keys like any other.
    assert await second.claim_once("state/n2 ä/%", 60) is True
    assert await first.claim_once("state/n2 ä/%", 60) is False


async def test_concurrent_claims_have_one_winner(pair):
    _, first, second = pair
    results = await asyncio.gather(*(store.claim_once("race", 60)
                                     for _ in range(6) for store in (first, second)))
    assert sorted(results) == [False] * 11 + [True]


async def test_an_expired_claim_can_be_made_again(pair):
    kind, first, second = pair
    ttl = 2.0 if kind == "etcd" else 0.5  # etcd's shortest lease is 2 s
    assert await first.claim_once("short", ttl) is True
    assert await second.claim_once("short", ttl) is False
    deadline = time.monotonic() + ttl + 8.0  # etcd expires leases on its own schedule
    while not await second.claim_once("short", ttl):
        assert time.monotonic() < deadline, "the claim never expired"
        await asyncio.sleep(0.25)
    assert await first.claim_once("short", 60) is False  # the new claim holds


@pytest.mark.parametrize("kind", STORES)
async def test_async_with_starts_and_closes(request, tmp_path, kind):
    make = make_store(request, tmp_path, kind)
    async with make() as store:  # type: ignore[attr-defined]
        assert await store.read("nobody") is None
        assert await store.claim_once("k", 60) is True
        kept = store
    if kind == "memory":
        assert await kept.claim_once("k", 60) is False  # nothing to close: still usable
    else:
        with pytest.raises(StoreError, match="closed"):
            await kept.read("nobody")


async def test_an_etcd_claim_whose_answer_was_lost_is_still_won(etcd_server, namespace):
    """The claim's Txn lands, its answer is cut (the proxy forwards the request, then
    drops the connection), and the client retries it on the next endpoint: the retry
    finds the key its first attempt made, and knows it by its value. The claim stays
    made for everyone else (a replay is refused)."""
    from benchmarks.etcd_proxy import EtcdProxy

    proxy = EtcdProxy(etcd_server.endpoint)
    await proxy.start()
    store = EtcdStore(EtcdSettings(endpoints=[proxy.endpoint, etcd_server.endpoint]),
                      namespace=namespace, lease_ttl=6)
    other = EtcdStore(EtcdSettings(endpoints=[etcd_server.endpoint]), namespace=namespace,
                      lease_ttl=6)
    try:
        await store.start()
        key = "oauth-state/" + "n" * 150  # the claim's Txn: the only request this big
        proxy.min_request, proxy.lose_probability = 400, 1.0
        first = await store.claim_once(key, 60)
        proxy.lose_probability = 0.0
        assert proxy.stats.cuts == 1
        assert store.client.failovers == 1
        assert first is True, "the first claim of the key was refused as a replay"
        assert await other.claim_once(key, 60) is False
    finally:
        await store.aclose()
        await other.aclose()
        await proxy.aclose()
