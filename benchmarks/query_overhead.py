"""``client.query()`` against a raw aiohttp GET with a static token.

Fair by construction: the same emulator (in process), the same HTTP session,
the same query and concurrency, and the same work on the answer (a status
check and ``orjson.loads`` of the body, which is what the client does). Rounds
are interleaved and alternate which side goes first, so drift on a busy
machine hits both sides alike; each round's ratio is reported, and the median
of those ratios is the figure to quote (a mean of throughputs lets one noisy
round decide). Beside the wall-clock ratio, the ratio of calls per CPU second
of this process (client and emulator together): on a shared machine another
process's burst moves the first a lot and the second little.

``python -m benchmarks.query_overhead [--rounds N] [--calls N] [--concurrency N]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

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
    """One row per round (raw and sfrtr calls/s, their ratios), then the medians."""
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
                if resp.status != 200:
                    raise RuntimeError(f"raw GET answered {resp.status}")
                orjson.loads(await resp.read())

        async def sfrtr_query() -> None:
            await client.query(SOQL)

        async def timed(fn: Callable[[], Awaitable[None]]) -> tuple[float, float]:
            """Calls per second of wall clock, and per second of this process's CPU."""
            per_worker = calls // concurrency

            async def worker() -> None:
                for _ in range(per_worker):
                    await fn()

            started, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            done = per_worker * concurrency
            return (done / (time.perf_counter() - started),
                    done / (time.process_time() - cpu))

        await timed(raw)  # warm the connection pool and both code paths
        await timed(sfrtr_query)
        rows: list[dict[str, Any]] = []
        for i in range(rounds):
            if i % 2:
                ours, theirs = await timed(sfrtr_query), await timed(raw)
            else:
                theirs, ours = await timed(raw), await timed(sfrtr_query)
            rows.append({"round": str(i + 1), "first": "sfrtr" if i % 2 else "raw",
                         "raw GET calls/s": theirs[0], "client.query() calls/s": ours[0],
                         "ratio": ours[0] / theirs[0], "ratio per CPU s": ours[1] / theirs[1],
                         "load (1 min)": os.getloadavg()[0]})
        await manager.aclose()
    rows.append({"round": "median", "first": "",
                 **{k: statistics.median(r[k] for r in rows)
                    for k in ("raw GET calls/s", "client.query() calls/s", "ratio",
                              "ratio per CPU s", "load (1 min)")}})
    return rows


def main() -> None:
    from benchmarks import report

    parser = argparse.ArgumentParser(prog="python -m benchmarks.query_overhead")
    parser.add_argument("--calls", type=int, default=4000, help="calls per side per round")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    params = {"calls": args.calls, "concurrency": args.concurrency, "rounds": args.rounds}
    rows = asyncio.run(run(**params))
    print(report.table("Query overhead: same emulator, same session", rows))
    report.write("query_overhead", params, rows)


if __name__ == "__main__":
    main()
