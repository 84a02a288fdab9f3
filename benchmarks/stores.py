"""The stores side by side: an uncontended refresh, and a waiter's wake-up.

``python -m benchmarks.stores [--refreshes N] [--wakes N] [--quick]``. In one run,
for the memory store, the SQLite store (a file in a temporary directory), the
Postgres store (a throwaway local server started for the run, fsync on) and the
etcd store (a local etcd started for the run):

- **refresh**: a ``TokenManager`` refreshes one customer after a 401 (the
  in-process emulator answers the token request), one refresh at a time:
  the store calls each refresh makes, the time spent in them, and the
  refresh's latency end to end (etcd: its round trips too; Postgres: each store
  call is one statement, one round trip).
- **wake**: a holder (one store instance) acquires, a waiter (a second
  instance on the same data: "another process" as the store sees it; the
  memory store has only one) parks in ``wait_for_change``; the time from the
  holder's commit returning to the waiter waking (Postgres: LISTEN/NOTIFY).
- **Nango-style lock** beside them (when ``redis-server`` and the ``redis`` package
  are here: ``nox -s bench`` installs both): ``SET lock NX PX 10000``, waiters
  retrying every 50 ms, the holder's ``DEL`` as its "commit"; the same
  measurement, and the commands a waiter spends while parked.
- **idle cost** of the SQLite store's change poll: CPU of a process whose
  store has a subscriber and nothing happens, at two poll intervals.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import redis_server, report
from sfrtr import Intent, MemoryStore, OAuthClient, RefreshPolicy, Secret, SqliteStore, TokenManager
from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import oauth_config, token_grant
from sfrtr.records import TokenRecord

_OPS = frozenset({"read", "put", "acquire", "commit", "save_rescue", "rescues", "drop_rescue",
                  "wait_for_change", "delete", "customers"})
RECORD = TokenRecord(access_token=Secret("at"), refresh_token=Secret("rt"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0, expires_at=9e9)


class Counting:
    """A store that counts and times the calls made to it (delegates everything)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.calls: Counter[str] = Counter()
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if name not in _OPS:
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            started = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return counted


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _stores(kind: str, tmp: Path, etcd: Any, postgres: Any) -> tuple[Any, Any]:
    """(holder, waiter): two instances on the same data where the store has processes."""
    if kind == "memory":
        memory = MemoryStore()
        return memory, memory
    if kind == "sqlite":
        return SqliteStore(tmp / "tokens.db"), SqliteStore(tmp / "tokens.db")
    if kind == "postgres":
        from sfrtr.store.postgres import PostgresStore

        return PostgresStore(postgres.dsn), PostgresStore(postgres.dsn)
    from sfrtr.store.etcd import EtcdStore
    from sfrtr.store.etcd_client import EtcdSettings

    namespace = f"bench/{time.time_ns()}"
    return (EtcdStore(EtcdSettings(endpoints=[etcd.endpoint]), namespace=namespace),
            EtcdStore(EtcdSettings(endpoints=[etcd.endpoint]), namespace=namespace))


async def refreshes(kind: str, store: Any, em: Emulator, n: int) -> dict[str, Any]:
    counting = Counting(store)
    manager = TokenManager(OAuthClient(oauth_config(str(em.base_url))), counting,  # type: ignore[arg-type]
                           RefreshPolicy())
    await manager.connect("acme", token_grant(em, "acme"))
    latencies: list[float] = []
    in_store: list[float] = []
    calls: Counter[str] = Counter()
    round_trips = 0
    for _ in range(n):
        stale = await manager.token("acme")
        counting.calls.clear()
        counting.seconds = 0.0
        before = store.client.round_trips if kind == "etcd" else 0
        started = time.perf_counter()
        creds = await manager.refresh("acme", stale=stale)
        latencies.append(time.perf_counter() - started)
        assert creds.access_token != stale
        in_store.append(counting.seconds)
        calls.update(counting.calls)
        if kind == "etcd":
            round_trips += store.client.round_trips - before
    await manager.oauth.aclose()
    assert em.ledger["reuse"] == 0
    return {
        "store": kind, "refreshes": n,
        "store_calls_per_refresh": round(sum(calls.values()) / n, 2),
        "calls": " ".join(f"{k}:{v / n:g}" for k, v in sorted(calls.items())),
        "round_trips_per_refresh": (round(round_trips / n, 2) if kind == "etcd" else
                                    round(sum(calls.values()) / n, 2) if kind == "postgres"
                                    else "-"),
        "store_ms_p50": statistics.median(in_store) * 1000,
        "refresh_ms_p50": statistics.median(latencies) * 1000,
        "refresh_ms_p95": _pct(latencies, 0.95) * 1000,
    }


async def _until(store: Any, customer: str, check: Any) -> Any:
    state = await store.read(customer)
    while state is None or not check(state):
        if state is None:
            await asyncio.sleep(0.001)
            state = await store.read(customer)
            continue
        moved = await store.wait_for_change(customer, state.stamp, 5)
        state = moved if moved is not None else await store.read(customer)
    return state


async def wakes(kind: str, holder: Any, waiter: Any, n: int) -> dict[str, Any]:
    await holder.put("wake", RECORD)
    latencies: list[float] = []
    for i in range(n):
        current = await _until(waiter, "wake", lambda s: not s.locked)
        current = await holder.read("wake")
        held = await holder.acquire("wake", current.version, Intent("h", "fp", 1.0, id=str(i)))
        assert held is not None
        seen = await _until(waiter, "wake", lambda s: s.locked)

        async def wait(seen: Any = seen) -> float:
            await waiter.wait_for_change("wake", seen.stamp, 10)
            return time.perf_counter()

        task = asyncio.create_task(wait())
        # Parked; a random phase against any poll's ticks (a fixed one measures one point):
        # the hold spans a whole 50 ms poll interval, the same for every row.
        await asyncio.sleep(0.03 + random.random() * 0.05)
        await holder.commit("wake", held.version, RECORD)
        committed = time.perf_counter()
        latencies.append(max(0.0, await task - committed))
    return {"store": kind, "wakes": n, "wake_ms_p50": statistics.median(latencies) * 1000,
            "wake_ms_p95": _pct(latencies, 0.95) * 1000, "wake_ms_max": max(latencies) * 1000,
            # What a parked waiter sends to the server: the watch and NOTIFY push.
            "commands_per_wait": {"sqlite": "0 (file poll)"}.get(kind, 0)}


async def setnx_wakes(url: str, n: int, poll: float = 0.05) -> dict[str, Any]:
    """The lock Nango takes in Redis: ``SET NX`` with a 10 s TTL, waiters polling."""
    import redis.asyncio as aioredis

    holder, waiter = aioredis.from_url(url), aioredis.from_url(url)
    latencies: list[float] = []
    polls = 0
    try:
        for _ in range(n):
            assert await holder.set("lock:wake", "holder", nx=True, px=10_000)

            async def wait() -> float:
                nonlocal polls
                while True:
                    polls += 1
                    if await waiter.set("lock:wake", "waiter", nx=True, px=10_000):
                        return time.perf_counter()
                    await asyncio.sleep(poll)

            task = asyncio.create_task(wait())
            await asyncio.sleep(0.03 + random.random() * 0.05)
            await holder.set("tok:wake", "new")  # the holder's commit...
            await holder.delete("lock:wake")  # ...and its unlock
            released = time.perf_counter()
            latencies.append(max(0.0, await task - released))
            await waiter.delete("lock:wake")
    finally:
        await holder.aclose()
        await waiter.aclose()
    return {"store": "redis SET NX, 50 ms poll (Nango-style)", "wakes": n,
            "wake_ms_p50": statistics.median(latencies) * 1000,
            "wake_ms_p95": _pct(latencies, 0.95) * 1000, "wake_ms_max": max(latencies) * 1000,
            "commands_per_wait": round(polls / n, 1)}


async def idle_cost(tmp: Path, interval: float, seconds: float) -> dict[str, Any]:
    """CPU the SQLite store's poll costs while nothing happens (process time includes
    the store's thread)."""
    store = SqliteStore(tmp / f"idle-{interval}.db", poll_interval=interval)
    store.subscribe(lambda customer, state: None)
    await store.read("nobody")
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await store.aclose()
    return {"poll_interval_ms": interval * 1000, "seconds": round(wall, 1),
            "cpu_ms": cpu * 1000, "cpu_percent_of_one_core": cpu / wall * 100}


async def run(refresh_n: int, wake_n: int, idle_seconds: float) -> tuple[list[dict[str, Any]],
                                                                         list[dict[str, Any]],
                                                                         list[dict[str, Any]]]:
    from sfrtr.store.etcd_launcher import LocalEtcd
    from tests.postgres_server import LocalPostgres

    refresh_rows, wake_rows, idle_rows = [], [], []
    with LocalEtcd() as etcd, LocalPostgres(durable=True) as postgres, \
            tempfile.TemporaryDirectory() as tmp:
        for kind in ("memory", "sqlite", "postgres", "etcd"):
            where = Path(tmp) / kind
            where.mkdir()
            em = Emulator(api_limit=10**9)
            async with em.serve():
                holder, waiter = _stores(kind, where, etcd, postgres)
                try:
                    refresh_rows.append(await refreshes(kind, holder, em, refresh_n))
                    wake_rows.append(await wakes(kind, holder, waiter, wake_n))
                finally:
                    await holder.aclose()
                    if waiter is not holder:
                        await waiter.aclose()
        if redis_server.available():
            with redis_server.LocalRedis() as local_redis:
                wake_rows.append(await setnx_wakes(local_redis.url, wake_n))
        else:
            print("Nango-style lock skipped: needs redis-server and `pip install redis` "
                  "(nox -s bench installs both)")
        for interval in (0.01, 0.05):
            idle_rows.append(await idle_cost(Path(tmp), interval, idle_seconds))
    return refresh_rows, wake_rows, idle_rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stores")
    parser.add_argument("--refreshes", type=int, default=200)
    parser.add_argument("--wakes", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.refreshes, args.wakes, args.idle_seconds = 5, 5, 0.5
    refresh_rows, wake_rows, idle_rows = asyncio.run(
        run(args.refreshes, args.wakes, args.idle_seconds))
    print(report.table("Uncontended refresh after a 401, per store (one at a time)",
                       refresh_rows), "\n")
    print(report.table("Waiter wake-up after the holder's commit returned", wake_rows), "\n")
    print(report.table("SQLite store: CPU of the change poll while idle", idle_rows), "\n")
    rows = [{"kind": "refresh", **r} for r in refresh_rows] + \
        [{"kind": "wake", **r} for r in wake_rows] + [{"kind": "idle", **r} for r in idle_rows]
    parameters = {"refreshes": args.refreshes, "wakes": args.wakes,
                  "idle_seconds": args.idle_seconds}
    path = report.write("stores-quick" if args.quick else "stores", parameters, rows, notes={
        "wake": "holder and waiter are two store instances in one process (memory: the same "
                "one); SQLite's waiter is woken by its thread's data_version poll "
                "(poll_interval 10 ms), Postgres's by LISTEN/NOTIFY on its listening "
                "connection, etcd's by its watch; Postgres runs locally with fsync on",
        "refresh": "the emulator runs in the same process and event loop",
        "redis": "the Nango-style lock: SET NX PX 10000, a waiter retrying SET NX every "
                 "50 ms; 'wake' is from the holder's DEL returning to the waiter's SET "
                 "succeeding (Debian's redis-server on loopback, no persistence)"})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
