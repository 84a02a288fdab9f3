"""sfrtr against what users would pick instead, side by side in one run.

The emulator runs in a process of its own, so the CPU of the client under test
and the CPU of the server it talks to are counted apart:

* **query throughput**: ``simple_salesforce`` (sync, ``requests``) in a pool of
  W threads against ``client.query()`` from W coroutines, one customer per
  worker; calls/s and CPU per call (client, emulator). Rounds alternate.
* **expiry storm**: every session expires while W coroutines per customer keep
  querying; sfrtr against a per-request refresh-on-401 client without
  coalescing (what jsforce's and restforce's refresh hooks amount to: each
  request that sees a 401 refreshes with the token it holds). Redemptions,
  refresh-token reuse, failed calls and customers locked out (their stored
  refresh token is no longer live at the emulator).
* **refresh CPU**: K customers expire at once; the client's own CPU per
  refresh for sfrtr (memory store and etcd) against a bare aiohttp POST of
  the same refresh to the token endpoint, at the same concurrency.

Needs ``pip install 'sfrtr[bench]'`` for simple_salesforce.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import aiohttp

from sfrtr import (
    Client,
    InstanceUrlPolicy,
    MemoryStore,
    OAuthClient,
    Secret,
    TokenManager,
)
from sfrtr.emulator.sdk import oauth_config
from sfrtr.emulator.server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
from sfrtr.oauth.grant import TokenGrant, parse_grant
from sfrtr.store.base import TokenStore

SOQL = "SELECT Id, Name FROM Account LIMIT 5"
API = "67.0"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class EmulatorProcess:
    """``python -m sfrtr.emulator`` on a free loopback port, with its admin API."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sfrtr.emulator", "--port", "0"],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if "sfrtr emulator on " not in first:
            self.proc.kill()
            raise RuntimeError(f"emulator did not start: {first!r}")
        self.url = first.split("sfrtr emulator on ", 1)[1].strip()

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def cpu(self) -> float:
        """CPU seconds the emulator process has used (user + system)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def grant(self, customer: str) -> TokenGrant:
        answer = self.admin("POST", "/_emulator/customers", {"name": customer})
        return parse_grant(answer, policy=InstanceUrlPolicy.for_emulator(),
                           client_secret=Secret(DEFAULT_CLIENT_SECRET))

    def ledger(self) -> dict[str, int]:
        return dict(self.admin("GET", "/_emulator/ledger")["totals"])

    def token_state(self, refresh_token: str) -> str:
        return str(self.admin("POST", "/_emulator/refresh-token-state",
                              {"refresh_token": refresh_token})["state"])


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


# -- query throughput ------------------------------------------------------------------


def _simple_salesforce_round(grants: list[TokenGrant], per_worker: int) -> float:
    from simple_salesforce import Salesforce

    def worker(grant: TokenGrant) -> None:
        sf = Salesforce(instance_url=grant.instance_url,
                        session_id=grant.access_token.reveal(), version=API)
        # simple_salesforce always says https; the emulator serves plain http on loopback.
        sf.base_url = f"{grant.instance_url}/services/data/v{API}/"
        for _ in range(per_worker):
            sf.query(SOQL)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(grants)) as pool:
        for done in [pool.submit(worker, g) for g in grants]:
            done.result()
    return time.perf_counter() - started


async def _sfrtr_round(clients: list[Client], per_worker: int) -> float:
    async def worker(client: Client) -> None:
        for _ in range(per_worker):
            await client.query(SOQL)

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    return time.perf_counter() - started


async def query_throughput(em: EmulatorProcess, workers: int = 50, calls: int = 5000,
                           rounds: int = 3) -> list[dict[str, Any]]:
    names = [f"q{i}" for i in range(workers)]
    grants = {}
    for c in names:
        grants[c] = em.grant(c)
        em.admin("POST", "/_emulator/seed", {"customer": c, "sobject": "Account",
                                             "records": [{"Name": f"n{i}"} for i in range(5)]})
    manager = TokenManager(OAuthClient(oauth_config(em.url)), MemoryStore())
    for c in names:
        await manager.connect(c, grants[c])
    clients = [Client(c, manager, api_version=API) for c in names]
    per_worker = calls // workers
    await _sfrtr_round(clients, 2)  # warm both pools
    totals: dict[str, list[float]] = {
        f"simple_salesforce, {workers} threads": [0.0, 0.0, 0.0],
        f"sfrtr client.query(), {workers} coroutines": [0.0, 0.0, 0.0]}
    try:
        await asyncio.to_thread(_simple_salesforce_round, list(grants.values()), 2)
    except ImportError:  # not installed: pip install 'sfrtr[bench]'
        del totals[f"simple_salesforce, {workers} threads"]
    for i in range(rounds):
        order = list(totals) if i % 2 == 0 else list(reversed(totals))
        for name in order:
            cpu0, em0 = _cpu(), em.cpu()
            if name.startswith("simple"):
                wall = _simple_salesforce_round(list(grants.values()), per_worker)
            else:
                wall = await _sfrtr_round(clients, per_worker)
            t = totals[name]
            t[0] += wall
            t[1] += _cpu() - cpu0
            t[2] += em.cpu() - em0
    await manager.aclose()
    n = per_worker * workers * rounds
    return [{"variant": name, "calls/s": n / wall,
             "client CPU us/call": cpu / n * 1e6, "emulator CPU us/call": emcpu / n * 1e6}
            for name, (wall, cpu, emcpu) in totals.items()]


# -- expiry storm ----------------------------------------------------------------------


class _Unauthorized(Exception):
    pass


class NaiveClient:
    """Refresh-on-401 per request, no coalescing, tokens shared per customer."""

    def __init__(self, session: aiohttp.ClientSession, token_url: str,
                 grants: dict[str, TokenGrant]) -> None:
        self.session = session
        self.token_url = token_url
        self.tokens = {c: [g.access_token.reveal(), str(g.refresh_token.reveal())
                           if g.refresh_token else "", g.instance_url]
                       for c, g in grants.items()}

    async def _get(self, customer: str) -> Any:
        access, _, instance = self.tokens[customer]
        async with self.session.get(f"{instance}/services/data/v{API}/query",
                                    params={"q": SOQL},
                                    headers={"Authorization": f"Bearer {access}"}) as resp:
            if resp.status == 401:
                raise _Unauthorized
            resp.raise_for_status()
            return await resp.json()

    async def query(self, customer: str) -> Any:
        try:
            return await self._get(customer)
        except _Unauthorized:
            pass
        held = self.tokens[customer][1]
        form = {"grant_type": "refresh_token", "refresh_token": held,
                "client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}
        async with self.session.post(self.token_url, data=form) as resp:
            answer = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"refresh failed: {answer.get('error')}")
        self.tokens[customer][0] = answer["access_token"]
        self.tokens[customer][1] = answer.get("refresh_token", held)
        return await self._get(customer)


async def expiry_storm(em: EmulatorProcess, customers: int = 20, coroutines: int = 50,
                       token_latency: float = 0.1) -> list[dict[str, Any]]:
    rows = []
    em.admin("POST", "/_emulator/faults", {"token": {"latency": token_latency}})
    for variant in ("refresh-on-401 per request (jsforce/restforce style)",
                    "sfrtr client.query()"):
        tag = "n" if variant.startswith("refresh") else "s"
        names = [f"storm-{tag}{i}" for i in range(customers)]
        grants = {c: em.grant(c) for c in names}
        for c in names:
            em.admin("POST", "/_emulator/seed", {"customer": c, "sobject": "Account",
                                                 "records": [{"Name": "x"}]})
        manager = TokenManager(OAuthClient(oauth_config(em.url)), MemoryStore())
        naive = NaiveClient(manager.oauth.session, f"{em.url}/services/oauth2/token", grants)
        clients = {}
        for c in names:
            await manager.connect(c, grants[c])
            clients[c] = Client(c, manager, api_version=API)
        for c in names:
            em.admin("POST", "/_emulator/expire", {"customer": c})
        before, cpu0, started = em.ledger(), _cpu(), time.perf_counter()

        calls = [naive.query(c) if tag == "n" else clients[c].query(SOQL)
                 for c in names for _ in range(coroutines)]
        results = await asyncio.gather(*(_succeeds(call) for call in calls))
        wall, cpu = time.perf_counter() - started, _cpu() - cpu0
        ledger = _delta(em.ledger(), before)
        if tag == "n":
            held = {c: naive.tokens[c][1] for c in names}
        else:
            held = {}
            for c in names:
                current = await manager.store.read(c)
                held[c] = current.record.refresh_token.reveal() if current else ""
        locked = sum(1 for c in names if em.token_state(held[c]) != "live")
        await manager.aclose()
        rows.append({"variant": variant, "customers": customers, "calls": len(results),
                     "redemptions": ledger["redemptions"], "reuse": ledger["reuse"],
                     "concurrent rejections": ledger["concurrent_rejections"],
                     "revocations": ledger["revocations"],
                     "failed calls": results.count(False), "customers locked out": locked,
                     "wall ms": wall * 1000, "client CPU ms": cpu * 1000})
    em.admin("DELETE", "/_emulator/faults")
    return rows


async def _succeeds(call: Awaitable[object]) -> bool:
    try:
        await call
    except Exception:  # a failed call is what is counted here
        return False
    return True


# -- refresh CPU -----------------------------------------------------------------------


async def _bare_refreshes(url: str, tokens: list[str], concurrency: int) -> None:
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0)) as session:

        async def one(token: str) -> None:
            form = {"grant_type": "refresh_token", "refresh_token": token,
                    "client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}
            async with slots, session.post(url, data=form) as resp:
                await resp.read()
                assert resp.status == 200, resp.status

        await asyncio.gather(*(one(t) for t in tokens))


async def _sfrtr_refreshes(em: EmulatorProcess, store: TokenStore,
                           names: list[str]) -> tuple[float, float, int]:
    manager = TokenManager(OAuthClient(oauth_config(em.url)), store)
    for c in names:
        record = await manager.connect(c, em.grant(c))
        await manager.store.put(c, record.replace(expires_at=time.time() - 1))
    await manager.token(names[0])  # open the connection pool, as the bare run does
    cpu0, em0 = _cpu(), em.cpu()
    await asyncio.gather(*(manager.token(c) for c in names[1:]))
    cpu, emcpu = _cpu() - cpu0, em.cpu() - em0
    redemptions = manager.stats.redemptions - 1
    await manager.aclose()
    return cpu, emcpu, redemptions


async def _bare_round(em: EmulatorProcess, tag: str, customers: int,
                      concurrency: int) -> tuple[float, float]:
    tokens = [str(em.grant(f"{tag}-{i}").refresh_token.reveal())  # type: ignore[union-attr]
              for i in range(customers + 1)]
    url = f"{em.url}/services/oauth2/token"
    await _bare_refreshes(url, tokens[:1], concurrency)  # open the pool, as sfrtr's does
    cpu0, em0 = _cpu(), em.cpu()
    await _bare_refreshes(url, tokens[1:], concurrency)
    return _cpu() - cpu0, em.cpu() - em0


async def _cpu_round(em: EmulatorProcess, make: Any, tag: str, customers: int,
                     concurrency: int) -> tuple[float, float]:
    """One variant's client and emulator CPU per refresh. Every round starts from the
    same collector state, with what the process already holds (earlier rounds' and
    benchmarks' heaps) frozen out of the collections: a full collection then costs
    what this round keeps alive, not what ran before it (in the suite that doubled
    sfrtr's figure, whose flights keep more alive)."""
    gc.collect()
    gc.freeze()
    try:
        if make is None:
            cpu, emcpu = await _bare_round(em, tag, customers, concurrency)
        else:
            names = [f"{tag}-{j}" for j in range(customers + 1)]
            cpu, emcpu, redemptions = await _sfrtr_refreshes(em, make(), names)
            assert redemptions == customers, (tag, redemptions)
    finally:
        gc.unfreeze()
    return cpu / customers, emcpu / customers


async def refresh_cpu(em: EmulatorProcess, customers: int = 1000, etcd: bool = True,
                      rounds: int = 5) -> list[dict[str, Any]]:
    """Client CPU per refresh; rounds alternate the order, medians are reported.

    The etcd store's rounds come after the memory store's, in a block of their own
    with bare rounds of their own beside them: its gRPC channel's threads are CPU
    of this process (as they should be, for its own figure) and may still run after
    its manager closed, which would have landed in whatever round came next."""
    concurrency = OAuthClient(oauth_config(em.url)).config.max_concurrent
    bare_name = f"bare aiohttp POST ({concurrency} at a time)"
    memory_name = "sfrtr manager.token(), memory store"
    etcd_name = "sfrtr manager.token(), etcd store"
    samples: dict[str, list[tuple[float, float]]] = {bare_name: [], memory_name: []}

    async def block(name: str, make: Any, bare: list[tuple[float, float]]) -> None:
        runs = samples.setdefault(name, [])
        for i in range(rounds):
            order = [(bare_name, None), (name, make)]
            for n, (variant, factory) in enumerate(order if i % 2 == 0 else order[::-1]):
                result = await _cpu_round(em, factory, f"{name[:1]}{i}v{n}-{variant[:4]}",
                                          customers, concurrency)
                (bare if factory is None else runs).append(result)

    await block(memory_name, MemoryStore, samples[bare_name])
    rows_for = [(bare_name, samples[bare_name], samples[bare_name]),
                (memory_name, samples[memory_name], samples[bare_name])]
    if etcd:
        from sfrtr.store.etcd import EtcdStore
        from sfrtr.store.etcd_client import EtcdSettings
        from sfrtr.store.etcd_launcher import LocalEtcd

        launcher = LocalEtcd()
        launcher.start()
        endpoint = launcher.endpoint
        etcd_bare: list[tuple[float, float]] = []
        try:
            await block(etcd_name, lambda: EtcdStore(
                EtcdSettings(endpoints=[endpoint]), namespace=f"bench/refresh-{os.getpid()}"),
                etcd_bare)
        finally:
            launcher.close()
        rows_for.append((etcd_name, samples[etcd_name], etcd_bare))
    return [{"variant": name, "refreshes": customers, "rounds": rounds,
             "client CPU us/refresh": statistics.median(c for c, _ in runs) * 1e6,
             "emulator CPU us/refresh": statistics.median(e for _, e in runs) * 1e6,
             "ratio to bare": statistics.median(c / b for (c, _), (b, _) in
                                                zip(runs, bare, strict=True)),
             "ratio to bare per round": [round(c / b, 2) for (c, _), (b, _) in
                                         zip(runs, bare, strict=True)]}
            for name, runs, bare in rows_for]


PARTS = ("query_throughput", "expiry_storm", "refresh_cpu")


async def run(quick: bool = False, etcd: bool = True,
              parts: tuple[str, ...] = PARTS) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    with EmulatorProcess() as em:
        if "query_throughput" in parts:
            results["query_throughput"] = await query_throughput(
                em, workers=5 if quick else 50, calls=50 if quick else 5000,
                rounds=1 if quick else 3)
        if "expiry_storm" in parts:
            results["expiry_storm"] = await expiry_storm(em, customers=3 if quick else 20,
                                                         coroutines=5 if quick else 50)
        if "refresh_cpu" in parts:
            results["refresh_cpu"] = await refresh_cpu(
                em, customers=20 if quick else 1000, etcd=etcd, rounds=1 if quick else 5)
    return results


def main_tables(*, quick: bool, etcd: bool, parts: tuple[str, ...] = PARTS) -> None:
    """Run them (all three by default), print their tables and write their JSON."""
    from benchmarks import report

    results = asyncio.run(run(quick, etcd=etcd, parts=parts))
    titles = {"query_throughput": "Query throughput against simple_salesforce (emulator in "
                                  "its own process)",
              "expiry_storm": "Expiry storm: every session expires under load",
              "refresh_cpu": "CPU per refresh: sfrtr against a bare aiohttp POST"}
    for name, rows in results.items():
        print(report.table(titles[name], rows), "\n")
        report.write(name, {"quick": quick}, rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.alternatives")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--no-etcd", action="store_true", help="skip the etcd store")
    parser.add_argument("--only", choices=PARTS, action="append",
                        help="run only this part (may be repeated)")
    args = parser.parse_args()
    main_tables(quick=args.quick, etcd=not args.no_etcd, parts=tuple(args.only or PARTS))


if __name__ == "__main__":
    main()
