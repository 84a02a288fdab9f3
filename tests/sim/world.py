"""N simulated worker processes, their workload, and the fault plan's execution.

Each worker is the real stack: ``TokenManager`` over a real ``EtcdStore``
whose client is the etcd model, and an ``OAuthClient`` whose HTTP exchange is
the token-endpoint model. Every task of a worker runs in a context that
names it, so the loop can pause or kill it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from sfrtr import admin
from sfrtr.errors import (
    NotConnected,
    ReauthorizationRequired,
    SfrtrError,
)
from sfrtr.manager import TokenManager
from sfrtr.oauth.client import OAuthConfig
from sfrtr.oauth.instance_url import InstanceUrlPolicy
from sfrtr.policy import RefreshPolicy
from sfrtr.secret import Secret, fingerprint
from sfrtr.store.etcd import EtcdStore

from .clock import FakeTime, SimLoop, Spin, in_worker
from .etcd_model import EtcdModel, ModelClient
from .plan import Fault, Plan, customer_names, worker_names
from .token_model import SimOAuthClient, TokenEndpoint
from .trace import Trace

CLIENT_SECRET = "sim-client-secret"


@dataclass
class Worker:
    name: str
    manager: TokenManager
    store: EtcdStore
    client: ModelClient
    oauth: SimOAuthClient


@dataclass
class Findings:
    """What the run saw as it went (the end-state checks are in ``invariants``)."""

    violations: list[str] = field(default_factory=list)
    settled: dict[tuple[str, str], str] = field(default_factory=dict)
    """(worker, customer) -> how the settle phase ended for it."""
    calls: int = 0


def _window(faults: list[Fault], kind: str) -> Callable[[float], float]:
    spans = [(f.at, f.at + f.span, f.p) for f in faults if f.kind == kind]
    if not spans:
        return lambda now: 0.0
    return lambda now: max((p for a, b, p in spans if a <= now < b), default=0.0)


class World:
    def __init__(self, seed: int, plan: Plan, loop: SimLoop, fake: FakeTime,
                 skews: dict[str, float], etcd: EtcdModel, endpoint: TokenEndpoint,
                 trace: Trace) -> None:
        self.seed = seed
        self.plan = plan
        self.cfg = plan.config
        self.loop = loop
        self.fake = fake
        self.skews = skews
        self.etcd = etcd
        self.endpoint = endpoint
        self.trace = trace.add
        self.found = Findings()
        self.customers = customer_names(self.cfg.customers)
        self.connected: dict[str, bool] = dict.fromkeys(self.customers, False)
        self.latest_family: dict[str, int] = {}
        """customer -> family id of its last successful connect."""
        self.rng = random.Random(f"world:{seed}")
        self.workers = [self._worker(name) for name in worker_names(self.cfg.workers)]
        self._install_fault_windows()

    # -- building -------------------------------------------------------------------

    def _worker(self, name: str) -> Worker:
        cfg = self.cfg
        store = EtcdStore(namespace="sim", lease_ttl=cfg.lease_ttl)
        client = ModelClient(self.etcd, name)
        store.client = client  # type: ignore[assignment]
        config = OAuthConfig(client_id="3MVGsim", client_secret=Secret(CLIENT_SECRET),
                             timeout=cfg.provider_timeout,
                             connect_timeout=min(1.0, cfg.provider_timeout / 2),
                             instance_policy=InstanceUrlPolicy())
        oauth = SimOAuthClient(config, self.endpoint, name)
        options: dict[str, Any] = dict(
            session_lifetime=cfg.session_lifetime, refresh_margin=cfg.refresh_margin,
            background_refresh=cfg.background_refresh, wait_timeout=cfg.wait_timeout,
            recovery=cfg.recovery, busy_backoff=cfg.busy_backoff)
        if "reuse_window" in {f.name for f in dataclasses.fields(RefreshPolicy)}:
            options["reuse_window"] = cfg.reuse_window  # the policy learnt the window
        policy = RefreshPolicy(**options)
        manager = TokenManager(oauth, store, policy, worker_id=name)
        return Worker(name, manager, store, client, oauth)

    def _install_fault_windows(self) -> None:
        faults = self.plan.faults
        e, t = self.etcd.faults, self.endpoint.faults
        down = _window(faults, "etcd_down")
        e.down = lambda now: down(now) > 0
        e.lost = _window(faults, "etcd_lost")
        e.dup = _window(faults, "etcd_dup")
        lags = [f for f in faults if f.kind == "watch_lag"]

        def lag(worker: str, now: float) -> float:
            extra = max((f.span / 2 for f in lags
                         if f.target == worker and f.at <= now < f.at + f.span), default=0.0)
            return 0.002 + extra
        e.lag = lag
        t.drop_after = _window(faults, "token_drop")
        t.slow = _window(faults, "token_slow")
        t.error_5xx = _window(faults, "token_5xx")
        t.error_after = _window(faults, "token_gateway")
        t.reset_before = _window(faults, "token_reset")
        t.refused = _window(faults, "token_refused")
        t.introspect_error = _window(faults, "introspect_error")

    # -- running ----------------------------------------------------------------------

    def spawn(self, worker: str | None, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self.loop.create_task(coro, context=in_worker(worker))

    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.name not in self.loop.killed]

    async def main(self) -> None:
        cfg = self.cfg
        first = self.workers[0]
        await self.spawn(first.name, self._connect_all(first))
        for w in self.workers:
            for i in range(cfg.callers):
                self.spawn(w.name, self._caller(w, i))
        self.spawn(None, self._execute_faults())
        await asyncio.sleep(max(0.0, cfg.fault_phase - self.loop.time()))
        self.trace(None, "faults over: settle phase")
        bound = cfg.settle_bound()
        settles = {self.spawn(w.name, self._settle(w, c, self.loop.time() + bound)): (w, c)
                   for w in self.alive() for c in self.customers if self.connected[c]}
        if settles:
            await asyncio.wait(settles, timeout=bound + 1.0)
        for task, (w, c) in settles.items():
            if not task.done():
                self.found.violations.append(
                    f"liveness: {c} did not settle on {w.name} within {bound:.0f}s "
                    "after the faults stopped")
        await asyncio.sleep(cfg.provider_timeout + 3.0)  # let commits in flight land
        # Refreshes the settle calls started (a session that expired meanwhile) end
        # before the end state is judged: an in-flight refresh is not "unsettled".
        idle = [self.spawn(w.name, w.manager.wait_idle()) for w in self.alive()
                if w.name not in self.loop.paused]
        if idle:
            await asyncio.wait(idle, timeout=bound)
        # A lagging watch still owes events sent before the faults ended: the
        # mirrors may only be compared once the model has delivered them.
        owed = max((w.last_at for w in self.etcd.watchers), default=0.0)
        await asyncio.sleep(max(0.0, owed - self.loop.time()) + 0.1)
        checks = [self.spawn(w.name, self._converged(w)) for w in self.alive()]
        await asyncio.wait(checks, timeout=30.0)

    async def _converged(self, w: Worker) -> None:
        """Once quiet, a worker's view (its watch-fed mirror) must match etcd's."""
        for c in self.customers:
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

    async def _connect_all(self, w: Worker) -> None:
        for c in self.customers:
            await self._connect(w, c)

    async def _connect(self, w: Worker, customer: str) -> None:
        try:
            grant = await w.oauth.exchange_code(customer, redirect_uri="https://app.example/cb",
                                                code_verifier="v" * 43)
            assert grant.refresh_token is not None
            family = self.endpoint.family_of(grant.refresh_token.reveal())
            await w.manager.connect(customer, grant)
        except SfrtrError as exc:
            self.trace(w.name, f"connect {customer} failed: {type(exc).__name__}")
            return
        self.connected[customer] = True
        if family is not None:
            self.latest_family[customer] = family.family_id
        self.trace(w.name, f"connect {customer} -> family "
                           f"{family.family_id if family else '?'}")

    # -- the workload ---------------------------------------------------------------------

    async def _caller(self, w: Worker, index: int) -> None:
        rng = random.Random(f"caller:{self.seed}:{w.name}:{index}")
        cfg = self.cfg
        while self.loop.time() < cfg.fault_phase:
            await asyncio.sleep(rng.expovariate(1.0 / cfg.think))
            if self.loop.time() >= cfg.fault_phase:
                break  # the workload ends with the fault phase: the settle phase checks
            customer = rng.choice(self.customers)
            if rng.random() < cfg.cancel_p:
                try:
                    await asyncio.wait_for(self._call(w, customer), rng.uniform(0.0, 3.0))
                except TimeoutError:
                    self.trace(w.name, f"caller cancelled its call for {customer}")
            else:
                await self._call(w, customer)

    async def _call(self, w: Worker, customer: str) -> None:
        """One API call: get a token; on a 401 from the provider, ask for a newer one."""
        self.found.calls += 1
        try:
            token = await self._token(w, customer)
            if token is None:
                return
            if not self.endpoint.access_valid(token):
                self.trace(w.name, f"api 401 for {customer} with {fingerprint(token)}")
                creds = await w.manager.refresh(customer, stale=token)
                self.trace(w.name, f"refresh({customer}) -> {fingerprint(creds.access_token)}")
        except SfrtrError as exc:
            self.trace(w.name, f"call {customer}: {type(exc).__name__}: {exc}")
        except Exception as exc:  # anything else is a bug in the code under test
            self._crash(w, customer, exc)

    def _crash(self, w: Worker, customer: str, exc: BaseException) -> None:
        where = traceback.extract_tb(exc.__traceback__)[-3:]
        frames = "; ".join(f"{f.filename.rpartition('/')[2]}:{f.lineno} {f.name}" for f in where)
        self.found.violations.append(
            f"crash: {w.name} call for {customer} raised {type(exc).__name__}: {exc} "
            f"[{frames}]")

    def _fresh(self, w: Worker, customer: str) -> bool:
        cache = getattr(w.manager, "_cache", None)
        entry = cache.get(customer) if isinstance(cache, dict) else None
        refresh_at = getattr(entry, "refresh_at", None)
        return refresh_at is not None and self.fake.monotonic() < refresh_at

    async def _token(self, w: Worker, customer: str) -> str | None:
        if not self._fresh(w, customer):
            token = await w.manager.token(customer)
            self.trace(w.name, f"token({customer}) -> {fingerprint(token)}")
            return token
        # The hot path must finish without suspending and without a round trip.
        before = (w.client.round_trips, w.oauth.calls)
        coro = w.manager.token(customer)
        try:
            coro.send(None)
        except StopIteration as stop:
            token = stop.value
            assert isinstance(token, str)
        else:
            coro.close()
            self.found.violations.append(
                f"hot path: {w.name} token({customer}) suspended with a fresh cached token")
            return None
        if (w.client.round_trips, w.oauth.calls) != before:
            self.found.violations.append(
                f"hot path: {w.name} token({customer}) did I/O with a fresh cached token")
        return token

    async def _settle(self, w: Worker, customer: str, deadline: float) -> None:
        while True:
            try:
                token = await w.manager.token(customer)
                if not self.endpoint.access_valid(token):
                    await w.manager.refresh(customer, stale=token)
                self.found.settled[(w.name, customer)] = "valid"
                return
            except (ReauthorizationRequired, NotConnected) as exc:
                self.found.settled[(w.name, customer)] = type(exc).__name__
                self.trace(w.name, f"settle {customer}: {type(exc).__name__}")
                return
            except SfrtrError as exc:
                self.trace(w.name, f"settle {customer}: {type(exc).__name__}, retrying")
            except Exception as exc:
                self._crash(w, customer, exc)
                return
            if self.loop.time() > deadline:
                return
            await asyncio.sleep(1.0)

    # -- the fault plan -----------------------------------------------------------------------

    async def _execute_faults(self) -> None:
        for f in self.plan.faults:
            await asyncio.sleep(max(0.0, f.at - self.loop.time()))
            self.trace(None, f"FAULT {f}")
            self._apply(f)

    def _pick_live(self) -> Worker:
        live = [w for w in self.alive() if w.name not in self.loop.paused]
        return self.rng.choice(live or self.alive())

    def _apply(self, f: Fault) -> None:
        now = self.loop.time()
        if f.kind == "pause":
            self.loop.pause(f.target, now + f.span)
        elif f.kind == "kill":
            self.loop.kill(f.target)
            self.etcd.break_watches(f.target, "connection closed")
        elif f.kind == "etcd_down":
            self.etcd.break_watches(None, "UNAVAILABLE")
        elif f.kind == "watch_break":
            self.etcd.break_watches(f.target, "canceled by the server")
        elif f.kind == "compact":
            self.etcd.compact(self.etcd.revision)
        elif f.kind == "skew_jump":
            self.skews[f.target] = self.skews.get(f.target, 0.0) + f.span
        elif f.kind == "reauth":
            w = self._pick_live()
            self.spawn(w.name, self._connect(w, f.target))
        elif f.kind == "disconnect":
            w = self._pick_live()
            self.spawn(w.name, self._disconnect(w, f.target))
        elif f.kind == "clear":
            w = self._pick_live()
            self.spawn(w.name, self._clear(w, f.target))

    async def _disconnect(self, w: Worker, customer: str) -> None:
        self.connected[customer] = False
        try:
            await w.manager.disconnect(customer)
        except SfrtrError as exc:
            self.trace(w.name, f"disconnect {customer}: {type(exc).__name__}")
        await asyncio.sleep(5.0)  # the customer comes back and authorizes again
        await self._connect(w, customer)

    async def _clear(self, w: Worker, customer: str) -> None:
        try:
            cleared = await admin.clear(w.store, customer)
        except SfrtrError as exc:
            self.trace(w.name, f"clear {customer}: {type(exc).__name__}")
            return
        self.trace(w.name, f"clear {customer}: {cleared}")
        if cleared is not None:
            self.connected[customer] = False
            await asyncio.sleep(2.0)  # the operator's re-authorization link, clicked
            await self._connect(w, customer)


__all__ = ["CLIENT_SECRET", "Findings", "Spin", "Worker", "World"]
