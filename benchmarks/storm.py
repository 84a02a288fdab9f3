"""Refresh storms against the emulator over real sockets (memory store).

* one customer, C coroutines, one expired token: redemptions must be 1;
  waiter latency is compared with the emulator's token latency L;
* K customers expire at once: refreshes per second and CPU per refresh.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

from sfrtr import MemoryStore, OAuthClient, TokenManager
from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import oauth_config, token_grant


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _manager(em: Emulator, base: str, customers: list[str]) -> TokenManager:
    manager = TokenManager(OAuthClient(oauth_config(base)), MemoryStore())
    for c in customers:
        record = await manager.connect(c, token_grant(em, c))
        # Past its estimated expiry: the next token() must refresh.
        await manager.store.put(c, record.replace(expires_at=time.time() - 1))
    manager._cache.clear()
    return manager


async def singleflight_storm(coroutines: int = 10_000, latency: float = 0.05) -> dict[str, Any]:
    em = Emulator()
    em.faults.set("token", latency=latency)
    async with em.serve() as base:
        manager = await _manager(em, base, ["acme"])
        waits: list[float] = []

        async def one() -> None:
            started = time.perf_counter()
            await manager.token("acme")
            waits.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(coroutines)))
        wall = time.perf_counter() - started
        await manager.aclose()
    waits.sort()
    return {"coroutines": coroutines, "latency L ms": latency * 1000,
            "redemptions": em.ledger["redemptions"], "reuse": em.ledger["reuse"],
            "wall ms": wall * 1000, "p50 wait ms": waits[len(waits) // 2] * 1000,
            "p99 wait ms": waits[int(len(waits) * 0.99)] * 1000,
            "p99 - L ms": waits[int(len(waits) * 0.99)] * 1000 - latency * 1000}


async def many_customer_storm(customers: int = 10_000) -> dict[str, Any]:
    em = Emulator()
    async with em.serve() as base:
        names = [f"c{i}" for i in range(customers)]
        manager = await _manager(em, base, names)
        cpu0, started = _cpu(), time.perf_counter()
        await asyncio.gather(*(manager.token(c) for c in names))
        wall, cpu = time.perf_counter() - started, _cpu() - cpu0
        await manager.aclose()
    return {"customers": customers, "redemptions": em.ledger["redemptions"],
            "reuse": em.ledger["reuse"], "wall s": wall, "refreshes/s": customers / wall,
            "CPU us/refresh (sfrtr + emulator)": cpu / customers * 1e6}
