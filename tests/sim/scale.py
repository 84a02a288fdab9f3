"""The simulation at fleet scale: many workers, a keyspace of many customers, faults on.

``python -m tests.sim.scale`` (or ``python -m tests.sim --scale``) runs, by default,
1,000 simulated workers over 1,000,000 customers with ``mirror="served"``, and
100 workers over 100,000 customers in both modes for comparison; it prints the
figures and writes them to ``benchmarks/results/sim_scale.json``.

Each worker is the real stack of the ordinary simulation (``TokenManager`` over an
``EtcdStore`` whose client is the etcd model, an ``OAuthClient`` over the token
endpoint model), and the run's checks are the ordinary ones (``World``'s checks
as it goes, ``invariants.check`` at the end, the mirror-live checks throttled).
What is shortcut, so that it runs in minutes on two cores:

- **The customers exist before the run.** Their records are put into the etcd
  model directly (``EtcdModel.fill``: no Txn, no watch event, one revision each),
  valid, with access tokens issued at times spread over one session lifetime; the
  token endpoint knows their grants lazily (a family is made the first time one of
  those refresh or access tokens is looked at). No ``connect()`` is simulated.
- **Only a share of them is active.** ``active`` customers (default 5 % of the
  keyspace) make API calls during the run, each about every ``period`` seconds,
  each call routed to one of the customer's ``route`` workers (consecutive worker
  numbers from a hash of the customer): a worker serves about
  ``active * route / workers`` customers. The other customers sit in etcd untouched.
- **Time is compressed.** Sessions last ``session`` seconds (600, not 7,200), so
  that in a few simulated minutes a fifth of the active customers come due for a
  refresh: a refresh rate per customer 12 times Salesforce's default.
- **Faults are a fixed list**, not drawn: a worker paused past its lease (its
  leases expire in the model and its locks with them), a worker partitioned from
  etcd, a worker killed, watch cancellations, answers lost, two compactions.
- **The liveness bound is judged on the active customers** (on the workers they
  are routed to, not on every worker), and the end-state invariants on every
  customer that was used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from sfrtr.errors import SfrtrError

from .clock import EPOCH, FakeTime, SimLoop, patched_time
from .etcd_model import EtcdModel, ModelWatchStream
from .invariants import check
from .plan import Config, Fault, Plan, worker_names
from .runner import _quiet_collection
from .token_model import INSTANCE_URL, Family, TokenEndpoint
from .trace import Trace, sfrtr_logs_into
from .world import CLIENT_SECRET, World

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "sim_scale.json"

LAZY_REFRESH = "5Aep~"
LAZY_ACCESS = "00Dsim!~"
LAZY_FAMILY = 10**9
"""Family ids of the pre-existing grants: ``LAZY_FAMILY + customer index``."""


def _issued(index: int, session: float) -> float:
    """When customer ``index``'s current session was issued (virtual seconds, <= 0):
    spread evenly over one session lifetime, deterministic."""
    return -session * ((index * 0.6180339887498949) % 1.0)


class _LazyTable(dict[str, Any]):
    """``by_refresh`` / ``access`` of the token endpoint: the pre-existing grants'
    tokens are resolved on first look-up."""

    def __init__(self, resolve: Callable[[str], Any]) -> None:
        super().__init__()
        self._resolve = resolve

    def get(self, key: str, default: Any = None) -> Any:
        found = dict.get(self, key)
        if found is None:
            found = self._resolve(key)
        return default if found is None else found

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None if isinstance(key, str) else False

    def __getitem__(self, key: str) -> Any:
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found


class LazyEndpoint(TokenEndpoint):
    """The token endpoint model, with ``customers`` grants that exist before the run."""

    def __init__(self, *args: Any, customers: int, session: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.customers = customers
        self.session = session
        self.by_refresh = _LazyTable(self._lazy_refresh)
        self.access = _LazyTable(self._lazy_access)

    def _index(self, token: str, prefix: str) -> int | None:
        if not token.startswith(prefix):
            return None
        try:
            index = int(token[len(prefix):])
        except ValueError:
            return None
        return index if 0 <= index < self.customers else None

    def _family(self, index: int) -> Family:
        token = f"{LAZY_REFRESH}{index}"
        family = dict.get(self.by_refresh, token)
        if family is None:
            customer = f"org{index}"
            family = Family(LAZY_FAMILY + index, customer, token)
            dict.__setitem__(self.by_refresh, token, family)
            self.current.setdefault(customer, family)
        return family  # type: ignore[no-any-return]

    def _lazy_refresh(self, token: str) -> Family | None:
        index = self._index(token, LAZY_REFRESH)
        return None if index is None else self._family(index)

    def _lazy_access(self, token: str) -> tuple[Family, float] | None:
        index = self._index(token, LAZY_ACCESS)
        if index is None:
            return None
        found = (self._family(index), _issued(index, self.session))
        dict.__setitem__(self.access, token, found)
        return found


def _records(customers: int, session: float) -> list[tuple[bytes, bytes]]:
    """The etcd keyspace of ``customers`` valid grants (what ``TokenRecord.to_dict``
    writes, formatted directly: a million ``orjson`` round trips would cost more)."""
    out = []
    for i in range(customers):
        issued = EPOCH + _issued(i, session)
        value = orjson.dumps({
            "access_token": f"{LAZY_ACCESS}{i}", "refresh_token": f"{LAZY_REFRESH}{i}",
            "instance_url": INSTANCE_URL, "issued_at": issued,
            "expires_at": issued + session, "generation": 0, "status": "valid",
            "identity_url": f"https://login.salesforce.com/id/00Dsim{LAZY_FAMILY + i:09d}/005sim",
            "scope": "api refresh_token", "reason": "", "grant_id": f"g{i}",
            "refresh_after": 0.0, "backoff": 0.0})
        out.append((b"sim/tok/" + quote(f"org{i}", safe="").encode(), value))
    return out


@dataclass
class ScaleConfig:
    workers: int = 1000
    customers: int = 1_000_000
    mirror: str = "served"
    active: float = 0.05
    """Share of the customers that make API calls during the run."""
    period: float = 20.0
    """Mean seconds between two API calls of one active customer."""
    route: int = 3
    """Workers a customer's calls are spread over."""
    minutes: float = 3.0
    """Simulated minutes of traffic (with faults); a settle phase follows."""
    session: float = 600.0
    idle_after: float = 60.0
    lease_ttl: int = 15
    seed: int = 1


@dataclass
class ScaleResult:
    config: dict[str, Any]
    violations: list[str]
    redemptions: int
    reuse: int
    requests: int
    customers_used: int
    virtual_seconds: float
    traffic_seconds: float
    cpu_seconds: float
    wall_seconds: float
    watch_events_total: int
    watch_events_per_worker_per_s: dict[str, float]
    mirror_entries_per_worker: dict[str, float]
    etcd_events_committed: int
    etcd_events_per_s: float
    round_trips_per_worker: float
    faults: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.config
        fan = self.watch_events_per_worker_per_s
        mir = self.mirror_entries_per_worker
        return (
            f"{c['mirror']:>9}: {c['workers']} workers x {c['customers']:,} customers "
            f"({self.customers_used:,} used, {self.requests:,} API calls in "
            f"{self.traffic_seconds:.0f} s): {self.redemptions:,} redemptions, reuse "
            f"{self.reuse}, {len(self.violations)} violations\n"
            f"           traffic phase: etcd committed {self.etcd_events_committed:,} events "
            f"({self.etcd_events_per_s:.1f}/s); watch events per worker per s: mean "
            f"{fan['mean']:.2f}, max {fan['max']:.2f} (whole run, settling included: "
            f"{self.watch_events_total:,} delivered)\n"
            f"           mirror entries per worker: mean {mir['mean']:.0f}, max "
            f"{mir['max']:.0f} (at the end: mean {mir['end_mean']:.0f}); "
            f"cpu {self.cpu_seconds:.1f} s, wall {self.wall_seconds:.1f} s")


def scale_faults(cfg: ScaleConfig, ttl: int) -> list[Fault]:
    """The fixed fault list, placed in the traffic phase whatever its length."""
    names = worker_names(cfg.workers)
    end = cfg.minutes * 60.0
    pick = random.Random(f"scale-faults:{cfg.seed}")
    w = pick.sample(names[1:], min(4, len(names) - 1)) if len(names) > 1 else names
    w += [names[0]] * (4 - len(w))
    return sorted([
        Fault(round(end * 0.15, 3), "pause", w[0], round(ttl * 1.5, 3)),
        Fault(round(end * 0.25, 3), "etcd_lost", "", 10.0, 0.05),
        Fault(round(end * 0.30, 3), "compact"),
        Fault(round(end * 0.35, 3), "partition", w[1], round(ttl * 0.8, 3)),
        Fault(round(end * 0.45, 3), "kill", w[2]),
        Fault(round(end * 0.55, 3), "watch_break", w[3]),
        Fault(round(end * 0.70, 3), "compact"),
    ], key=lambda f: (f.at, f.kind, f.target))


class ScaleWorld(World):
    """``World`` with the keyspace filled directly and routed, customer-level traffic."""

    def __init__(self, cfg: ScaleConfig, plan: Plan, *args: Any) -> None:
        self.scale = cfg
        self._last_check: dict[str, float] = {}
        self.used: set[str] = set()
        self.mirror_peak: dict[str, int] = {}
        self.check_rng = random.Random(f"scale-check:{cfg.seed}")
        self.served_by: dict[str, set[str]] = {}
        """worker -> the customers its calls were for."""
        self._checking = ""
        self.at_traffic_end: tuple[dict[str, int], int] = ({}, 0)
        """Watch events delivered per worker, and events committed, when traffic stopped."""
        super().__init__(cfg.seed, plan, *args)

    def routed(self, customer_index: int) -> list[Any]:
        start = zlib.crc32(b"%d" % customer_index) % len(self.workers)
        return [self.workers[(start + k) % len(self.workers)]
                for k in range(min(self.scale.route, len(self.workers)))]

    # The live mirror checks cost the whole mirror each: at most one per worker per
    # 5 virtual seconds here.
    def _throttled(self, worker: str) -> bool:
        now = self.loop.time()
        if now - self._last_check.get(worker, -1e9) < 5.0:
            return True
        self._last_check[worker] = now
        return False

    def _entries_to_check(self, mirror: dict[str, Any]) -> list[tuple[str, Any]]:
        """The customers the worker was asked for, and 100 others drawn at random."""
        if len(mirror) <= 400:
            return list(mirror.items())
        mine = self.served_by.get(self._checking, set())
        picked = [(c, mirror[c]) for c in sorted(mine) if c in mirror]
        names = list(mirror)
        return picked + [(c, mirror[c]) for c in self.check_rng.sample(names, 100)]

    def _check_mirror_live(self, worker: str, revision: int) -> None:
        if revision == self.etcd.revision and not self._throttled(worker):
            self._checking = worker
            super()._check_mirror_live(worker, revision)

    def _check_served_live(self, worker: str, stream: ModelWatchStream) -> None:
        if not self._throttled(worker):
            self._checking = worker
            super()._check_served_live(worker, stream)

    async def main(self) -> None:
        cfg, scale = self.cfg, self.scale
        self.spawn(None, self._execute_faults())
        self.spawn(None, self._sample())
        await self._traffic()
        self.at_traffic_end = ({w.name: w.client.watch_events for w in self.workers},
                               self.etcd.events_committed)
        self.trace(None, "faults over: settle phase")
        bound = cfg.settle_bound()
        pairs = [(w, c) for c in sorted(self.used, key=lambda c: int(c[3:]))
                 for w in self.routed(int(c[3:])) if w.name not in self.loop.killed]
        settles = {self.spawn(w.name, self._settle(w, c, self.loop.time() + bound)): (w, c)
                   for w, c in pairs}
        if settles:
            await asyncio.wait(settles, timeout=bound + 1.0)
        for task, (w, c) in settles.items():
            if not task.done():
                self.found.violations.append(
                    f"liveness: {c} did not settle on {w.name} within {bound:.0f}s "
                    "after the faults stopped")
        await asyncio.sleep(cfg.provider_timeout + 3.0)
        await self._quiesce(bound)
        owed = max((w.last_at for w in (*self.etcd.watchers, *self.etcd.streams)),
                   default=0.0)
        await asyncio.sleep(max(0.0, owed - self.loop.time()) + 0.1)
        checks = [self.spawn(w.name, self._converged_on(w, [c for ww, c in pairs if ww is w]))
                  for w in self.alive()]
        if checks:
            await asyncio.wait(checks, timeout=30.0)
        for error in self.etcd.stream_errors:
            self._violation(f"watch: {error}")
        del scale

    async def _traffic(self) -> None:
        """API calls of the active customers, as one Poisson stream over the fleet."""
        scale = self.scale
        rng = random.Random(f"scale-traffic:{scale.seed}")
        n = max(1, int(scale.customers * scale.active))
        active = rng.sample(range(scale.customers), n) if n < scale.customers \
            else list(range(scale.customers))
        rate = n / scale.period
        end = self.cfg.fault_phase
        while True:
            await asyncio.sleep(rng.expovariate(rate))
            if self.loop.time() >= end:
                return
            index = rng.choice(active)
            live = [w for w in self.routed(index) if w.name not in self.loop.killed]
            if not live:
                continue
            w = rng.choice(live)
            customer = f"org{index}"
            if customer not in self.used:
                self.used.add(customer)
                self.connected[customer] = True
            self.served_by.setdefault(w.name, set()).add(customer)
            self.spawn(w.name, self._call(w, customer))

    async def _sample(self) -> None:
        while True:
            for w in self.workers:
                size = len(getattr(w.store, "_mirror", ()))
                if size > self.mirror_peak.get(w.name, 0):
                    self.mirror_peak[w.name] = size
            await asyncio.sleep(10.0)

    async def _converged_on(self, w: Any, customers: list[str]) -> None:
        for c in customers:
            try:
                seen = await w.store.read(c)
            except SfrtrError:
                continue
            key = quote(c, safe="").encode()
            tok = self.etcd.keys.get(b"sim/tok/" + key)
            locked = b"sim/lock/" + key in self.etcd.keys
            truth = (tok.mod_revision if tok else None, locked)
            view = (seen.version if seen else None, seen.locked if seen else False)
            if view != truth:
                self.found.violations.append(
                    f"mirror: {w.name} sees {c} at (version, locked)={view} when the "
                    f"settled store holds {truth}")


def run_scale(scale: ScaleConfig, *, log: Callable[[str], None] = print) -> ScaleResult:
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    ttl = scale.lease_ttl
    config = Config(
        workers=scale.workers, customers=scale.customers, callers=0, think=scale.period,
        cancel_p=0.0, recovery="introspect", reuse_window=0.0, provider_timeout=3.0,
        lease_ttl=ttl, session_lifetime=scale.session, provider_session=scale.session,
        refresh_margin=scale.session * 0.1, wait_timeout=30.0, background_refresh=False,
        busy_backoff=1.0, fault_phase=scale.minutes * 60.0, refused_backoff=30.0,
        mirror=scale.mirror, idle_after=scale.idle_after)
    plan = Plan(config, scale_faults(scale, ttl))
    loop = SimLoop(spin_limit=max(20_000, 40 * scale.customers * scale.route
                                  // max(1, scale.workers)))
    trace = _CountingTrace(loop)
    names = worker_names(scale.workers)
    offsets = {w: 1000.0 * (i + 1) for i, w in enumerate(names)}
    skews: dict[str, float] = {}
    fake = FakeTime(loop, offsets, skews, spin_limit=10**9)
    etcd = EtcdModel(loop, random.Random(f"etcd:{scale.seed}"), trace.add,
                     watch_rng=random.Random(f"watch:{scale.seed}"))
    etcd.fill(_records(scale.customers, scale.session))
    endpoint = LazyEndpoint(loop, random.Random(f"provider:{scale.seed}"), CLIENT_SECRET,
                            trace.add, session_timeout=scale.session, timeout=3.0,
                            customers=scale.customers, session=scale.session)
    log(f"  {scale.mirror}: {scale.workers} workers x {scale.customers:,} customers: "
        f"keyspace filled in {time.perf_counter() - started_wall:.1f}s")
    with _quiet_collection(), patched_time(fake), sfrtr_logs_into(trace):
        world = ScaleWorld(scale, plan, loop, fake, skews, etcd, endpoint, trace)
        main = loop.create_task(world.main())
        try:
            loop.run_until_complete(main)
        except RuntimeError:
            if loop.spin is None:
                world.found.violations.append("stuck: the loop stopped before the end")
        violations = check(world)
        traffic = config.fault_phase
        delivered, committed = world.at_traffic_end
        per_worker = [delivered.get(w.name, 0) / traffic for w in world.workers]
        mirror_end = [len(getattr(w.store, "_mirror", ())) for w in world.workers]
        # Sampled every 10 virtual seconds, and at the end (after the settle phase).
        peaks = [max(world.mirror_peak.get(w.name, 0), end)
                 for w, end in zip(world.workers, mirror_end, strict=True)]
        result = ScaleResult(
            config={"workers": scale.workers, "customers": scale.customers,
                    "mirror": scale.mirror, "active_customers":
                        max(1, int(scale.customers * scale.active)),
                    "calls_per_active_customer_per_s": 1 / scale.period,
                    "route": scale.route, "session_lifetime_s": scale.session,
                    "idle_after_s": scale.idle_after, "lease_ttl_s": ttl,
                    "traffic_s": traffic, "seed": scale.seed,
                    "store_mirror": world.mirror.get("mirror", "namespace")},
            violations=violations,
            redemptions=endpoint.ledger.redemptions,
            reuse=len(endpoint.ledger.reuse),
            requests=world.found.calls,
            customers_used=len(world.used),
            virtual_seconds=loop.time(),
            traffic_seconds=traffic,
            cpu_seconds=time.process_time() - started_cpu,
            wall_seconds=time.perf_counter() - started_wall,
            watch_events_total=sum(w.client.watch_events for w in world.workers),
            watch_events_per_worker_per_s={
                "mean": sum(per_worker) / len(per_worker), "max": max(per_worker)},
            mirror_entries_per_worker={
                "mean": sum(peaks) / len(peaks), "max": max(peaks),
                "end_mean": sum(mirror_end) / len(mirror_end), "end_max": max(mirror_end)},
            etcd_events_committed=committed,
            etcd_events_per_s=committed / traffic,
            round_trips_per_worker=sum(w.client.round_trips for w in world.workers)
            / len(world.workers),
            faults=[str(f) for f in plan.faults])
        loop.close()
        del world, main
    return result


class _CountingTrace(Trace):
    """At scale the trace is not kept (it would hold millions of lines): only the
    last lines, for a failure's context."""

    def __init__(self, loop: SimLoop, keep: int = 2000) -> None:
        super().__init__(loop)
        self.keep = keep

    def add(self, worker: str | None, text: str) -> None:
        super().add(worker, text)
        if len(self.entries) > 2 * self.keep:
            del self.entries[: self.keep]


def _as_dict(r: ScaleResult) -> dict[str, Any]:
    out = dict(vars(r))
    out["violations"] = r.violations[:50]
    out["violation_count"] = len(r.violations)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim.scale")
    parser.add_argument("--workers", type=int, default=None,
                        help="one run of this size (default: the three standard runs)")
    parser.add_argument("--customers", type=int, default=None)
    parser.add_argument("--mirror", choices=["served", "namespace"], default="served")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--active", type=float, default=None,
                        help="share of customers that make calls (default 0.05)")
    parser.add_argument("--idle-after", type=float, default=60.0)
    parser.add_argument("--route", type=int, default=3, help="workers per customer")
    parser.add_argument("--period", type=float, default=20.0,
                        help="mean seconds between two calls of an active customer")
    parser.add_argument("--session", type=float, default=600.0,
                        help="session lifetime, seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None,
                        help=f"where to write the figures (standard runs: {RESULTS})")
    opts = parser.parse_args(argv)
    if opts.workers is not None or opts.customers is not None:
        runs = [ScaleConfig(workers=opts.workers or 100, customers=opts.customers or 100_000,
                            mirror=opts.mirror, minutes=opts.minutes, seed=opts.seed,
                            active=opts.active if opts.active is not None else 0.05,
                            idle_after=opts.idle_after, route=opts.route,
                            period=opts.period, session=opts.session)]
        out = opts.json
    else:
        runs = standard_runs(opts.minutes, opts.seed)
        out = opts.json or RESULTS
    results = []
    for cfg in runs:
        result = run_scale(cfg)
        print(result.summary(), flush=True)
        for v in result.violations[:10]:
            print("    VIOLATION", v)
        results.append(result)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"runs": [_as_dict(r) for r in results]}, indent=2) + "\n")
        print(f"written to {out}")
    return 1 if any(r.violations or r.reuse for r in results) else 0


def standard_runs(minutes: float = 3.0, seed: int = 1) -> list[ScaleConfig]:
    return [
        ScaleConfig(workers=100, customers=100_000, mirror="namespace", minutes=minutes,
                    seed=seed),
        ScaleConfig(workers=100, customers=100_000, mirror="served", minutes=minutes,
                    seed=seed),
        ScaleConfig(workers=1000, customers=1_000_000, mirror="served", minutes=minutes,
                    seed=seed),
    ]


if __name__ == "__main__":
    sys.exit(main())
