"""``client.query()`` against a raw aiohttp GET with a static token.

Same emulator, same HTTP session, same query, interleaved rounds so drift on
a busy machine hits both sides alike. The ratio is raw-relative throughput.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sfrtr import (
    Client,
    MemoryStore,
    OAuthClient,
    TokenManager,
)
from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import oauth_config, token_grant

SOQL = "SELECT Id, Name FROM Account LIMIT 5"


async def run(calls: int = 4000, concurrency: int = 50, rounds: int = 4) -> list[dict[str, Any]]:
    em = Emulator(api_limit=10**9)
    async with em.serve() as base:
        oauth = OAuthClient(oauth_config(base))
        manager = TokenManager(oauth, MemoryStore())
        grant = token_grant(em, "acme")
        await manager.connect("acme", grant)
        em.seed("acme", "Account", [{"Name": f"n{i}"} for i in range(5)])
        client = Client("acme", manager)
        session = oauth.session
        url = f"{grant.instance_url}/services/data/v67.0/query"
        headers = {"Authorization": f"Bearer {grant.access_token.reveal()}",
                   "Accept": "application/json"}

        async def raw() -> None:
            async with session.get(url, params={"q": SOQL}, headers=headers) as resp:
                resp.raise_for_status()
                await resp.json()

        async def sfrtr_query() -> None:
            await client.query(SOQL)

        async def timed(fn: Any) -> float:
            per_worker = calls // concurrency

            async def worker() -> None:
                for _ in range(per_worker):
                    await fn()

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return per_worker * concurrency / (time.perf_counter() - started)

        await timed(raw)  # warm the connection pool
        totals = {"raw aiohttp GET, static token": 0.0, "sfrtr client.query()": 0.0}
        for _ in range(rounds):
            totals["raw aiohttp GET, static token"] += await timed(raw)
            totals["sfrtr client.query()"] += await timed(sfrtr_query)
        await manager.aclose()
    base_rate = totals["raw aiohttp GET, static token"] / rounds
    return [{"variant": k, "calls/s": v / rounds, "ratio to raw": v / rounds / base_rate}
            for k, v in totals.items()]
