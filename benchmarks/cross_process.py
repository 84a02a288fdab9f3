"""Cross-process storm per store, and the in-process-lock anti-patterns beside it.

P worker processes x C coroutines x K customers. Every session expires at
once; then every coroutine of every process reports a 401 for every
customer. sfrtr must redeem exactly K refresh tokens, on every store:
``sfrtr/memory`` (one process only: it cannot be shared), ``sfrtr/sqlite`` (a
file in a temporary directory), ``sfrtr/postgres`` (a throwaway local server,
fsync on) and ``sfrtr/etcd`` (a local etcd), each at every P. Beside them,
under the same load: "local-lock" (an in-process singleflight alone: each
process has its own memory store with the same grants), "no-lock" (every
coroutine that sees a 401 redeems), and "setnx-ttl" (a set-if-absent lock with
a 1 s TTL and no fencing, under a 1.5 s provider: the lock expires mid-call).
sfrtr's storm is the fleet's second: one expiry wave first (not measured), so
that every customer has a last lock holder every process has seen, as in a
fleet that has run for a while. On etcd at the largest P the default
(``RefreshPolicy.handoff``: that holder acquires, the others wait on its lock)
is shown beside ``handoff=0`` (every process sends its acquire at once).

Workers: ``python -m benchmarks.cross_process --worker ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from benchmarks.stores import Counting
from sfrtr import (
    MemoryStore,
    OAuthClient,
    RefreshPolicy,
    SfrtrError,
    TokenManager,
)
from sfrtr.cli.demo_processes import DemoStore
from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import oauth_config, token_grant
from sfrtr.records import TokenRecord
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdClient, EtcdSettings, compare, delete, put
from sfrtr.store.etcd_launcher import LocalEtcd

STORES = ("memory", "sqlite", "postgres", "etcd")


def _oauth(login_url: str) -> OAuthClient:
    return OAuthClient(oauth_config(login_url))


async def _no_lock(oauth: OAuthClient, records: dict[str, TokenRecord], customers: list[str],
                   coroutines: int) -> int:
    """Every coroutine that sees a 401 redeems whatever refresh token it last read."""
    failed = 0

    async def one(c: str) -> None:
        nonlocal failed
        outcome = await oauth.refresh(records[c].refresh_token)
        if outcome.grant is None or outcome.grant.refresh_token is None:
            failed += 1
            return
        records[c] = records[c].replace(refresh_token=outcome.grant.refresh_token)

    await asyncio.gather(*(one(c) for c in customers for _ in range(coroutines)))
    return failed


async def _setnx(oauth: OAuthClient, args: argparse.Namespace, customers: list[str]) -> int:
    """A set-if-absent lock with a TTL and no fencing (what Nango does with Redis).

    The lock expires while a slow provider call is in flight; the next process
    then redeems the same refresh token.
    """
    client = EtcdClient(EtcdSettings(endpoints=[args.etcd]))
    prefix = f"{args.namespace}/".encode()
    failed = 0

    async def one(c: str) -> None:
        nonlocal failed
        lock, tok = prefix + b"setnx/" + c.encode(), prefix + b"tok/" + c.encode()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lease, _ = await client.grant(1)
            got = await client.txn([compare(lock, "create", "==", 0)],
                                   [put(lock, b"held", lease)], [])
            if not got.succeeded:
                await asyncio.sleep(0.05)
                continue
            _, kvs = await client.range(tok)
            record = TokenRecord.from_dict(orjson.loads(kvs[0].value))
            if record.generation > 0:  # someone already refreshed this round
                await client.txn([], [delete(lock)])
                return
            outcome = await oauth.refresh(record.refresh_token)
            if outcome.grant is None:
                failed += 1
            else:
                new = record.replace(refresh_token=outcome.grant.refresh_token or
                                     record.refresh_token, generation=record.generation + 1)
                await client.txn([], [put(tok, orjson.dumps(new.to_dict()))])
            await client.txn([], [delete(lock)])
            return
        failed += 1

    await asyncio.gather(*(one(c) for c in customers))
    await client.close()
    return failed


async def _work(args: argparse.Namespace) -> None:
    customers = [f"c{i}" for i in range(args.customers)]
    if args.variant in ("no-lock", "setnx-ttl"):
        oauth = _oauth(args.login_url)
        records = {}
        for line in sys.stdin.readline().split("\t"):
            name, _, raw = line.partition(" ")
            records[name] = TokenRecord.from_dict(orjson.loads(raw))
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # GO
        started = time.perf_counter()
        if args.variant == "no-lock":
            failed = await _no_lock(oauth, records, customers, args.coroutines)
        else:
            failed = await _setnx(oauth, args, customers)
        wall = time.perf_counter() - started
        await oauth.aclose()
        print(orjson.dumps({"wall": wall, "failed": failed, "round_trips": 0}).decode(),
              flush=True)
        return
    shared = args.variant == "sfrtr" and args.store != "memory"
    store: Any = (DemoStore(args.store, args.where, args.namespace).open() if shared
                  else MemoryStore())
    counting = Counting(store)
    manager = TokenManager(_oauth(args.login_url), counting,  # type: ignore[arg-type]
                           RefreshPolicy(busy_backoff=0.05, handoff=args.handoff))
    if not shared:
        for line in sys.stdin.readline().split("\t"):
            name, _, raw = line.partition(" ")
            await store.put(name, TokenRecord.from_dict(orjson.loads(raw)))
    stale = {c: await manager.token(c) for c in customers}
    if args.variant == "sfrtr" and args.store == "etcd":
        # A fleet in its steady state: every process knows the others (the member
        # list the place in line comes from), as long-lived workers do.
        async with asyncio.timeout(30):
            while store.live_processes < args.processes:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    if (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "WARM":
        # One expiry before the measured one: the fleet's second refresh of each
        # customer, with a holder of its last lock that every process has seen.
        await asyncio.gather(*(manager.refresh(c, stale=stale[c]) for c in customers
                                for _ in range(args.coroutines)), return_exceptions=True)
        async with asyncio.timeout(30):  # every process has the new tokens
            while any([await manager.token(c) == stale[c] for c in customers]):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        stale = {c: await manager.token(c) for c in customers}
        print("WARMED", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # GO
    etcd = args.variant == "sfrtr" and args.store == "etcd"
    trips0 = store.client.round_trips if etcd else 0
    counting.calls.clear()
    started = time.perf_counter()
    results = await asyncio.gather(*(manager.refresh(c, stale=stale[c]) for c in customers
                                     for _ in range(args.coroutines)), return_exceptions=True)
    wall = time.perf_counter() - started
    failed = sum(isinstance(r, SfrtrError) for r in results)
    trips = (store.client.round_trips - trips0) if etcd else 0
    calls = sum(counting.calls.values())
    await manager.aclose()
    print(orjson.dumps({"wall": wall, "failed": failed, "round_trips": trips,
                        "store_calls": calls}).decode(), flush=True)


async def one(variant: str, processes: int, coroutines: int, customers: int,
              etcd: LocalEtcd, store: str = "etcd", postgres: Any = None,
              tmp: Path | None = None, handoff: float | None = None) -> dict[str, Any]:
    """One storm. ``variant`` "sfrtr" runs on ``store``; the others seed their own state
    (from records connected on etcd, where "setnx-ttl" keeps its lock and tokens)."""
    em = Emulator(api_limit=10**9)
    # The set-if-absent lock is shown under a slow provider, longer than its TTL.
    em.faults.set("token", latency=1.5 if variant == "setnx-ttl" else 0.05)
    tag = uuid.uuid4().hex[:8]
    shared = None
    if variant == "sfrtr" and store == "sqlite":
        assert tmp is not None
        shared = DemoStore("sqlite", str(tmp / f"storm-{tag}.db"))
    elif variant == "sfrtr" and store == "postgres":
        shared = DemoStore("postgres", postgres.dsn, f"bench_{tag}")
    elif variant == "sfrtr" and store == "etcd":
        shared = DemoStore("etcd", etcd.endpoint, f"bench/{tag}")
    namespace = shared.namespace if shared is not None else f"bench/{tag}"
    where = shared.where if shared is not None else etcd.endpoint
    names = [f"c{i}" for i in range(customers)]
    async with em.serve() as base:
        seed_lines = []
        setup = TokenManager(_oauth(base), shared.open() if shared is not None else EtcdStore(
            EtcdSettings(endpoints=[etcd.endpoint]), namespace=namespace))
        for c in names:
            record = await setup.connect(c, token_grant(em, c))
            seed_lines.append(f"{c} {orjson.dumps(record.to_dict()).decode()}")
        await setup.aclose()
        workers = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.cross_process", "--worker", "--variant", variant,
            "--store", store, "--where", where, "--etcd", etcd.endpoint,
            "--namespace", namespace, "--login-url", base,
            "--customers", str(customers), "--coroutines", str(coroutines),
            "--processes", str(processes),
            *(() if handoff is None else ("--handoff", str(handoff))),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            for _ in range(processes)]
        for w in workers:
            assert w.stdin is not None
            assert w.stdout is not None
            if shared is None:
                w.stdin.write(("\t".join(seed_lines) + "\n").encode())
            assert (await w.stdout.readline()).strip() == b"READY"
        redeemed = 0
        if variant == "sfrtr":
            em.expire_sessions()
            for w in workers:
                assert w.stdin is not None
                w.stdin.write(b"WARM\n")
                await w.stdin.drain()
            for w in workers:
                assert w.stdout is not None
                assert (await w.stdout.readline()).strip() == b"WARMED"
            redeemed = em.ledger["redemptions"]
        em.expire_sessions()
        started = time.perf_counter()
        for w in workers:
            assert w.stdin is not None
            w.stdin.write(b"GO\n")
            await w.stdin.drain()
        reports = []
        for w in workers:
            assert w.stdout is not None
            reports.append(orjson.loads(await w.stdout.readline()))
            await w.wait()
        wall = time.perf_counter() - started
    redemptions = em.ledger["redemptions"] - redeemed
    sfrtr = variant == "sfrtr"
    label = f"sfrtr/{store}" + ("" if handoff is None else f" handoff={handoff:g}")
    return {"variant": label if sfrtr else variant, "processes": processes,
            "coroutines": coroutines, "customers": customers, "redemptions": redemptions,
            "reuse": em.ledger["reuse"], "revocations": em.ledger["revocations"],
            "failed calls": sum(r["failed"] for r in reports), "wall ms": wall * 1000,
            "store calls/refresh": sum(r.get("store_calls", 0) for r in reports) /
                max(1, redemptions) if sfrtr else "-",
            "etcd round trips/refresh":
                sum(r["round_trips"] for r in reports) / max(1, redemptions)
                if sfrtr and store == "etcd" else "-"}


async def run(processes: tuple[int, ...] = (1, 2, 4, 8), coroutines: int = 50,
              customers: int = 20, stores: tuple[str, ...] = STORES) -> list[dict[str, Any]]:
    """Every store at every P (memory at P=1 only: it is one process's), then the
    anti-patterns at every P above 1."""
    from tests.postgres_server import LocalPostgres

    rows = []
    with LocalEtcd() as etcd, tempfile.TemporaryDirectory(prefix="sfrtr-storm-") as tmp, \
            (LocalPostgres(durable=True) if "postgres" in stores
             else _Nothing()) as postgres:
        for store in stores:
            for p in processes:
                if store == "memory" and p > 1:
                    continue
                rows.append(await one("sfrtr", p, coroutines, customers, etcd, store,
                                      postgres, Path(tmp)))
                if store == "etcd" and p == processes[-1] and p > 1:
                    # Beside the default: every process acquiring at once (no handoff).
                    rows.append(await one("sfrtr", p, coroutines, customers, etcd, store,
                                          postgres, Path(tmp), handoff=0.0))
        for variant in ("local-lock", "no-lock", "setnx-ttl"):
            for p in processes[1:]:
                rows.append(await one(variant, p, coroutines, customers, etcd))
    return rows


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _worker_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--variant", choices=["sfrtr", "local-lock", "no-lock", "setnx-ttl"],
                   required=True)
    p.add_argument("--store", choices=STORES, default="etcd")
    p.add_argument("--where", required=True, help="the SQLite file, Postgres DSN, etcd")
    p.add_argument("--etcd", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--login-url", required=True)
    p.add_argument("--customers", type=int, required=True)
    p.add_argument("--coroutines", type=int, required=True)
    p.add_argument("--processes", type=int, default=1, help="how many workers there are")
    p.add_argument("--handoff", type=float, default=RefreshPolicy().handoff,
                   help="RefreshPolicy.handoff (0: every process acquires at once)")
    asyncio.run(_work(p.parse_args()))


if __name__ == "__main__":
    _worker_main()
