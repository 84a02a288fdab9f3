"""Loading N rows: Bulk API 2.0 against sObject Collections and single-record calls.

``python -m benchmarks.bulk`` (``--quick`` for a smoke-sized run). The
emulator runs in a child process, so the client's memory is measured alone:
the peak of Python allocations (tracemalloc) during each run, and the growth
of the process's peak RSS. Bulk runs at two sizes to show the memory is flat;
single-record and Collections runs are timed at smaller sizes and their API
calls for the full size are computed (one call per record, one per 200).

Every figure is from the emulator on loopback: the rows/s of a real org are
bounded by Salesforce's processing, not by the client. What carries over is
the API calls each way costs, and that the client's memory does not grow
with the input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

from benchmarks import report
from sfrtr import Client, MemoryStore, OAuthClient, RetryPolicy, Secret, TokenManager
from sfrtr.emulator import DEFAULT_CLIENT_SECRET, Emulator
from sfrtr.emulator.sdk import oauth_config
from sfrtr.oauth.grant import parse_grant
from sfrtr.oauth.instance_url import InstanceUrlPolicy
from sfrtr.salesforce.bulk import WaitPolicy

POLL = WaitPolicy(first=0.2, cap=2.0)


async def _serve(customers: int) -> None:
    """The child: an emulator with generous limits, its grants on stdout."""
    em = Emulator(api_limit=10**9)
    em.bulk.slice_rows = 20_000
    async with em.serve() as base:
        grants = {f"c{i}": em.grant(f"c{i}") for i in range(customers)}
        print(json.dumps({"base_url": base, "grants": grants}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def _rows(n: int) -> AsyncIterator[dict[str, Any]]:
    for i in range(n):
        yield {"Name": f"Account {i:07d}", "External_Id__c": f"ext-{i}",
               "Industry": "Technology" if i % 3 else None}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Run:
    """Time, API calls and client memory of one measured piece of work."""

    def __init__(self, client: Client, traced: bool) -> None:
        self.client, self.traced = client, traced

    async def __aenter__(self) -> _Run:
        await self.client.limits()
        assert self.client.limit_info is not None
        self.calls0 = self.client.limit_info.used + 1  # the limits() call itself
        self.rss0 = _rss_mb()
        if self.traced:
            tracemalloc.start()
        self.t0 = time.perf_counter()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.peak_mb = tracemalloc.get_traced_memory()[1] / 2**20 if self.traced else None
        if self.traced:
            tracemalloc.stop()
        self.rss_growth = _rss_mb() - self.rss0
        await self.client.limits()
        assert self.client.limit_info is not None
        self.calls = self.client.limit_info.used - self.calls0


async def _bulk(client: Client, n: int, traced: bool) -> dict[str, Any]:
    async with _Run(client, traced) as run:
        result = await client.bulk.insert("Account", _rows(n), poll=POLL)
        saved = 0
        async for _ in result.successful():
            saved += 1
    assert saved == n, (saved, n)
    return {"way": "Bulk API 2.0 insert + results", "rows": n, "jobs": len(result.jobs),
            "seconds": run.seconds, "rows_per_s": n / run.seconds, "api_calls": run.calls,
            # not extrapolated: a bulk load's calls grow with its jobs (one per
            # upload of up to 150 MB) and polls, not with its rows
            "calls_per_1M_rows": run.calls if n == 1_000_000 else None,
            "peak_py_alloc_mb": run.peak_mb, "rss_growth_mb": run.rss_growth}


async def _bulk_query(client: Client, n: int) -> dict[str, Any]:
    async with _Run(client, traced=True) as run:
        job = await client.bulk.query("SELECT Id, Name, External_Id__c FROM Account",
                                      poll=POLL)
        seen = 0
        async for _ in job.rows(max_records=100_000):
            seen += 1
    assert seen == n
    return {"way": "Bulk API 2.0 query, rows streamed", "rows": n, "jobs": 1,
            "seconds": run.seconds, "rows_per_s": n / run.seconds, "api_calls": run.calls,
            "calls_per_1M_rows": None, "peak_py_alloc_mb": run.peak_mb,
            "rss_growth_mb": run.rss_growth}


async def _collections(client: Client, n: int) -> dict[str, Any]:
    rows = [r async for r in _rows(n)]
    async with _Run(client, traced=False) as run:
        results = await client.collections.create("Account", rows)
    assert all(r.success for r in results)
    return {"way": "sObject Collections create (200/call)", "rows": n, "jobs": None,
            "seconds": run.seconds, "rows_per_s": n / run.seconds, "api_calls": run.calls,
            "calls_per_1M_rows": math.ceil(1_000_000 / 200), "peak_py_alloc_mb": None,
            "rss_growth_mb": None}


async def _single(client: Client, n: int, concurrency: int = 20) -> dict[str, Any]:
    rows = [r async for r in _rows(n)]
    queue = iter(rows)

    async def worker() -> None:
        for row in queue:
            await client.create("Account", row)

    async with _Run(client, traced=False) as run:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"way": f"single-record create ({concurrency} at a time)", "rows": n,
            "jobs": None, "seconds": run.seconds, "rows_per_s": n / run.seconds,
            "api_calls": run.calls, "calls_per_1M_rows": 1_000_000, "peak_py_alloc_mb": None,
            "rss_growth_mb": None}


async def run(sizes: list[int], single: int, collections: int) -> list[dict[str, Any]]:
    customers = len(sizes) + 3
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.bulk", "--serve", str(customers),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        hello = json.loads(await child.stdout.readline())
        oauth = OAuthClient(oauth_config(hello["base_url"]))
        manager = TokenManager(oauth, MemoryStore())
        policy = InstanceUrlPolicy.for_emulator()
        for name, answer in hello["grants"].items():
            await manager.connect(name, parse_grant(answer, policy=policy,
                                                    client_secret=Secret(DEFAULT_CLIENT_SECRET)))
        clients = [Client(f"c{i}", manager, retry=RetryPolicy(), timeout=120)
                   for i in range(customers)]
        rows: list[dict[str, Any]] = []
        for i, n in enumerate(sizes):
            rows.append(await _bulk(clients[i], n, traced=True))
        rows.append(await _bulk_query(clients[len(sizes) - 1], sizes[-1]))
        rows.append(await _collections(clients[len(sizes)], collections))
        rows.append(await _single(clients[len(sizes) + 1], single))
        await manager.aclose()
        await oauth.aclose()
        return rows
    finally:
        if child.stdin is not None:
            child.stdin.close()
        await asyncio.wait_for(child.wait(), 60)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bulk")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    if args.quick:
        params = {"sizes": [500, 2_000], "single": 50, "collections": 450}
    else:
        params = {"sizes": [args.rows // 10, args.rows], "single": 2_000,
                  "collections": 20_000}
    rows = asyncio.run(run(**params))
    print(report.table("Loading rows: Bulk API 2.0 vs Collections vs single records "
                       "(emulator in a child process; client memory only)", rows))
    name = "bulk-quick" if args.quick else "bulk"
    print(f"\nwrote {report.write(name, params, rows)}")


if __name__ == "__main__":
    main()
