"""Fault runs: a worker fleet on a real etcd, against the emulator, under faults.

``python -m benchmarks.faults`` (or ``nox -s faults``). Each run starts a fresh
local etcd, serves the emulator in this process (real sockets, 127.0.0.1),
stores ``customers`` grants and starts ``processes`` workers
(``python -m tests.etcd_worker --production``: the product's default
``RefreshPolicy`` and OAuth timeouts; only the lease TTL is passed, 30 s
unless ``--lease-ttl`` says otherwise), each running ``coroutines`` callers.
Refresh waves are session expiries at the emulator every ``spacing`` seconds.
Then one fault, then one more wave (so every customer is needed again), then
the run waits until every customer is settled.

Faults (``--faults``):

- ``kill``: three waves, each SIGKILLs a (seeded) worker just after it
  announces a redemption, 0 to 40 ms later: before the request left, during
  it, or after the rotation and before the commit.
- ``stop``: SIGSTOP a worker as it redeems, for lease TTL + 5 s, then SIGCONT.
- ``etcd-restart``: SIGKILL etcd during a wave, start it again 4 s later.
- ``compaction``: compact etcd to its current revision every 0.5 s for 10 s
  while waves run.
- ``answers-lost``: for 10 s of waves, a proxy in front of etcd cuts the
  connection right after forwarding a request chunk of >= 300 bytes (a Txn
  with a record: acquire, commit, put, rescue) with probability 0.3: the
  request is applied, its answer never arrives.
- ``answers-delayed``: for 10 s of waves, the proxy holds every answer 3 s.

Per run: redemptions, reuse, revocations, concurrent rejections (the
emulator's ledger), unjustified lockouts and customers ``reauth_required``
(:func:`sfrtr.emulator.audit.audit_lockouts` on the final store), the time
from the end of the fault until every customer is settled (valid with a live
refresh token and a live access token, i.e. the post-fault wave absorbed, or
justifiably ``reauth_required``), and the longest event-loop
stall of each surviving worker (``LoopStallMonitor``; a SIGSTOPped worker's
figure includes its stop and is shown apart). Table on stdout, JSON under
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson

from benchmarks import report
from benchmarks.etcd_proxy import EtcdProxy
from sfrtr.emulator import Emulator
from sfrtr.emulator.audit import LockoutAudit, audit_lockouts
from sfrtr.emulator.sdk import oauth_config, token_grant
from sfrtr.errors import SfrtrError
from sfrtr.manager import TokenManager
from sfrtr.oauth import OAuthClient
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = ("kill", "stop", "etcd-restart", "compaction", "answers-lost", "answers-delayed")
PROXIED = ("answers-lost", "answers-delayed")


@dataclass
class RunConfig:
    fault: str
    seed: int
    processes: int = 8
    coroutines: int = 200
    customers: int = 50
    pause: float = 0.3
    """Seconds between one coroutine's calls (1,600 unpaced coroutines starve 2 cores)."""
    lease_ttl: int = 30
    spacing: float = 3.0
    pre_waves: int = 2
    settle_cap: float = 180.0
    stop_cap: float = 45.0
    """How long workers get, after SIGTERM, to finish their calls and report."""
    token_latency: float = 0.02
    token_jitter: float = 0.03


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    redeeming: asyncio.Event = field(default_factory=asyncio.Event)
    max_stall: float = 0.0
    result: dict[str, Any] | None = None
    fate: str = "alive"
    """alive, killed (by the fault), stopped (SIGSTOP then SIGCONT), reaped (did not report)."""
    stderr_tail: bytes = b""
    last_seen: float = 0.0
    """Monotonic time of its last line; it says ``EVENT alive`` every second."""

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and self.fate != "killed"

    async def read(self) -> None:
        assert self.process.stdout is not None
        while raw := await self.process.stdout.readline():
            self.last_seen = time.monotonic()
            line = raw.decode(errors="replace").strip()
            if line == "READY":
                self.ready.set()
            elif line == "EVENT redeeming":
                self.redeeming.set()
            elif line.startswith("EVENT max_stall "):
                self.max_stall = max(self.max_stall, float(line.split()[-1]))
            elif line.startswith("{"):
                self.result = orjson.loads(line)
                self.max_stall = max(self.max_stall, float(self.result.get("max_stall", 0.0)))

    async def drain_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(65536):
            self.stderr_tail = (self.stderr_tail + chunk)[-4000:]

    def signal(self, sig: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(sig)

    def note_silence(self) -> None:
        """A worker still silent when reaped has been frozen since its last line."""
        if self.process.returncode is None and self.last_seen:
            silent = time.monotonic() - self.last_seen
            if silent > 1.5:  # a heartbeat is due every second
                self.max_stall = max(self.max_stall, silent)


class Run:
    def __init__(self, config: RunConfig, out: Any = print) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.out = out
        self.emulator = Emulator(api_limit=10**9, rng_seed=config.seed)
        self.etcd = LocalEtcd()
        self.proxy: EtcdProxy | None = None
        self.workers: list[Worker] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.customers = [f"cust-{i:02d}" for i in range(config.customers)]
        self.namespace = f"sfrtr-faults/{uuid.uuid4().hex[:8]}"
        self.waves = 0
        self.notes: list[str] = []
        self.audit_errors: dict[str, int] = {}

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.out(f"    [{self.config.fault} seed {self.config.seed}] {text}")

    def wave(self) -> None:
        for w in self.workers:
            w.redeeming.clear()
        self.emulator.expire_sessions()
        self.waves += 1

    async def waves_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(self.config.spacing, left))
            if end - time.monotonic() > 0.5:
                self.wave()

    async def target_redeeming(self, timeout: float = 3.0) -> Worker:
        """A seeded choice among live workers, once it announces a redemption (or timeout)."""
        target = self.rng.choice([w for w in self.workers if w.alive])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(target.redeeming.wait(), timeout)
        return target

    async def run(self) -> dict[str, Any]:
        cfg = self.config
        self.etcd.start()
        endpoint = self.etcd.endpoint
        if cfg.fault in PROXIED:
            self.proxy = EtcdProxy(endpoint, seed=cfg.seed)
            await self.proxy.start()
            endpoint = self.proxy.endpoint
        self.emulator.faults.set("token", latency=cfg.token_latency, jitter=cfg.token_jitter)
        async with self.emulator.serve() as base_url:
            store = EtcdStore(EtcdSettings(endpoints=[self.etcd.endpoint]),
                              namespace=self.namespace, lease_ttl=cfg.lease_ttl)
            manager = TokenManager(OAuthClient(oauth_config(base_url)), store)
            try:
                for c in self.customers:
                    await manager.connect(c, token_grant(self.emulator, c))
                return await self._run(base_url, endpoint, store)
            finally:
                await self._reap()
                with contextlib.suppress(Exception):
                    await manager.aclose()
                if self.proxy is not None:
                    await self.proxy.aclose()
                with contextlib.suppress(OSError):  # kept for a look after the run
                    shutil.copy(self.etcd._log_path, f"/tmp/etcd-{cfg.fault}-{cfg.seed}.log")
                self.etcd.close()

    async def _run(self, base_url: str, endpoint: str, store: EtcdStore) -> dict[str, Any]:
        cfg = self.config
        for i in range(cfg.processes):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.etcd_worker", "--production",
                "--etcd", endpoint, "--namespace", self.namespace, "--login-url", base_url,
                "--customers", ",".join(self.customers), "--coroutines", str(cfg.coroutines),
                "--pause", str(cfg.pause), "--lease-ttl", str(cfg.lease_ttl),
                "--duration", "900", cwd=ROOT,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            w = Worker(i, process)
            self.workers.append(w)
            self.tasks += [asyncio.create_task(w.read()), asyncio.create_task(w.drain_stderr())]
        async with asyncio.timeout(60):
            for w in self.workers:
                await w.ready.wait()
        started = time.monotonic()
        await asyncio.sleep(1.5)
        for _ in range(cfg.pre_waves):
            self.wave()
            await asyncio.sleep(cfg.spacing)
        fault_started = time.monotonic()
        await getattr(self, "_fault_" + cfg.fault.replace("-", "_"))()
        fault_ended = time.monotonic()
        self.wave()  # every customer is needed again after the fault
        settle = await self._settle(store, fault_ended)
        ledger = {k: self.emulator.ledger[k] for k in
                  ("redemptions", "reuse", "revocations", "concurrent_rejections",
                   "rejected_refreshes")}
        await self._stop_workers()
        audit = await self._audit(store)
        summary = audit.summary() if audit else {}
        stuck = {}
        for c in (audit.unsettled if audit else []):
            current = await store.read(c)
            if current is not None:
                intent = current.record.intent
                stuck[c] = {"status": current.record.status.value, "locked": current.locked,
                            "version": current.version, "reason": current.record.reason[:100],
                            "intent": None if intent is None else
                            {"worker": intent.worker, "lease": f"{intent.lease:x}",
                             "id": intent.id}}
        survivors = [w for w in self.workers if w.fate != "killed"]
        stalls = {w.index: round(w.max_stall, 3) for w in survivors if w.fate != "stopped"}
        failures: dict[str, int] = {}
        for w in self.workers:
            for kind, n in ((w.result or {}).get("failures") or {}).items():
                failures[kind] = failures.get(kind, 0) + n
        return {
            "fault": cfg.fault, "seed": cfg.seed, **ledger,
            "unjustified_lockouts": summary.get("unjustified_lockouts"),
            "reauth_required": summary.get("reauth_required"),
            "valid_but_dead": summary.get("valid_but_dead"),
            "unsettled_at_end": summary.get("unsettled"),
            "settle_s": settle,
            "max_stall_s": max(stalls.values(), default=None),
            "stall_per_process": stalls,
            "stopped_process_stall": {w.index: round(w.max_stall, 3) for w in survivors
                                      if w.fate == "stopped"},
            "workers_without_report": [w.index for w in survivors if w.result is None],
            "fault_s": round(fault_ended - fault_started, 2),
            "run_s": round(time.monotonic() - started, 1),
            "waves": self.waves,
            "calls": sum((w.result or {}).get("calls", 0) for w in self.workers),
            "failures": failures,
            "by_status": summary.get("by_status"),
            "unjustified_customers": summary.get("unjustified_customers"),
            "proxy": asdict(self.proxy.stats) if self.proxy else None,
            "notes": self.notes,
            "audit_errors": self.audit_errors,
            "unsettled_detail": stuck,
        }

    # -- faults -------------------------------------------------------------

    async def _fault_kill(self) -> None:
        for k in range(3):
            if sum(w.alive for w in self.workers) < 2:
                self.note("one worker left: not killing it")
                break
            self.wave()
            target = await self.target_redeeming()
            await asyncio.sleep(self.rng.uniform(0.0, 0.04))
            target.signal(signal.SIGKILL)
            target.fate = "killed"
            self.note(f"kill {k + 1}: SIGKILL worker {target.index}")
            if k < 2:
                await asyncio.sleep(self.config.spacing)

    async def _fault_stop(self) -> None:
        self.wave()
        target = await self.target_redeeming()
        target.signal(signal.SIGSTOP)
        target.fate = "stopped"
        self.note(f"SIGSTOP worker {target.index} for {self.config.lease_ttl + 5}s")
        try:
            await self.waves_for(self.config.lease_ttl + 5)
        finally:
            target.signal(signal.SIGCONT)

    async def _fault_etcd_restart(self) -> None:
        self.wave()
        await asyncio.sleep(self.rng.uniform(0.0, 0.2))
        process = self.etcd.process
        assert process is not None
        process.kill()
        await asyncio.to_thread(process.wait)
        self.etcd.process = None
        self.note("etcd SIGKILLed")
        await asyncio.sleep(4.0)
        await asyncio.to_thread(self.etcd.start)
        self.note("etcd restarted")

    async def _fault_compaction(self) -> None:
        url = f"http://{self.etcd.endpoint}/v3/kv"
        key = base64.b64encode(b"\0").decode()
        compactions = 0
        end = time.monotonic() + 10
        next_wave = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < end:
                if time.monotonic() >= next_wave:
                    self.wave()
                    next_wave += self.config.spacing
                async with http.post(f"{url}/range", json={"key": key}) as r:
                    revision = int((await r.json())["header"]["revision"])
                async with http.post(f"{url}/compaction", json={"revision": revision}) as r:
                    compactions += r.status == 200
                await asyncio.sleep(0.5)
        self.note(f"{compactions} compactions")

    async def _fault_answers_lost(self) -> None:
        assert self.proxy is not None
        self.wave()
        self.proxy.lose_probability = 0.3
        try:
            await self.waves_for(10)
        finally:
            self.proxy.lose_probability = 0.0
        self.note(f"{self.proxy.stats.cuts} answers lost (connections cut after a request)")

    async def _fault_answers_delayed(self) -> None:
        assert self.proxy is not None
        self.wave()
        self.proxy.delay = 3.0
        try:
            await self.waves_for(10)
        finally:
            self.proxy.delay = 0.0
        self.note(f"{self.proxy.stats.delayed_chunks} answer chunks delayed 3s")

    # -- measuring ------------------------------------------------------------

    async def _audit(self, store: EtcdStore) -> LockoutAudit | None:
        try:
            # One read per customer, from the process that also serves the emulator to
            # every worker: at a load of 20 that takes more than 10 s, and an audit cut
            # off measured nothing (a fault run with two CPU burners, 2026-11-29).
            async with asyncio.timeout(30):
                return await audit_lockouts(store, self.emulator, self.customers)
        except (SfrtrError, TimeoutError) as exc:
            key = f"{type(exc).__name__}: {exc}"[:120]
            self.audit_errors[key] = self.audit_errors.get(key, 0) + 1
            return None

    async def _settle(self, store: EtcdStore, since: float) -> float | None:
        """Seconds from ``since`` until every customer is settled; None past the cap."""
        while time.monotonic() - since < self.config.settle_cap:
            audit = await self._audit(store)
            if audit is not None and audit.settled and not audit.stale_access:
                return round(time.monotonic() - since, 2)
            await asyncio.sleep(0.5)
        return None

    async def _stop_workers(self) -> None:
        for w in self.workers:
            if w.alive:
                w.note_silence()
                w.signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.stop_cap):
                for w in self.workers:
                    await w.process.wait()
        for t in self.tasks:  # let the readers take the last lines
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(t), 2)
        for w in self.workers:
            if w.process.returncode is None:
                w.note_silence()
                w.fate = "reaped" if w.fate == "alive" else w.fate
                self.note(f"worker {w.index} did not finish in {self.config.stop_cap:.0f}s")

    async def _reap(self) -> None:
        for w in self.workers:
            if w.process.returncode is None:
                w.signal(signal.SIGCONT)
                w.process.kill()
            await w.process.wait()
        for t in self.tasks:
            t.cancel()


def burners(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


COLUMNS = ("fault", "seed", "redemptions", "reuse", "revocations", "concurrent_rejections",
           "unjustified_lockouts", "reauth_required", "settle_s", "max_stall_s",
           "stopped_process_stall", "workers_without_report")


def shown(row: dict[str, Any]) -> dict[str, Any]:
    out = {c: row.get(c) for c in COLUMNS}
    out["settle_s"] = row["settle_s"] if row["settle_s"] is not None else \
        f">{row['settle_cap']:.0f}"
    out["stopped_process_stall"] = ",".join(f"{v:.1f}" for v in
                                            row["stopped_process_stall"].values()) or "-"
    out["workers_without_report"] = ",".join(map(str, row["workers_without_report"])) or "-"
    return out


async def run_all(configs: list[RunConfig]) -> list[dict[str, Any]]:
    rows = []
    for cfg in configs:
        print(f"  run: {cfg.fault}, seed {cfg.seed}", flush=True)
        row = await Run(cfg).run()
        row["settle_cap"] = cfg.settle_cap
        rows.append(row)
        print(f"    -> {shown(row)}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, from: "
                   + ", ".join(FAULTS))
    p.add_argument("--seeds", default="1,2,3", help="comma-separated")
    p.add_argument("--quick", action="store_true",
                   help="one seed, faults kill,etcd-restart,answers-lost, shorter caps")
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--coroutines", type=int, default=200)
    p.add_argument("--customers", type=int, default=50)
    p.add_argument("--lease-ttl", type=int, default=30, help="the store's default: 30")
    p.add_argument("--settle-cap", type=float, default=180.0)
    p.add_argument("--burn", type=int, default=0, help="CPU-burning processes alongside")
    p.add_argument("--name", default=None, help="results file name (default faults[-quick])")
    args = p.parse_args(argv)
    faults = args.faults.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    settle_cap, pre_waves, stop_cap = args.settle_cap, 2, 45.0
    if args.quick:
        if args.faults == p.get_default("faults"):
            faults = ["kill", "etcd-restart", "answers-lost"]
        seeds, pre_waves, stop_cap = seeds[:1], 1, 15.0
        # Above the documented settle bound of a kill (docs/protocol.md, "Bounds":
        # about 89 s at the defaults): a 60 s cap could never see a kill settle.
        settle_cap = min(settle_cap, 100.0)
    unknown = set(faults) - set(FAULTS)
    if unknown:
        p.error(f"unknown faults: {sorted(unknown)}")
    configs = [RunConfig(fault=f, seed=s, processes=args.processes, coroutines=args.coroutines,
                         customers=args.customers, lease_ttl=args.lease_ttl,
                         settle_cap=settle_cap, pre_waves=pre_waves, stop_cap=stop_cap)
               for f in faults for s in seeds]
    burning = burners(args.burn)
    try:
        rows = asyncio.run(run_all(configs))
    finally:
        for b in burning:
            b.kill()
            b.wait()
    params = {"faults": faults, "seeds": seeds, "processes": args.processes,
              "coroutines": args.coroutines, "customers": args.customers,
              "lease_ttl": args.lease_ttl, "settle_cap": settle_cap, "burn": args.burn,
              "policy": "RefreshPolicy() defaults; OAuth default timeouts"}
    title = (f"Fault runs: {args.processes} processes x {args.coroutines} coroutines x "
             f"{args.customers} customers, lease TTL {args.lease_ttl}s, burn {args.burn}")
    print("\n" + report.table(title, [shown(r) for r in rows]))
    path = report.write(args.name or ("faults-quick" if args.quick else "faults"), params, rows)
    print(f"\nJSON: {path}")
    bad = any(r["reuse"] or r["revocations"] or r["unjustified_lockouts"] or
              r["settle_s"] is None for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
