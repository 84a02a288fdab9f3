"""Refreshes ahead of expiry across processes on etcd: what the place in line saves.

P managers, each on its own ``EtcdStore`` and lease (a process, as etcd sees it;
one OS process, so the round trips and waits are counted exactly), K customers
connected at once, C coroutines per manager calling ``token()`` for every
customer every 20 ms. Sessions are estimated at ``lifetime`` seconds and
refreshed ``margin`` ahead, so every manager comes due for every customer in
the same second: with ``refresh_stagger=0`` they all acquire at once (one
failed compare per process beyond the first); with the default the first in
line refreshes and the others find its new record before their turn.
Reported: redemptions (K expected), etcd round trips per refresh, callers that
waited (a ``token()`` that took over 5 ms: it joined a refresh) and the longest
wait. The emulator serves the token endpoint (50 ms per refresh).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from sfrtr import RefreshPolicy, TokenManager
from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import oauth_config, token_grant
from sfrtr.oauth.client import OAuthClient
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcd


async def one(etcd: LocalEtcd, processes: int, customers: int, coroutines: int,
              stagger: float, lifetime: float = 6.0, margin: float = 3.0) -> dict[str, Any]:
    em = Emulator(api_limit=10**9)
    em.faults.set("token", latency=0.05)
    namespace = f"bench/ahead/{uuid.uuid4().hex[:8]}"
    policy = RefreshPolicy(session_lifetime=lifetime, refresh_margin=margin,
                           refresh_stagger=stagger, lease_margin=0.5)
    async with em.serve() as base:
        managers = [TokenManager(OAuthClient(oauth_config(base)), EtcdStore(
            EtcdSettings(endpoints=[etcd.endpoint]), namespace=namespace, lease_ttl=30),
            policy, worker_id=f"p{i}") for i in range(processes)]
        stores: list[EtcdStore] = [m.store for m in managers]  # type: ignore[misc]
        try:
            for s in stores:
                await s.start()
            async with asyncio.timeout(30):  # every process knows every other one
                while any(s.live_processes != processes for s in stores):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            names = [f"c{i}" for i in range(customers)]
            for c in names:
                await managers[0].connect(c, token_grant(em, c))
            for m in managers:
                for c in names:
                    await m.token(c)
            before = sum(s.client.round_trips for s in stores)
            waits: list[float] = []
            until = time.monotonic() + margin + 1.0  # past every turn (at most margin/2 late)

            async def caller(m: TokenManager, index: int) -> None:
                while time.monotonic() < until:
                    for c in names[index::coroutines]:
                        started = time.perf_counter()
                        await m.token(c)
                        waited = time.perf_counter() - started
                        if waited > 0.005:
                            waits.append(waited)
                    await asyncio.sleep(0.02)

            await asyncio.gather(*(caller(m, i) for m in managers for i in range(coroutines)))
            trips = sum(s.client.round_trips for s in stores) - before
        finally:
            for m in managers:
                await m.aclose()
    redemptions = em.ledger["redemptions"]
    return {"refresh_stagger": stagger, "processes": processes, "customers": customers,
            "redemptions": redemptions, "reuse": em.ledger["reuse"],
            "etcd round trips/refresh": round(trips / max(1, redemptions), 2),
            "callers that waited": len(waits),
            "longest wait ms": round(max(waits, default=0.0) * 1000, 1)}


async def run(processes: tuple[int, ...] = (2, 4, 8), customers: int = 20,
              coroutines: int = 4, rounds: int = 1, lifetime: float = 6.0,
              margin: float = 3.0) -> list[dict[str, Any]]:
    """Default stagger and none, side by side at each P (alternating, ``rounds`` each)."""
    rows = []
    with LocalEtcd() as etcd:
        for p in processes:
            for _ in range(rounds):
                for stagger in (RefreshPolicy().refresh_stagger, 0.0):
                    rows.append(await one(etcd, p, customers, coroutines, stagger,
                                          lifetime, margin))
    return rows
