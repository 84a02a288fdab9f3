"""N simulated worker processes, their workload, and the fault plan's execution.

Each worker is the real stack: ``TokenManager`` over a real ``EtcdStore``
whose client is the etcd model, and an ``OAuthClient`` whose HTTP exchange is
the token-endpoint model. Every task of a worker runs in a context that
names it, so the loop can pause or kill it.

Besides the end state (``invariants``), the world checks as it goes: a refresh
request leaves a client only while that worker's lock for the customer is in
etcd on its own lease with a whole request's time left; a worker whose watch
has caught up mirrors the keyspace; a ``token()`` started after ``connect()``
returned on the same worker hands out the new grant's session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import random
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from sfrtr.cli import admin
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
from sfrtr.store.etcd_client import prefix_end

from .clock import FakeTime, SimLoop, Spin, in_worker
from .etcd_model import EtcdModel, ModelClient, ModelWatchStream
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


@dataclass(frozen=True)
class Connected:
    """The last ``connect()`` that returned, for one customer."""

    at: float
    worker: str
    family: int


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
        self.removals: dict[str, int] = dict.fromkeys(self.customers, 0)
        """How many times the operator removed the customer's grant (disconnect,
        clear): a connect that began before the latest removal does not make the
        customer connected again (its put may land before the removal's delete)."""
        self.latest_family: dict[str, int] = {}
        """customer -> family id of its last successful connect."""
        self.last_connect: dict[str, Connected] = {}
        self.operator: dict[str, int] = {}
        """customer -> disconnects/clears under way (they delete its lock at will)."""
        self.rng = random.Random(f"world:{seed}")
        self.mirror = self._mirror_options()
        self.workers = [self._worker(i, name)
                        for i, name in enumerate(worker_names(self.cfg.workers))]
        self.stores = {w.name: w.store for w in self.workers}
        self._install_fault_windows()
        self._install_checks()
        self.pauses: list[tuple[str, float, float]] = []
        """(worker, from, until) of every pause, planned or triggered."""
        pause = self.loop.pause

        def record_pause(worker: str, until: float) -> None:
            self.pauses.append((worker, self.loop.time(), until))
            pause(worker, until)
        self.loop.pause = record_pause  # type: ignore[method-assign]
        for w in self.workers:
            self._check_waits(w)

    # -- building -------------------------------------------------------------------

    def _mirror_options(self) -> dict[str, Any]:
        """``mirror=``/``idle_after=`` for the store, if its constructor takes them (the
        plan draws them either way; a store without them mirrors the namespace)."""
        params = inspect.signature(EtcdStore).parameters
        options: dict[str, Any] = {}
        if "mirror" in params:
            options["mirror"] = self.cfg.mirror
        if "idle_after" in params:
            options["idle_after"] = self.cfg.idle_after
        effective = options.get("mirror", "namespace")
        self.trace(None, f"mirror: {effective}"
                         + (f", idle after {self.cfg.idle_after:.0f}s"
                            if effective == "served" else "")
                         + ("" if effective == self.cfg.mirror else
                            f" (the plan drew {self.cfg.mirror}: this store has no such mode)"))
        return options

    def _worker(self, index: int, name: str) -> Worker:
        cfg = self.cfg
        slots = cfg.max_concurrent[index] if index < len(cfg.max_concurrent) else 64
        store = EtcdStore(namespace="sim", lease_ttl=cfg.lease_ttl, **self.mirror)
        client = ModelClient(self.etcd, name)
        store.client = client  # type: ignore[assignment]
        config = OAuthConfig(client_id="3MVGsim", client_secret=Secret(CLIENT_SECRET),
                             timeout=cfg.provider_timeout,
                             connect_timeout=min(1.0, cfg.provider_timeout / 2),
                             instance_policy=InstanceUrlPolicy(), max_concurrent=slots)
        oauth = SimOAuthClient(config, self.endpoint, name)
        options: dict[str, Any] = dict(
            session_lifetime=cfg.session_lifetime, refresh_margin=cfg.refresh_margin,
            background_refresh=cfg.background_refresh, wait_timeout=cfg.wait_timeout,
            recovery=cfg.recovery, busy_backoff=cfg.busy_backoff,
            refused_backoff=cfg.refused_backoff)
        fields = {f.name for f in dataclasses.fields(RefreshPolicy)}
        if "reuse_window" in fields:
            options["reuse_window"] = cfg.reuse_window  # the policy learnt the window
        for name_ in ("acquire_spread", "handoff", "refresh_stagger"):
            if name_ in fields:
                options[name_] = getattr(cfg, name_)
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
        cuts = [(f.target, f.at, f.at + f.span) for f in faults if f.kind == "partition"]
        e.cut = lambda worker, now: any(w == worker and a <= now < b for w, a, b in cuts)
        e.acquire_lost = _window(faults, "acquire_lost")
        refusals = [(f.target, f.at, f.at + f.span) for f in faults if f.kind == "api_refused"]
        t.api_refused = lambda customer, now: any(c == customer and a <= now < b
                                                  for c, a, b in refusals)
        t.invalid = _window(faults, "token_invalid")
        t.reauth_race = _window(faults, "reauth_race")
        t.pause_rotated = _window(faults, "pause_rotated")
        t.drop_after = _window(faults, "token_drop")
        t.slow = _window(faults, "token_slow")
        t.error_5xx = _window(faults, "token_5xx")
        t.error_after = _window(faults, "token_gateway")
        t.reset_before = _window(faults, "token_reset")
        t.refused = _window(faults, "token_refused")
        t.introspect_error = _window(faults, "introspect_error")

    def _install_checks(self) -> None:
        hooks = self.endpoint.hooks
        hooks.sent = self._check_lock_on_send
        hooks.accepted = lambda worker, customer: self._apply(
            Fault(self.loop.time(), "reauth", customer))
        hooks.rotated = self._pause_rotated
        self.etcd.on_caught_up = self._check_mirror_live
        self.etcd.on_stream_caught_up = self._check_served_live

    def _pause_rotated(self, worker: str, customer: str) -> None:
        """Stop the worker longer than its lease and the recovery grace, if that ends
        within the fault phase (the settle phase is fault-free)."""
        span = self.cfg.lease_ttl + self.cfg.recovery_grace() + 5.0
        now = self.loop.time()
        if worker in self.loop.killed or now + span >= self.cfg.fault_phase:
            return
        self.trace(worker, f"FAULT paused for {span:.1f}s right after its token for "
                           f"{customer} was rotated")
        self.loop.pause(worker, now + span)

    def _violation(self, text: str) -> None:
        if text not in self.found.violations:
            self.found.violations.append(text)

    def _check_lock_on_send(self, worker: str, refresh_token: str) -> None:
        """A refresh request may leave a worker only under that worker's lock, on a
        lease with at least one whole request's time left (else another worker can
        take the customer over while the request is still being answered)."""
        family = self.endpoint.family_of(refresh_token)
        if family is None:
            return
        customer, now = family.customer, self.loop.time()
        if self.operator.get(customer):
            return  # a disconnect or clear deletes the customer's keys, lock included
        lock = self.etcd.keys.get(b"sim/lock/" + quote(customer, safe="").encode())
        fp = fingerprint(refresh_token)
        if lock is None and self._grant_replaced(customer, family.family_id):
            # A re-authorization's put releases the lock by design and fences out a
            # refresh of the old grant: its token cannot be reused within the new
            # grant, and what it returns goes to a rescue no one adopts (the grant id
            # differs). Another process's put can land between an acquire and its
            # send; only a round trip before every send could see it.
            return
        if lock is None:
            self._violation(f"lease: {worker} sent refresh {fp} of {customer} at t={now:.3f} "
                            "without its lock in etcd")
            return
        owner = self.etcd.owners.get(lock.lease, "")
        left = self.etcd.leases.get(lock.lease, now) - now
        # The worker's estimate of its lease never exceeds etcd's deadline (it is timed
        # from the request), and it sends only with a request's time left beyond its
        # lease margin: so etcd's deadline must leave both.
        need = self.cfg.exchange_limit() + self.workers[0].manager.policy.lease_margin
        if owner != worker:
            self._violation(f"lease: {worker} sent refresh {fp} of {customer} at t={now:.3f} "
                            f"while the lock is on a lease of {owner or 'nobody'}")
        elif left < need - 1e-6:
            self._violation(f"lease: {worker} sent refresh {fp} of {customer} at t={now:.3f} "
                            f"with {left:.2f}s left on its lock's lease (a request takes "
                            f"up to {self.cfg.exchange_limit():.2f}s, plus the lease margin)")

    #: Kinds of fault that can legitimately hold a worker's watch events back.
    _WATCH_FAULTS = frozenset({"pause", "kill", "etcd_down", "etcd_lost", "etcd_dup",
                               "watch_lag", "watch_break", "compact", "partition",
                               "acquire_lost", "pause_rotated"})
    #: How long after a change a waiter must have woken: the watch lag, a created
    #: reply (up to 0.55 s) and a served customer's load, with room to spare.
    WAKE_SLACK = 2.0

    def _check_waits(self, w: Worker) -> None:
        """A waiter must wake for a change of its customer made after the state it
        saw (the ``wait_for_change`` contract, invariant 5): a wait that times out
        although etcd committed such a change well before, with no fault that could
        hold the worker's watch back, slept through it (the served mirror's split
        record/lock replies once did exactly that)."""
        store = w.store
        original = store.wait_for_change

        async def wait_for_change(customer: str, after: int, timeout: float) -> Any:
            result = await original(customer, after, timeout)
            if result is None and w.name not in self.loop.killed:
                self._judge_wait(w.name, customer, after, self.loop.time())
            return result
        store.wait_for_change = wait_for_change  # type: ignore[method-assign]

    @staticmethod
    def _lingers(fault: Fault) -> float:
        """How long after its start a fault can still hold a worker's watch events
        back: its span, plus what drains after it (a lagged stream delivers in order,
        so events queued behind the lag arrive up to half the span late; a broken
        stream is re-made and its watchers re-created)."""
        span = max(fault.span, 0.0)
        return span + (span / 2 if fault.kind == "watch_lag" else 0.0) + 5.0

    def _judge_wait(self, worker: str, customer: str, after: int, ended: float) -> None:
        etcd = self.etcd
        key = quote(customer, safe="").encode()
        rescues = b"sim/rescue/" + key + b"/"
        revisions = [e.kv.mod_revision
                     for k, end in ((b"sim/tok/" + key, b""), (b"sim/lock/" + key, b""),
                                    (rescues, prefix_end(rescues)))
                     for e in etcd.events_since(k, end, after + 1)]
        if not revisions:
            return
        first = min(revisions)
        changed = etcd.commit_at.get(first)
        if changed is None or changed > ended - self.WAKE_SLACK:
            return
        since = changed - 1.0
        if any(f.kind in self._WATCH_FAULTS and f.at < ended and
               (f.at + self._lingers(f) > since or f.kind in ("kill", "compact"))
               for f in self.plan.faults):
            return
        if any(p_worker == worker and start < ended and until > since
               for p_worker, start, until in self.pauses):
            return
        self._violation(f"wake: {worker} waited on {customer} past stamp {after} until "
                        f"t={ended:.3f} and timed out, though etcd changed it at rev "
                        f"{first} (t={changed:.3f}) with no fault holding its watch back")

    def _grant_replaced(self, customer: str, family_id: int) -> bool:
        """Whether etcd now stores a newer grant of ``customer`` than ``family_id``."""
        raw = self.etcd.value(b"sim/tok/" + quote(customer, safe="").encode())
        if raw is None:
            return False
        stored = self.endpoint.family_of(orjson.loads(raw).get("refresh_token", ""))
        return stored is not None and stored.family_id > family_id

    def _check_mirror_live(self, worker: str, revision: int) -> None:
        """A worker whose namespace watch delivered everything up to the store's
        revision mirrors every customer it knows as etcd holds it."""
        etcd = self.etcd
        if revision != etcd.revision or worker in self.loop.killed:
            return
        mirror = getattr(self.stores[worker], "_mirror", None)
        if not isinstance(mirror, dict):
            return
        for customer, m in self._entries_to_check(mirror):
            if getattr(m, "observed", 0) > revision:
                continue  # a direct read or own write newer than the watch: judged later
            self._compare_entry(worker, customer, m, f"its watch caught up at rev {revision}",
                                rescues=True)

    def _check_served_live(self, worker: str, stream: ModelWatchStream) -> None:
        """A worker whose watch stream delivered everything it owes (nothing pending)
        mirrors, as etcd holds them, the customers it claims to hold whose record and
        lock keys are watched on that stream by watchers the server created and the
        worker has not asked to remove (a watcher being created or removed leaves its
        customer unjudged: the mirror may rightly not follow it yet, or any more)."""
        if worker in self.loop.killed:
            return
        mirror = getattr(self.stores[worker], "_mirror", None)
        if not isinstance(mirror, dict):
            return
        settled, unsettled = stream.settled_keys()
        by_key = stream.settled_watchers()
        # Which customer the store means each watch id for (its own bookkeeping, when
        # it shows it): a watcher the store already let go, or one it has queued but
        # not sent yet, must not vouch for the customer.
        owners = self._watch_owners(self.stores[worker])

        def watched(key: bytes, customer: str) -> bool:
            if key not in settled or key in unsettled:
                return False
            return owners is None or any(owners.get(i) == customer for i in by_key[key])

        for customer, m in self._entries_to_check(mirror):
            key = quote(customer, safe="").encode()
            if not (watched(b"sim/tok/" + key, customer) and
                    watched(b"sim/lock/" + key, customer)):
                continue
            self._compare_entry(worker, customer, m,
                                f"its watch stream caught up at rev {self.etcd.revision}",
                                rescues=watched(b"sim/rescue/" + key + b"/", customer))

    @staticmethod
    def _watch_owners(store: EtcdStore) -> dict[int, str] | None:
        """watch id -> customer, from the store's table of the watchers it keeps
        (``_watchers``: id -> [customer, resume revision]), if it has one."""
        table = getattr(store, "_watchers", None)
        if not isinstance(table, dict):
            return None
        return {i: str(v[0]) for i, v in table.items() if isinstance(v, list | tuple) and v}

    def _entries_to_check(self, mirror: dict[str, Any]) -> list[tuple[str, Any]]:
        """The mirror entries a live check judges (all of them, here)."""
        return list(mirror.items())

    def _compare_entry(self, worker: str, customer: str, m: Any, when: str,
                       rescues: bool) -> None:
        """One mirror entry against etcd: the record's version (0: no record; an entry
        may hold a version without the body), the lock, and the rescue fences."""
        etcd = self.etcd
        key = quote(customer, safe="").encode()
        tok = etcd.keys.get(b"sim/tok/" + key)
        truth = (tok.mod_revision if tok else 0, b"sim/lock/" + key in etcd.keys)
        seen = (getattr(m, "version", 0), bool(getattr(m, "locked", False)))
        if seen != truth:
            self._violation(f"mirror-live: {worker} sees {customer} at (version, locked)="
                            f"{seen} with {when}; etcd holds {truth}")
        if rescues and hasattr(m, "rescues"):
            prefix = b"sim/rescue/" + key + b"/"
            fences = {int(kv.key.rpartition(b"/")[2])
                      for kv in etcd.range(prefix, prefix[:-1] + b"0", keys_only=True)}
            held = set(m.rescues or ())
            if held != fences:
                self._violation(f"mirror-live: {worker} holds rescue fences {sorted(held)} of "
                                f"{customer} with {when}; etcd holds {sorted(fences)}")

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
        await self._quiesce(bound)
        # A lagging watch still owes events sent before the faults ended: the
        # mirrors may only be compared once the model has delivered them.
        owed = max((w.last_at for w in (*self.etcd.watchers, *self.etcd.streams)),
                   default=0.0)
        await asyncio.sleep(max(0.0, owed - self.loop.time()) + 0.1)
        checks = [self.spawn(w.name, self._converged(w)) for w in self.alive()]
        await asyncio.wait(checks, timeout=30.0)
        for error in self.etcd.stream_errors:
            self._violation(f"watch: {error}")

    async def _quiesce(self, bound: float) -> None:
        """Wait for the workers' refreshes in flight, and for the background settles
        and retries they scheduled (an indeterminate outcome is settled once its grace
        passed, a lost acquire is reclaimed, even if no caller asks again), with the
        refreshes those start."""
        for _ in range(3):
            idle = [self.spawn(w.name, w.manager.wait_idle()) for w in self.alive()
                    if w.name not in self.loop.paused]
            if idle:
                await asyncio.wait(idle, timeout=bound)
            managers = [w.manager for w in self.alive()]
            due = [t.when() for m in managers
                   for t in (*getattr(m, "_settlers", {}).values(),
                             *getattr(m, "_retries", {}).values())
                   if not t.cancelled()]
            due = [when for when in due if when >= self.loop.time()]
            if not due:
                return
            await asyncio.sleep(max(due) - self.loop.time() + 0.01)

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
        removals = self.removals[customer]
        try:
            grant = await w.oauth.exchange_code(customer, redirect_uri="https://app.example/cb",
                                                code_verifier="v" * 43)
            assert grant.refresh_token is not None
            family = self.endpoint.family_of(grant.refresh_token.reveal())
            await w.manager.connect(customer, grant)
        except SfrtrError as exc:
            self.trace(w.name, f"connect {customer} failed: {type(exc).__name__}")
            return
        if self.removals[customer] != removals:
            self.trace(w.name, f"connect {customer} overtaken by a removal")
            return
        self.connected[customer] = True
        if family is not None:
            self.latest_family[customer] = family.family_id
            self.last_connect[customer] = Connected(self.loop.time(), w.name, family.family_id)
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
            if not self.endpoint.api_valid(token):
                self.trace(w.name, f"api 401 for {customer} with {fingerprint(token)}")
                creds = await w.manager.refresh(customer, stale=token)
                fresh = creds.access_token
                self.trace(w.name, f"refresh({customer}) -> {fingerprint(fresh)}")
                if not self.endpoint.api_valid(fresh):
                    # As sfrtr.client does: a refresh cannot cure a 401 of a fresh session.
                    self.trace(w.name, f"api 401 for {customer} with the fresh "
                                       f"{fingerprint(fresh)}")
                    raise await w.manager.reject_session(customer, fresh, "INVALID_SESSION_ID")
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
        connected = self.last_connect.get(customer)
        token = await self._token_now(w, customer)
        if token is not None and connected is not None and connected.worker == w.name and \
                self.last_connect.get(customer) is connected:
            found = self.endpoint.access.get(token)
            if found is not None and found[0].family_id < connected.family:
                self._violation(
                    f"stale session: {w.name} token({customer}) -> {fingerprint(token)} of "
                    f"family {found[0].family_id}, started after its connect() of family "
                    f"{connected.family} returned at t={connected.at:.3f}")
        return token

    async def _token_now(self, w: Worker, customer: str) -> str | None:
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
        elif f.kind == "partition":
            self.etcd.break_watches(f.target, "UNAVAILABLE")
        elif f.kind == "watch_break":
            if any(st.worker == f.target for st in self.etcd.streams) and \
                    self.etcd.watch_rng.random() < 0.5:
                # A multiplexed stream: the server cancels some of its watchers.
                n = self.etcd.cancel_stream_watchers(f.target, 0.5, "canceled by the server")
                self.trace(None, f"etcd: {n} watchers of {f.target} cancelled")
            else:
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
        self.operator[customer] = self.operator.get(customer, 0) + 1
        try:
            await self._disconnect_reconnect(w, customer)
        finally:
            self.operator[customer] -= 1

    async def _disconnect_reconnect(self, w: Worker, customer: str) -> None:
        self.connected[customer] = False
        self.removals[customer] += 1
        try:
            await w.manager.disconnect(customer)
        except SfrtrError as exc:
            self.trace(w.name, f"disconnect {customer}: {type(exc).__name__}")
        await asyncio.sleep(5.0)  # the customer comes back and authorizes again
        await self._connect(w, customer)

    async def _clear(self, w: Worker, customer: str) -> None:
        self.operator[customer] = self.operator.get(customer, 0) + 1
        try:
            await self._clear_reconnect(w, customer)
        finally:
            self.operator[customer] -= 1

    async def _clear_reconnect(self, w: Worker, customer: str) -> None:
        try:
            cleared = await admin.clear(w.store, customer)
        except SfrtrError as exc:
            self.trace(w.name, f"clear {customer}: {type(exc).__name__}")
            return
        self.trace(w.name, f"clear {customer}: {cleared}")
        if cleared is not None:
            self.connected[customer] = False
            self.removals[customer] += 1
            await asyncio.sleep(2.0)  # the operator's re-authorization link, clicked
            await self._connect(w, customer)


__all__ = ["CLIENT_SECRET", "Findings", "Spin", "Worker", "World"]
