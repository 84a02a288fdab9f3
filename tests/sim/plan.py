"""What one schedule runs: its configuration, workload and fault plan, drawn from a seed.

A plan is a plain list of :class:`Fault` values, so a failing plan can be
printed, shrunk (faults removed one by one while the failure persists) and
replayed with the same seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from sfrtr.policy import RecoveryMode

FAULT_KINDS = (
    "pause", "kill", "etcd_down", "etcd_lost", "etcd_dup", "watch_lag", "watch_break",
    "compact", "token_drop", "token_slow", "token_5xx", "token_gateway", "token_reset",
    "token_refused", "introspect_error", "reauth", "disconnect", "clear", "skew_jump",
)

#: Fault kinds drawn from a second stream (``plan-extra:<seed>``), so that adding them
#: left every plan of :data:`FAULT_KINDS` (and the regression seeds) as it was.
#: ``partition``: one worker cannot reach etcd; ``slow_wave``: token answers are slow
#: while the connected customers' sessions come due together, and one worker is cut
#: off from etcd meanwhile; ``token_invalid``: a 2xx answer the client refuses (bad
#: signature or unknown instance URL); ``reauth_race``: a customer re-authorizes just
#: as the provider accepted a refresh of its grant; ``pause_rotated``: the worker whose
#: token was just rotated stops for longer than its lease and the recovery grace;
#: ``api_refused``: a customer's API calls get 401 whatever its token;
#: ``acquire_lost``: the answer of an acquire over a refreshing or indeterminate
#: record is lost.
EXTRA_KINDS = (
    "partition", "slow_wave", "token_invalid", "reauth_race", "pause_rotated",
    "api_refused", "acquire_lost",
)
#: Of those, the kinds that strike at a rare instant (a refresh accepted, a token
#: rotated, an acquire over a recovering record), with a small chance each time:
#: each is drawn, independently, for the whole fault phase of half the plans (and
#: so is a ``slow_wave``); the other kinds are windows drawn like the first stream's.
ANCHORED_KINDS = {"reauth_race": 0.05, "pause_rotated": 0.05, "acquire_lost": 0.5}


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    target: str = ""
    """A worker or a customer, depending on the kind."""
    span: float = 0.0
    """How long the fault lasts, seconds of virtual time."""
    p: float = 1.0
    """For probabilistic faults: the chance that one request is hit."""

    def __str__(self) -> str:
        extra = f" {self.target}" if self.target else ""
        span = f" for {self.span:.2f}s" if self.span else ""
        p = f" p={self.p:.2f}" if self.p < 1.0 else ""
        return f"t={self.at:7.2f} {self.kind}{extra}{span}{p}"


@dataclass(frozen=True)
class Config:
    workers: int
    customers: int
    callers: int
    """Caller coroutines per worker."""
    think: float
    """Mean pause between two calls of one caller, seconds."""
    cancel_p: float
    """Chance that a call is cancelled by its caller at a random await."""
    recovery: RecoveryMode
    reuse_window: float
    provider_timeout: float
    lease_ttl: int
    session_lifetime: float
    provider_session: float
    """The provider's real session timeout: shorter than the estimate yields 401s."""
    refresh_margin: float
    wait_timeout: float
    background_refresh: bool
    busy_backoff: float
    fault_phase: float
    """Faults happen in [0, fault_phase); then the workload settles."""
    skews: tuple[float, ...] = ()
    max_concurrent: tuple[int, ...] = ()
    """Per worker: the OAuth client's cap on token requests in flight (empty: 64)."""
    refused_backoff: float = 300.0
    """``RefreshPolicy.refused_backoff``: shorter than the settle bound, so a suspended
    grant comes back within it."""
    mirror: str = "namespace"
    """``EtcdStore(mirror=...)``: ``namespace`` (load and watch the whole namespace) or
    ``served`` (read each customer on first use, watch its keys, drop it when idle)."""
    idle_after: float = 600.0
    """``EtcdStore(idle_after=...)``: a served customer unused this long is dropped."""
    acquire_spread: float = 0.0
    """``RefreshPolicy.acquire_spread``: a random pause before an acquire, then a look."""
    handoff: float = 0.2
    """``RefreshPolicy.handoff``: a 401-driven refresh waits this long for the process
    first in line for the customer (the member list) before acquiring itself."""
    refresh_stagger: float = 0.5
    """``RefreshPolicy.refresh_stagger``: later in line, later to refresh ahead."""

    def exchange_limit(self) -> float:
        """The client's longest token request, graces included (``OAuthConfig``'s)."""
        return self.provider_timeout + 2.25

    def recovery_grace(self) -> float:
        return self.lease_ttl + self.provider_timeout + 2.0

    def settle_bound(self) -> float:
        """How long after the last fault every customer must have settled.

        A dead worker's lease runs out (TTL), its request may still be answered
        (provider timeout plus the answer graces), a recovery waits its grace
        (TTL + timeout + margin), a waiter gives up after ``wait_timeout``; and
        the retried store writes back off up to 2 s. Twice that, to be fair.
        """
        grace = self.recovery_grace()
        one = self.lease_ttl + self.provider_timeout + 2.25 + grace + self.wait_timeout + 4.0
        return 2 * one


@dataclass
class Plan:
    config: Config
    faults: list[Fault] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"config: {self.config}"]
        lines += [f"  {f}" for f in self.faults] or ["  (no faults)"]
        return "\n".join(lines)


def worker_names(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


def customer_names(n: int) -> list[str]:
    return [f"org{i}" for i in range(n)]


def draw_config(rng: random.Random) -> Config:
    recovery: RecoveryMode = rng.choice(
        ["fail_closed", "fail_closed", "introspect", "introspect", "reuse_window"])
    timeout = rng.choice([2.0, 3.0, 5.0])
    # The manager refuses a TTL whose two thirds do not cover a whole token request
    # (timeout plus answer graces, 2.25 s) plus its lease margin (2 s).
    needed = timeout + 2.25 + 2.0
    ttl = int(1.5 * needed) + 1 + rng.choice([0, 0, 2, 5, 10])
    lifetime = rng.choice([60.0, 120.0, 300.0])
    workers = rng.choice([2, 3, 3, 4])
    return Config(
        workers=workers, customers=rng.choice([1, 2, 3, 5]), callers=rng.choice([1, 2, 4]),
        think=rng.choice([0.5, 2.0, 5.0]), cancel_p=rng.choice([0.0, 0.0, 0.05, 0.2]),
        recovery=recovery,
        # Some windows are shorter than a takeover can come (lease TTL + request):
        # a manager should refuse those at construction rather than recover too late.
        reuse_window=rng.choice([10.0, ttl + needed + 5.0, ttl + needed + 30.0, 120.0])
        if recovery == "reuse_window" else 0.0,
        provider_timeout=timeout, lease_ttl=ttl, session_lifetime=lifetime,
        provider_session=lifetime * rng.choice([1.0, 1.0, 0.5]),
        refresh_margin=lifetime * 0.2, wait_timeout=rng.choice([20.0, 60.0]),
        background_refresh=rng.random() < 0.3, busy_backoff=1.0,
        fault_phase=rng.choice([60.0, 120.0, 240.0]),
        skews=tuple(rng.choice([0.0, 0.0, -3.0, 2.0, 30.0]) for _ in range(workers)))


def draw_faults(rng: random.Random, config: Config) -> list[Fault]:
    workers = worker_names(config.workers)
    customers = customer_names(config.customers)
    end = config.fault_phase
    faults: list[Fault] = []
    for _ in range(rng.choice([0, 1, 2, 3, 4, 6, 8])):
        kind = rng.choice(FAULT_KINDS)
        at = round(rng.uniform(1.0, end * 0.9), 3)
        room = max(0.1, end - at - 0.5)
        if kind in ("pause", "watch_lag"):
            span = min(room, rng.choice([0.5, 3.0, config.lease_ttl * 0.8,
                                         config.lease_ttl * 1.5, config.lease_ttl * 3.0]))
            faults.append(Fault(at, kind, rng.choice(workers), round(span, 3)))
        elif kind == "kill":
            # w0 never dies: someone must be left to show the customers settle.
            if len(workers) > 1:
                faults.append(Fault(at, kind, rng.choice(workers[1:])))
        elif kind == "watch_break":
            faults.append(Fault(at, kind, rng.choice(workers)))
        elif kind == "compact":
            faults.append(Fault(at, kind))
        elif kind in ("reauth", "disconnect", "clear"):
            faults.append(Fault(at, kind, rng.choice(customers)))
        elif kind == "skew_jump":
            faults.append(Fault(at, kind, rng.choice(workers), round(rng.uniform(-20, 60), 1)))
        else:
            span = min(room, rng.choice([0.5, 2.0, 10.0, 30.0]))
            faults.append(Fault(at, kind, "", round(span, 3), rng.choice([0.2, 0.5, 1.0])))
    faults.sort(key=lambda f: (f.at, f.kind, f.target))
    return faults


def draw_extra_config(rng: random.Random, config: Config) -> Config:
    return replace(config,
                   max_concurrent=tuple(rng.choice([1, 2, 64, 64])
                                        for _ in range(config.workers)),
                   refused_backoff=rng.choice([10.0, 30.0]))


def draw_slow_wave(rng: random.Random, config: Config) -> list[Fault]:
    """Slow token answers as the sessions granted at t≈0 come due together, and the
    worker with the narrowest OAuth queue cut off from etcd while its requests queue
    (its budget must be judged again when a request leaves the queue)."""
    end = config.fault_phase
    period = config.session_lifetime - config.refresh_margin
    waves = [k * period for k in range(1, int(end / period) + 1) if k * period < end - 5]
    if not waves:
        return []
    wave = rng.choice(waves)
    at = round(max(0.5, wave - rng.uniform(0.0, 1.0)), 3)
    room = max(0.1, end - at - 0.5)
    slow = Fault(at, "token_slow", "", round(min(room, rng.choice([10.0, 30.0])), 3),
                 rng.choice([0.5, 1.0]))
    narrowest = min(config.max_concurrent or (64,))
    queued = [w for w, n in zip(worker_names(config.workers), config.max_concurrent,
                                strict=False) if n == narrowest] or worker_names(config.workers)
    # The cut comes after the first locks of the wave were taken (a partitioned
    # worker takes none), while their requests still queue.
    cut_at = round(wave + rng.uniform(0.5, 4.0), 3)
    cut = Fault(cut_at, "partition", rng.choice(queued),
                round(min(max(0.1, end - cut_at - 0.5),
                          config.lease_ttl * rng.choice([0.8, 1.5])), 3))
    return [slow, cut]


def draw_extra_faults(rng: random.Random, config: Config) -> list[Fault]:
    workers = worker_names(config.workers)
    customers = customer_names(config.customers)
    end = config.fault_phase
    faults: list[Fault] = []
    for kind, p in ANCHORED_KINDS.items():
        if rng.random() < 0.5:
            at = round(rng.uniform(1.0, 10.0), 3)
            faults.append(Fault(at, kind, "", round(end - at - 0.5, 3), p))
    if rng.random() < 0.5:
        faults += draw_slow_wave(rng, config)
    windowed = [k for k in EXTRA_KINDS if k not in ANCHORED_KINDS and k != "slow_wave"]
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
        kind = rng.choice(windowed)
        at = round(rng.uniform(1.0, end * 0.9), 3)
        room = max(0.1, end - at - 0.5)
        if kind == "partition":
            span = min(room, rng.choice([3.0, config.lease_ttl * 0.8, config.lease_ttl * 1.5]))
            faults.append(Fault(at, kind, rng.choice(workers), round(span, 3)))
        elif kind == "api_refused":
            faults.append(Fault(at, kind, rng.choice(customers),
                                round(min(room, rng.choice([10.0, 30.0])), 3)))
        else:  # token_invalid
            span = min(room, rng.choice([2.0, 10.0, 30.0]))
            faults.append(Fault(at, kind, "", round(span, 3), rng.choice([0.05, 0.2, 0.5])))
    return faults


def draw_mirror(rng: random.Random, config: Config) -> Config:
    """The store's mirror mode, half the plans each; served customers go idle after
    5-60 s, so they are dropped and served again within one run."""
    if rng.random() < 0.5:
        return replace(config, mirror="namespace")
    return replace(config, mirror="served", idle_after=rng.choice([5.0, 10.0, 20.0, 60.0]))


def draw_spread(rng: random.Random, config: Config) -> Config:
    """A third of the plans spread their acquires (up to 20 ms, 100 ms or 2 s)."""
    if rng.random() < 2 / 3:
        return config
    return replace(config, acquire_spread=rng.choice([0.02, 0.1, 2.0]))


def draw_order(rng: random.Random, config: Config) -> Config:
    """Place in line (the member list): the defaults in half the plans; off, or a
    handoff longer than a token request, or a stagger of most of the margin, in the
    others."""
    pick = rng.random()
    if pick < 0.5:
        return config
    if pick < 2 / 3:
        return replace(config, handoff=0.0, refresh_stagger=0.0)
    if pick < 5 / 6:
        return replace(config, handoff=rng.choice([1.0, 5.0]))
    return replace(config, refresh_stagger=0.9)


def draw_plan(seed: int) -> Plan:
    rng = random.Random(f"plan:{seed}")
    config = draw_config(rng)
    faults = draw_faults(rng, config)
    extra = random.Random(f"plan-extra:{seed}")
    config = draw_extra_config(extra, config)
    faults += draw_extra_faults(extra, config)
    # A stream of its own: the plans above, and the regression seeds, stay as they were.
    config = draw_mirror(random.Random(f"plan-mirror:{seed}"), config)
    config = draw_spread(random.Random(f"plan-spread:{seed}"), config)
    config = draw_order(random.Random(f"plan-order:{seed}"), config)
    faults.sort(key=lambda f: (f.at, f.kind, f.target))
    return Plan(config, faults)
