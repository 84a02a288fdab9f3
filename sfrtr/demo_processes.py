"""``sfrtr demo --processes P``: the same storm from P worker processes on etcd.

The parent serves the emulator, connects the customers, expires sessions and
prints the table; each worker (``python -m sfrtr.demo_processes --worker ...``)
runs a token manager on the etcd store and reports its calls and latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import Callable

import aiohttp
import orjson

from sfrtr.demo import DemoConfig, Tally, _expire_until, _figures, _report, _worker
from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import oauth_config, token_grant
from sfrtr.loop_stall import LoopStallMonitor
from sfrtr.manager import TokenManager
from sfrtr.oauth import OAuthClient
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcd

_REPORT_LIMIT = 256 * 1024 * 1024
"""A worker's report is one JSON line with every latency in it."""


def _oauth(login_url: str, session: aiohttp.ClientSession | None = None) -> OAuthClient:
    return OAuthClient(oauth_config(login_url), session)


def _customers(n: int) -> list[str]:
    return [f"customer-{i:03d}" for i in range(n)]


async def run_processes(config: DemoConfig, processes: int, etcd: str | None,
                        *, out: Callable[[str], object] = print) -> dict[str, float]:
    local = None
    if etcd is None:
        local = LocalEtcd()
        local.start()
        etcd = local.endpoint
        out(f"started a local etcd on {etcd}")
    namespace = f"sfrtr-demo/{uuid.uuid4().hex[:8]}"
    emulator = Emulator(api_limit=10**9)
    emulator.faults.set("token", latency=config.token_latency)
    workers: list[asyncio.subprocess.Process] = []
    try:
        async with emulator.serve() as base_url:
            manager = TokenManager(_oauth(base_url), EtcdStore(
                EtcdSettings(endpoints=[etcd]), namespace=namespace))
            for c in _customers(config.customers):
                emulator.seed(c, "Account", [{"Name": f"{c} account {n}"} for n in range(5)])
                await manager.connect(c, token_grant(emulator, c))
            per_process = max(1, config.concurrency // processes)
            for _ in range(processes):
                workers.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "sfrtr.demo_processes", "--worker", "--etcd", etcd,
                    "--namespace", namespace, "--login-url", base_url,
                    "--customers", str(config.customers), "--concurrency", str(per_process),
                    "--duration", str(config.duration),
                    stdout=asyncio.subprocess.PIPE, limit=_REPORT_LIMIT))
            for w in workers:
                assert w.stdout is not None
                if (await w.stdout.readline()).strip() != b"READY":
                    raise RuntimeError("a demo worker failed to start")
            started = time.monotonic()
            expiries = await _expire_until(emulator, config, started,
                                           started + config.duration, lambda t: None)
            tally = Tally()
            stalls: list[float] = []
            for w in workers:
                assert w.stdout is not None
                report = orjson.loads(await w.stdout.readline())
                stalls.append(report["max_stall"])
                tally.calls += report["calls"]
                tally.errors += report["errors"]
                tally.latencies += report["latencies"]
                for kind, n in report["kinds"].items():
                    tally.kinds[kind] = tally.kinds.get(kind, 0) + n
                await w.wait()
            elapsed = time.monotonic() - started
            await manager.aclose()
        figures = _figures(tally, emulator, expiries, elapsed)
        figures["max loop stall ms"] = 1000 * max(stalls, default=0.0)
        _report(out, f"sfrtr, {processes} processes on etcd", config, figures, tally)
        out("  max loop stall per worker ms: " + ", ".join(f"{1000 * s:.0f}" for s in stalls))
        return figures
    finally:
        for w in workers:
            if w.returncode is None:
                w.kill()
                await w.wait()
        if local is not None:
            local.close()


async def _work(args: argparse.Namespace) -> None:
    monitor = LoopStallMonitor()
    monitor.start()
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        manager = TokenManager(_oauth(args.login_url, http), EtcdStore(
            EtcdSettings(endpoints=[args.etcd]), namespace=args.namespace))
        await manager.store.read("warm-up")  # starts the store: lease, mirror, watch
        print("READY", flush=True)
        tally = Tally()
        stop_at = time.monotonic() + args.duration
        customers = _customers(args.customers)
        await asyncio.gather(*(_worker(http, manager, customers, i, stop_at, tally)
                               for i in range(args.concurrency)))
        await manager.aclose()
    print(orjson.dumps({"calls": tally.calls, "errors": tally.errors, "kinds": tally.kinds,
                        "latencies": tally.latencies, "max_stall": monitor.stop()}).decode(),
          flush=True)


def _worker_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--etcd", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--login-url", required=True)
    p.add_argument("--customers", type=int, required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_work(p.parse_args()))


if __name__ == "__main__":
    _worker_main()
