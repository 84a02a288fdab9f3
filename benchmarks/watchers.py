"""What watching costs, side by side: the served mirror's per-customer watchers
against the namespace mirror's one prefix watch, on one real etcd.

``python -m benchmarks.watchers [--customers 20000] [--writes 200]``. A fresh
etcd is filled with ``--customers`` customers. Three worker stores in this
process: a ``namespace`` one, a ``served`` one following every customer (three
watchers each: the worst case, one worker serving the whole fleet) and a
``served`` one following 1% of them. Reported per store: the time to follow
its customers, the etcd server's resident memory added by its watchers, the
events it received while ``--writes`` writes spread over all customers were
made (its fan-out), and the latency from a write to its event in a
follower's mirror (p50/p99, from before the write was sent: its round trip
included).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from benchmarks import report


def etcd_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def measure(endpoint: str, pid: int, customers: int, writes: int) -> list[dict[str, Any]]:
    from sfrtr.store.etcd import EtcdStore
    from sfrtr.store.etcd_client import EtcdSettings
    from tests.test_etcd_scale import record

    settings = EtcdSettings(endpoints=[endpoint])
    writer = EtcdStore(settings, namespace="bench", mirror="served")
    await writer.start()
    shapes = [("namespace", customers), ("served", customers), ("served", customers // 100)]
    rows = []
    for mirror, follows in shapes:
        store = EtcdStore(settings, namespace="bench", mirror=mirror)  # type: ignore[arg-type]
        before = etcd_rss(pid)
        began = time.perf_counter()
        await store.start()
        step = customers // follows
        names = [f"customer-{i:06d}" for i in range(0, customers, step)]
        for name in names:  # first use: the served mirror reads and follows it
            await store.read(name)
        while store._to_add:  # every watcher sent  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        follow_s = time.perf_counter() - began
        added = etcd_rss(pid) - before
        events = 0
        count = store._apply_event

        def counting(event: Any, *, create: bool, _count: Any = count) -> None:
            nonlocal events
            events += 1
            _count(event, create=create)
        store._apply_event = counting  # type: ignore[method-assign]
        lags = []
        for n in range(writes):
            name = f"customer-{(n * 7919) % customers:06d}"
            sent = time.perf_counter()
            written = await writer.put(name, record(n))
            if name in store._mirror and store._mirror[name].used:
                while store._mirror[name].version < written.version:  # noqa: ASYNC110
                    await asyncio.sleep(0.0002)
                lags.append(time.perf_counter() - sent)
        await asyncio.sleep(0.5)
        rows.append({
            "mirror": mirror, "customers_followed": len(names),
            "watchers": len(store._watchers) if mirror == "served" else 1,
            "follow_s": round(follow_s, 2),
            "etcd_rss_added_MiB": round(added / 2**20, 1),
            "etcd_bytes_per_watcher": round(added / max(1, len(store._watchers)))
            if mirror == "served" else None,
            "writes": writes, "events_received": events,
            "lag_p50_ms": round(statistics.median(lags) * 1000, 2) if lags else None,
            "lag_p99_ms": round(sorted(lags)[int(len(lags) * 0.99) - 1] * 1000, 2)
            if len(lags) > 1 else None})
        await store.aclose()
    await writer.aclose()
    return rows


def main() -> None:
    from sfrtr.store.etcd_launcher import LocalEtcd
    from tests.test_etcd_scale import fill

    parser = argparse.ArgumentParser(prog="python -m benchmarks.watchers")
    parser.add_argument("--customers", type=int, default=20000)
    parser.add_argument("--writes", type=int, default=200)
    args = parser.parse_args()
    with LocalEtcd() as etcd:
        asyncio.run(fill(etcd.endpoint, "bench", args.customers))
        assert etcd.process is not None
        rows = asyncio.run(measure(etcd.endpoint, etcd.process.pid, args.customers, args.writes))
    print(report.table("Watching: one prefix watch against per-customer watchers (real etcd)",
                       rows))
    report.write("watchers", vars(args), rows)


if __name__ == "__main__":
    main()
