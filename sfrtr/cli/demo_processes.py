"""``sfrtr demo --processes P``: the same storm from P worker processes on a shared store.

The parent serves the emulator, connects the customers, expires sessions and
prints the table; each worker (``python -m sfrtr.cli.demo_processes --worker ...``)
runs a token manager on the store and reports its calls and latencies.

Stores (``--store``): ``sqlite`` (the default: a file in a temporary directory,
no server), ``etcd`` (a local etcd started for the demo, or ``--etcd``) and
``postgres`` (``--postgres DSN``: the demo's tables go in a schema of their own,
dropped at the end). The memory store cannot be shared by processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import orjson

from sfrtr.cli import demo_report
from sfrtr.cli.demo import (
    DemoConfig,
    Tally,
    _worker,
    customer_names,
    expire_until,
    figures_of,
)
from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import oauth_config, token_grant
from sfrtr.loop_stall import LoopStallMonitor
from sfrtr.manager import TokenManager
from sfrtr.oauth import OAuthClient
from sfrtr.store.base import TokenStore
from sfrtr.store.sqlite import SqliteStore

_REPORT_LIMIT = 256 * 1024 * 1024
"""A worker's report is one JSON line with every latency in it."""

_STORE_ENV = "SFRTR_DEMO_STORE"
"""How the parent tells its workers the store (in the environment: a Postgres DSN
may hold a password, and command lines are visible to every user)."""

SHARED_STORES = ("sqlite", "postgres", "etcd")
"""The stores several processes can share; the memory store is one process's."""


@dataclass(frozen=True)
class DemoStore:
    """Where the demo's processes meet: ``kind``, ``where`` (the SQLite file, the
    Postgres DSN, the etcd endpoint) and ``namespace`` (etcd's key prefix,
    Postgres's schema)."""

    kind: str
    where: str
    namespace: str = ""
    local: bool = False
    """A server started for this run and stopped at its end."""

    def open(self) -> TokenStore:
        """A store of this kind at ``where`` (one per process)."""
        if self.kind == "sqlite":
            return SqliteStore(self.where)
        if self.kind == "postgres":
            from sfrtr.store.postgres import PostgresStore

            return PostgresStore(self.where, schema=self.namespace)
        if self.kind == "etcd":
            from sfrtr.store.etcd import EtcdStore
            from sfrtr.store.etcd_client import EtcdSettings

            return EtcdStore(EtcdSettings(endpoints=[self.where]), namespace=self.namespace)
        raise ValueError(f"the {self.kind} store cannot be shared by processes")

    def describe(self) -> str:
        """The store, where it is, and (etcd, Postgres) the namespace or schema."""
        if self.kind == "sqlite":
            return f"the SQLite store ({self.where})"
        if self.kind == "postgres":
            from sfrtr.store.postgres import redact_dsn

            return f"the Postgres store ({redact_dsn(self.where)}, schema {self.namespace})"
        return f"the etcd store ({self.where}, namespace {self.namespace})"


@contextlib.asynccontextmanager
async def demo_store(kind: str, *, etcd: str | None = None, postgres: str | None = None,
                     out: Callable[[str], object] = print) -> AsyncIterator[DemoStore]:
    """A shared store for one demo run, removed afterwards: a SQLite file in a
    temporary directory; a namespace on ``etcd`` (default: a local etcd started
    here); a schema of its own on ``postgres``, dropped at the end."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="sfrtr-demo-") as tmp:
            yield DemoStore("sqlite", os.path.join(tmp, "sfrtr.db"))
    elif kind == "etcd":
        local = None
        if etcd is None:
            from sfrtr.store.etcd_launcher import LocalEtcd

            local = LocalEtcd()
            local.start()
            etcd = local.endpoint
            out(f"started a local etcd on {etcd}")
        try:
            yield DemoStore("etcd", etcd, f"sfrtr-demo/{uuid.uuid4().hex[:8]}",
                            local=local is not None)
        finally:
            if local is not None:
                local.close()
    elif kind == "postgres":
        if not postgres:
            raise ValueError("the postgres store needs a DSN")
        schema = f"sfrtr_demo_{uuid.uuid4().hex[:8]}"
        try:
            yield DemoStore("postgres", postgres, schema)
        finally:
            await _drop_schema(postgres, schema, out)
    else:
        raise ValueError(f"the {kind} store cannot be shared by processes "
                         f"(use one of {', '.join(SHARED_STORES)})")


async def _drop_schema(dsn: str, schema: str, out: Callable[[str], object]) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    except OSError:
        return  # unreachable: the demo's own error says so, and it created nothing there
    except Exception as exc:  # never hide the demo's own outcome behind its clean-up
        out(f"could not drop the demo's schema {schema}: {type(exc).__name__}")


def _oauth(login_url: str, session: aiohttp.ClientSession | None = None) -> OAuthClient:
    return OAuthClient(oauth_config(login_url), session)


async def run_processes(config: DemoConfig, processes: int, etcd: str | None = None,
                        *, store: str = "sqlite", postgres: str | None = None,
                        out: Callable[[str], object] = print) -> dict[str, float]:
    """The storm from ``processes`` workers sharing ``store`` (sqlite, postgres, etcd)."""
    async with demo_store(store, etcd=etcd, postgres=postgres, out=out) as shared:
        return await _run(config, processes, shared, out)


async def _run(config: DemoConfig, processes: int, shared: DemoStore,
               out: Callable[[str], object]) -> dict[str, float]:
    demo_report.header(out, config, f"{shared.describe()}, shared by {processes} worker "
                       "process(es)", processes=processes)
    if shared.kind == "etcd":
        when = "while it runs" if shared.local else "during and after the run"
        out(f"  to look at the grants {when}: sfrtr status --etcd {shared.where} "
            f"--namespace {shared.namespace}")
    emulator = Emulator(api_limit=10**9)
    emulator.faults.set("token", latency=config.token_latency)
    workers: list[asyncio.subprocess.Process] = []
    readers: list[asyncio.Task[dict[str, Any]]] = []
    env = {**os.environ, _STORE_ENV: orjson.dumps(asdict(shared)).decode()}
    customers = customer_names(config.customers)
    try:
        async with emulator.serve() as base_url:
            manager = TokenManager(_oauth(base_url), shared.open())
            try:
                for c in customers:
                    emulator.seed(c, "Account",
                                  [{"Name": f"{c} account {n}"} for n in range(5)])
                    await manager.connect(c, token_grant(emulator, c))
                per_process = max(1, config.concurrency // processes)
                for _ in range(processes):
                    workers.append(await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "sfrtr.cli.demo_processes", "--worker",
                        "--login-url", base_url, "--customers", str(config.customers),
                        "--concurrency", str(per_process), "--duration", str(config.duration),
                        stdout=asyncio.subprocess.PIPE, limit=_REPORT_LIMIT, env=env))
                for w in workers:
                    assert w.stdout is not None
                    if (await w.stdout.readline()).strip() != b"READY":
                        raise RuntimeError("a demo worker failed to start")
                started = time.monotonic()
                live = [(0, 0)] * len(workers)
                readers += [asyncio.create_task(_read_reports(w, i, live))
                            for i, w in enumerate(workers)]
                progress = demo_report.Progress(
                    out, emulator, customers,
                    lambda: (sum(c for c, _ in live), sum(e for _, e in live)))
                expiries = await expire_until(emulator, config, started, progress)
                tally = Tally()
                stalls: list[float] = []
                for reader in readers:
                    report = await reader
                    stalls.append(report["max_stall"])
                    tally.calls += report["calls"]
                    tally.errors += report["errors"]
                    tally.latencies += report["latencies"]
                    for kind, n in report["kinds"].items():
                        tally.kinds[kind] = tally.kinds.get(kind, 0) + n
                for w in workers:
                    await w.wait()
                elapsed = time.monotonic() - started
            finally:
                await manager.aclose()
            figures = figures_of(tally, emulator, customers, expiries, elapsed)
        figures["max loop stall ms"] = 1000 * max(stalls, default=0.0)
        demo_report.report(out, f"sfrtr, {processes} processes on the {shared.kind} store",
                           config, figures, tally.kinds, notes=(
                               "max loop stall per worker ms: "
                               + ", ".join(f"{1000 * s:.0f}" for s in stalls),))
        return figures
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for w in workers:
            if w.returncode is None:
                w.kill()
                await w.wait()


async def _read_reports(worker: asyncio.subprocess.Process, index: int,
                        live: list[tuple[int, int]]) -> dict[str, Any]:
    """Follow one worker's progress lines; return its final report."""
    assert worker.stdout is not None
    while True:
        line = await worker.stdout.readline()
        if not line:
            raise RuntimeError("a demo worker died before reporting")
        message = orjson.loads(line)
        if "latencies" in message:
            return dict(message)
        live[index] = (message["calls"], message["errors"])


async def _work(args: argparse.Namespace) -> None:
    shared = DemoStore(**orjson.loads(os.environ[_STORE_ENV]))
    monitor = LoopStallMonitor()
    monitor.start()
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        manager = TokenManager(_oauth(args.login_url, http), shared.open())
        await manager.store.read("warm-up")  # starts the store: lease, mirror, watch
        print("READY", flush=True)
        tally = Tally()
        stop_at = time.monotonic() + args.duration
        customers = customer_names(args.customers)
        ticker = asyncio.create_task(_report_progress(tally))
        await asyncio.gather(*(_worker(http, manager, customers, i, stop_at, tally)
                               for i in range(args.concurrency)))
        ticker.cancel()
        await manager.aclose()
    print(orjson.dumps({"calls": tally.calls, "errors": tally.errors, "kinds": tally.kinds,
                        "latencies": tally.latencies, "max_stall": monitor.stop()}).decode(),
          flush=True)


async def _report_progress(tally: Tally) -> None:
    """Tell the parent this worker's running counts, for its live progress line."""
    while True:
        await asyncio.sleep(0.25)
        print(orjson.dumps({"calls": tally.calls, "errors": tally.errors}).decode(), flush=True)


def _worker_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--login-url", required=True)
    p.add_argument("--customers", type=int, required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_work(p.parse_args()))


if __name__ == "__main__":
    _worker_main()
