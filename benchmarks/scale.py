"""A worker's start on a big namespace: time to its first token, and memory added.

``python -m benchmarks.scale [--sizes 1000,10000,100000]``. For each size a
fresh local etcd is filled with that many customers (Salesforce-sized
records, 128 puts per Txn), then a fresh worker process starts an
``EtcdStore`` with its ``TokenManager`` and asks for one customer's token:
the time from its start to that first token, the round trips the paged load
took, and the resident memory the start added (``/proc/self/statm``, after
the imports). Before the paged loads a namespace past ~8,000 customers
failed here with ``RESOURCE_EXHAUSTED`` (one Range over gRPC's 4 MiB).

Each size runs both mirrors on the same filled etcd: ``namespace`` (every
customer's version and lock state, records of used customers only) and
``served`` (only the customers the worker uses). The worker then serves
``--serve`` customers (1,000 by default) and the memory is measured again:
what a worker costs for the customers it actually serves.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import orjson

from benchmarks import chart, report

_CHILD = r"""
import asyncio, os, sys, time, orjson
from sfrtr import InstanceUrlPolicy, OAuthClient, OAuthConfig, Secret, TokenManager
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

async def main() -> None:
    endpoint, namespace, customer, mirror, serve, size = sys.argv[1:7]
    base = rss()
    started = time.perf_counter()
    store = EtcdStore(EtcdSettings(endpoints=[endpoint]), namespace=namespace, mirror=mirror)
    oauth = OAuthClient(OAuthConfig(client_id="bench", client_secret=Secret("s"),
                                    login_url="http://127.0.0.1:9",
                                    instance_policy=InstanceUrlPolicy.for_emulator()))
    manager = TokenManager(oauth, store)
    token = await manager.token(customer)
    took = time.perf_counter() - started
    started_rss = rss() - base
    trips = store.client.round_trips
    served = min(int(serve), int(size))
    began = time.perf_counter()
    step = max(1, int(size) // served)
    for i in range(0, step * served, step):
        assert await manager.token(f"customer-{i:06d}")
    serve_s = time.perf_counter() - began
    print(orjson.dumps({"seconds": took, "rss_added": started_rss, "ok": bool(token),
                        "round_trips": trips, "served": served, "serve_s": serve_s,
                        "rss_serving": rss() - base}).decode())
    await manager.aclose()

asyncio.run(main())
"""


def run(sizes: list[int], serve: int) -> list[dict[str, Any]]:
    from sfrtr.store.etcd_launcher import LocalEtcd
    from tests.test_etcd_scale import fill

    rows = []
    for size in sizes:
        with LocalEtcd() as etcd:
            filled = time.perf_counter()
            asyncio.run(fill(etcd.endpoint, "bench", size))  # fresh expiry: no refresh
            fill_s = time.perf_counter() - filled
            for mirror in ("namespace", "served"):
                out = subprocess.run(
                    [sys.executable, "-c", _CHILD, etcd.endpoint, "bench",
                     f"customer-{size - 1:06d}", mirror, str(serve), str(size)],
                    capture_output=True, text=True, check=True, cwd=os.getcwd(), timeout=600)
                child = orjson.loads(out.stdout.strip().splitlines()[-1])
                rows.append({
                    "customers": size, "mirror": mirror, "fill_s": round(fill_s, 1),
                    "start_to_first_token_s": round(child["seconds"], 3),
                    "round_trips": child["round_trips"],
                    "rss_at_start_MiB": round(child["rss_added"] / 2**20, 1),
                    "bytes_per_customer_at_start": round(child["rss_added"] / size),
                    "served": child["served"],
                    "first_use_ms": round(child["serve_s"] / child["served"] * 1000, 2),
                    "rss_serving_MiB": round(child["rss_serving"] / 2**20, 1),
                    "bytes_per_served": round(
                        (child["rss_serving"] - child["rss_added"]) / child["served"])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--serve", type=int, default=1000,
                        help="customers the worker then serves (first token of each)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = run(sizes, args.serve)
    print(report.table("A fresh worker on a big namespace (real etcd)", rows))
    report.write("scale", {"sizes": sizes, "serve": args.serve}, rows)
    png = chart.scale_chart(rows, report.RESULTS / "scale.png")
    print(f"chart: {png}" if png else "chart skipped: pip install 'sfrtr[plot]'")


if __name__ == "__main__":
    main()
