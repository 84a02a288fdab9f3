"""Memory: bytes per cached customer in the token manager (and in the memory store)."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from typing import Any

from sfrtr import InstanceUrlPolicy, MemoryStore, OAuthClient, OAuthConfig, Secret, TokenManager
from sfrtr.oauth.grant import TokenGrant
from sfrtr.protocol import grant_record


def _grant(i: int) -> TokenGrant:
    # Token lengths as Salesforce issues them (~112-char access, ~87-char refresh).
    return TokenGrant(access_token=Secret(f"00D{i:015d}!" + "A" * 94),
                      refresh_token=Secret(f"5Aep861{i:010d}" + "r" * 70),
                      instance_url="https://acme.my.salesforce.com",
                      identity_url=f"https://login.salesforce.com/id/00D/{i:015d}",
                      issued_at=time.time(), scope="api refresh_token")


async def run(customers: int = 100_000) -> list[dict[str, Any]]:
    oauth = OAuthClient(OAuthConfig(client_id="bench", client_secret=Secret("s"),
                                    login_url="http://127.0.0.1:9",
                                    instance_policy=InstanceUrlPolicy.for_emulator()))
    manager = TokenManager(oauth, MemoryStore())
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.take_snapshot()
    records = [grant_record(_grant(i), lifetime=7200) for i in range(customers)]
    names = [f"customer-{i:06d}" for i in range(customers)]
    gc.collect()
    before = tracemalloc.take_snapshot()
    for name, record in zip(names, records, strict=True):
        manager._cache_put(name, record, 1)  # what a worker holds per customer it serves
    gc.collect()
    cache = tracemalloc.take_snapshot().compare_to(before, "filename")
    cache_bytes = sum(d.size_diff for d in cache)
    before = tracemalloc.take_snapshot()
    for name, record in zip(names, records, strict=True):
        await manager.store.put(name, record)
    gc.collect()
    store = tracemalloc.take_snapshot().compare_to(before, "filename")
    store_bytes = sum(d.size_diff for d in store)
    before = tracemalloc.take_snapshot()
    for name in names:
        await manager.token(name)  # served once: its refresh timer is armed on the loop
    gc.collect()
    timers = tracemalloc.take_snapshot().compare_to(before, "filename")
    timer_bytes = sum(d.size_diff for d in timers)
    total_bytes = sum(d.size_diff for d in
                      tracemalloc.take_snapshot().compare_to(start, "filename"))
    tracemalloc.stop()
    await manager.aclose()
    return [
        {"what": "manager hot-path cache", "customers": customers,
         "bytes/customer": cache_bytes / customers},
        {"what": "MemoryStore (records shared with the caller)", "customers": customers,
         "bytes/customer": store_bytes / customers},
        {"what": "refresh timer of a served customer (loop TimerHandle)",
         "customers": customers, "bytes/customer": timer_bytes / customers},
        {"what": "everything: name, tokens, record, cache, store, timer", "customers": customers,
         "bytes/customer": total_bytes / customers},
    ]


if __name__ == "__main__":
    print(asyncio.run(run()))
