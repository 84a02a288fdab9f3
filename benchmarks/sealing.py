"""Encryption at rest: what sealing costs, per record, per refresh, and on the hot path.

    python -m benchmarks.sealing [--records 20000] [--refreshes 200] [--calls 200000]

1. **Per record**: µs to seal and to open one token record (AES-256-GCM, the
   record's JSON around it), median of rounds.
2. **Per refresh**: ms per ``manager.refresh()`` through a SQLite store with and
   without a sealer, against the emulator over loopback (interleaved rounds),
   and how many seals and opens one refresh does (counted, not estimated).
3. **Hot path**: ns per ``await manager.token(c)`` with a fresh cached token,
   sealed store vs plain store, and the seals/opens those calls did (zero: the
   hot path reads the manager's decrypted cache).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sfrtr import RefreshPolicy, Secret, SqliteStore, TokenManager, TokenRecord
from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import oauth_config, token_grant
from sfrtr.oauth import OAuthClient
from sfrtr.store.sealing import KeyRing, Sealer


class CountingSealer(Sealer):
    """A sealer that counts its work (the benchmark's proof of where it happens)."""

    def __init__(self, keys: KeyRing) -> None:
        super().__init__(keys)
        self.seals = 0
        self.opens = 0

    def seal(self, namespace: str, customer: str, data: dict[str, Any]) -> dict[str, Any]:
        self.seals += 1
        return super().seal(namespace, customer, data)

    def open(self, namespace: str, customer: str, data: dict[str, Any]) -> dict[str, Any]:
        self.opens += 1
        return super().open(namespace, customer, data)


def _keys() -> KeyRing:
    return KeyRing([("k1", os.urandom(32)), ("k2", os.urandom(32))])


def per_record(count: int, rounds: int = 7) -> dict[str, float]:
    record = TokenRecord(access_token=Secret("00D" + "a" * 109), refresh_token=Secret(
        "5Aep" + "r" * 83), instance_url="https://acme.my.salesforce.com",
        issued_at=time.time(), expires_at=time.time() + 3600, grant_id="g")
    data = record.to_dict()
    sealer = Sealer(_keys())
    sealed = sealer.seal("ns", "acme", data)
    seal_us, open_us = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            sealer.seal("ns", "acme", data)
        seal_us.append((time.perf_counter() - start) / count * 1e6)
        start = time.perf_counter()
        for _ in range(count):
            sealer.open("ns", "acme", sealed)
        open_us.append((time.perf_counter() - start) / count * 1e6)
    return {"seal_us": statistics.median(seal_us), "open_us": statistics.median(open_us),
            "seal_us_best": min(seal_us), "open_us_best": min(open_us)}


def _in_turn(managers: dict[str, TokenManager], n: int) -> list[tuple[str, TokenManager]]:
    order = list(managers.items())
    return order if n % 2 == 0 else order[::-1]


async def _manager(em: Emulator, path: Path, sealer: Sealer | None) -> TokenManager:
    store = SqliteStore(path, sealer=sealer)
    return TokenManager(OAuthClient(oauth_config(str(em.base_url))), store,
                        RefreshPolicy(lease_margin=0.5))


async def per_refresh(refreshes: int, rounds: int = 5) -> dict[str, Any]:
    em = Emulator(rng_seed=1)
    out: dict[str, Any] = {}
    async with em.serve():
        with tempfile.TemporaryDirectory() as tmp:
            sealer = CountingSealer(_keys())
            managers = {"plain": await _manager(em, Path(tmp) / "plain.db", None),
                        "sealed": await _manager(em, Path(tmp) / "sealed.db", sealer)}
            stale: dict[str, str] = {}
            for name, manager in managers.items():
                record = await manager.connect("acme", token_grant(em, "acme"))
                stale[name] = record.access_token.reveal()
            times: dict[str, list[float]] = {name: [] for name in managers}
            cpu: dict[str, list[float]] = {name: [] for name in managers}
            per_round = max(1, refreshes // rounds)
            for n in range(rounds):
                # Interleaved, and in turns first: drift and warm-up hit both alike.
                for name, manager in _in_turn(managers, n):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    for _ in range(per_round):
                        stale[name] = (await manager.refresh("acme",
                                                             stale=stale[name])).access_token
                    times[name].append((time.perf_counter() - start) / per_round * 1e3)
                    cpu[name].append((time.process_time() - start_cpu) / per_round * 1e3)
            seals, opens = sealer.seals, sealer.opens
            # Refreshes in the sealed store since it was connected (connect: 1 seal).
            done = per_round * rounds
            # CPU time of this process (manager, store, and the emulator's side of
            # the exchange, alike for both) moves less with the machine's load than
            # wall time, which SQLite's fsync and the scheduler dominate.
            out = {name: {"ms_per_refresh": statistics.median(t), "best": min(t),
                          "cpu_ms_per_refresh": statistics.median(cpu[name])}
                   for name, t in times.items()}
            out["seals_per_refresh"] = (seals - 1) / done
            out["opens_per_refresh"] = opens / done
            out["refreshes"] = done
            for manager in managers.values():
                await manager.aclose()
    return out


async def hot_path(calls: int, rounds: int = 7) -> dict[str, Any]:
    em = Emulator(rng_seed=1)
    async with em.serve():
        with tempfile.TemporaryDirectory() as tmp:
            sealer = CountingSealer(_keys())
            managers = {"plain": await _manager(em, Path(tmp) / "plain.db", None),
                        "sealed": await _manager(em, Path(tmp) / "sealed.db", sealer)}
            for manager in managers.values():
                await manager.connect("acme", token_grant(em, "acme"))
                await manager.token("acme")
            before = (sealer.seals, sealer.opens)
            times: dict[str, list[float]] = {name: [] for name in managers}
            for n in range(rounds):
                for name, manager in _in_turn(managers, n):
                    token = manager.token
                    start = time.perf_counter()
                    for _ in range(calls):
                        await token("acme")
                    times[name].append((time.perf_counter() - start) / calls * 1e9)
            work = (sealer.seals - before[0], sealer.opens - before[1])
            for manager in managers.values():
                await manager.aclose()
    result: dict[str, Any] = {name: {"ns_per_call": statistics.median(t), "best": min(t)}
                              for name, t in times.items()}
    result["seals_and_opens_during_calls"] = work[0] + work[1]
    result["calls"] = calls * rounds
    return result


async def main(records: int, refreshes: int, calls: int) -> dict[str, Any]:
    return {"per_record": per_record(records), "per_refresh": await per_refresh(refreshes),
            "hot_path": await hot_path(calls), "load": os.getloadavg(),
            "cpus": os.cpu_count()}


def report(result: dict[str, Any]) -> str:
    r, f, h = result["per_record"], result["per_refresh"], result["hot_path"]
    plain, sealed = f["plain"]["ms_per_refresh"], f["sealed"]["ms_per_refresh"]
    seal_cost = (f["seals_per_refresh"] * r["seal_us"] + f["opens_per_refresh"] * r["open_us"])
    lines = [
        "sealing (AES-256-GCM, cryptography), one record",
        f"  seal  {r['seal_us']:7.1f} µs  (best {r['seal_us_best']:.1f})",
        f"  open  {r['open_us']:7.1f} µs  (best {r['open_us_best']:.1f})",
        f"per refresh, SQLite store, emulator over loopback ({f['refreshes']} refreshes each)",
        f"  plain   {plain:7.3f} ms   sealed {sealed:7.3f} ms   "
        f"ratio {sealed / plain:.3f}   (best {f['plain']['best']:.3f} vs "
        f"{f['sealed']['best']:.3f} ms)",
        f"  CPU (this process)  plain {f['plain']['cpu_ms_per_refresh']:.3f} ms   sealed "
        f"{f['sealed']['cpu_ms_per_refresh']:.3f} ms",
        f"  seals/refresh {f['seals_per_refresh']:.2f}   opens/refresh "
        f"{f['opens_per_refresh']:.2f}   => sealing work {seal_cost:.1f} µs/refresh "
        f"({seal_cost / 1000 / plain * 100:.2f} % of a refresh)",
        f"hot path: await manager.token(c), fresh cached token ({h['calls']} calls each)",
        f"  plain   {h['plain']['ns_per_call']:7.0f} ns   sealed "
        f"{h['sealed']['ns_per_call']:7.0f} ns   ratio "
        f"{h['sealed']['ns_per_call'] / h['plain']['ns_per_call']:.3f}   (best "
        f"{h['plain']['best']:.0f} vs {h['sealed']['best']:.0f} ns)",
        f"  seals + opens during those calls: {h['seals_and_opens_during_calls']}",
        f"machine: {result['cpus']} CPUs, load {result['load'][0]:.2f} "
        f"{result['load'][1]:.2f} {result['load'][2]:.2f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--refreshes", type=int, default=200)
    parser.add_argument("--calls", type=int, default=200000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    figures = asyncio.run(main(args.records, args.refreshes, args.calls))
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
