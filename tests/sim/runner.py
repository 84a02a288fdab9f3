"""Run one schedule: build the loop, the models and the workers; check; report.

``run(seed)`` draws the plan from the seed; ``run(seed, plan)`` replays a
given (for example shrunk) plan. The same seed and plan give the same trace,
byte for byte. ``shrink`` removes faults one at a time while the failure of
the same kind persists; ``report`` is what a failing test prints.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from sfrtr.errors import ConfigurationError

from .clock import FakeTime, SimLoop, patched_time
from .etcd_model import EtcdModel
from .invariants import check
from .plan import Plan, draw_plan, worker_names
from .token_model import TokenEndpoint
from .trace import Trace, sfrtr_logs_into
from .world import CLIENT_SECRET, World


@dataclass
class Outcome:
    seed: int
    plan: Plan
    violations: list[str]
    trace: Trace
    virtual: float
    """Virtual seconds simulated."""
    cpu: float
    """CPU seconds the run took."""
    steps: int
    calls: int

    @property
    def failed(self) -> bool:
        return bool(self.violations)

    def kinds(self) -> set[str]:
        return {v.partition(":")[0] for v in self.violations}


@contextlib.contextmanager
def _quiet_collection() -> Iterator[None]:
    """Tasks of killed workers die with the loop; their coroutines' cleanup has
    no loop to run on. That noise is by design, so it is not printed."""
    saved = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = saved


def run(seed: int, plan: Plan | None = None) -> Outcome:
    plan = plan if plan is not None else draw_plan(seed)
    cfg = plan.config
    started = time.process_time()
    loop = SimLoop()
    trace = Trace(loop)
    names = worker_names(cfg.workers)
    # Monotonic clocks of different hosts share no origin; wall clocks are skewed.
    offsets = {w: 1000.0 * (i + 1) for i, w in enumerate(names)}
    skews = {w: cfg.skews[i] if i < len(cfg.skews) else 0.0 for i, w in enumerate(names)}
    fake = FakeTime(loop, offsets, skews)
    etcd = EtcdModel(loop, random.Random(f"etcd:{seed}"), trace.add,
                     watch_rng=random.Random(f"watch:{seed}"))
    endpoint = TokenEndpoint(loop, random.Random(f"provider:{seed}"), CLIENT_SECRET, trace.add,
                             reuse_window=cfg.reuse_window, session_timeout=cfg.provider_session,
                             timeout=cfg.provider_timeout)
    with _quiet_collection():
        with patched_time(fake), sfrtr_logs_into(trace):
            try:
                world = World(seed, plan, loop, fake, skews, etcd, endpoint, trace)
            except ConfigurationError as exc:
                loop.close()
                return _refused(seed, plan, trace, exc, time.process_time() - started)
            main = loop.create_task(world.main())
            try:
                loop.run_until_complete(main)
            except RuntimeError:
                if loop.spin is None:  # the loop ran dry or stopped: main cannot finish
                    world.found.violations.append(
                        "stuck: the loop stopped with nothing left to run before the end")
            violations = check(world)
        outcome = Outcome(seed, plan, violations, trace, loop.time(),
                          time.process_time() - started, loop.steps, world.found.calls)
        loop.close()
        del world, main, loop
    return outcome


def _refused(seed: int, plan: Plan, trace: Trace, exc: ConfigurationError,
             cpu: float) -> Outcome:
    """A manager that refuses its configuration at construction passes only when the
    configuration cannot work: a reuse window shorter than a takeover can come."""
    cfg = plan.config
    needed = cfg.provider_timeout + 2.25 + 2.0
    unworkable = cfg.recovery == "reuse_window" and cfg.reuse_window <= cfg.lease_ttl + needed
    trace.add(None, f"configuration refused: {exc}")
    violations = [] if unworkable else [f"refused: a workable configuration was refused: {exc}"]
    return Outcome(seed, plan, violations, trace, 0.0, cpu, 0, 0)


def run_block(block: tuple[int, int]) -> tuple[int, float, list[int]]:
    """Run seeds ``first .. first+count-1``; the failing seeds (for process pools)."""
    first, count = block
    started = time.process_time()
    failing = [s for s in range(first, first + count) if run(s).failed]
    return count, time.process_time() - started, failing


def shrink(outcome: Outcome, budget: int = 40) -> Outcome:
    """Remove faults while a failure of the same kind persists (at most ``budget`` runs)."""
    kinds = outcome.kinds()
    best = outcome
    i = 0
    while i < len(best.plan.faults) and budget > 0:
        faults = best.plan.faults[:i] + best.plan.faults[i + 1:]
        trial = run(best.seed, replace(best.plan, faults=faults))
        budget -= 1
        if trial.failed and trial.kinds() & kinds:
            best = trial
        else:
            i += 1
    return best


def report(outcome: Outcome) -> str:
    lines = [
        f"simulation failed: seed {outcome.seed} "
        f"(replay: SFRTR_SIM_SEED={outcome.seed} SFRTR_SIM_RUNS=1 "
        ".venv/bin/pytest tests/sim -k schedules)",
        *[f"  VIOLATION {v}" for v in outcome.violations[:20]],
        "plan:", outcome.plan.describe(),
        f"virtual time {outcome.virtual:.1f}s, {outcome.steps} callbacks, "
        f"cpu {outcome.cpu * 1000:.0f} ms",
        "timeline per worker:", outcome.trace.timeline(),
    ]
    return "\n".join(lines)


def seeds(default_runs: int) -> tuple[int, int]:
    """The first seed and the number of runs: ``SFRTR_SIM_SEED``/``SFRTR_SIM_RUNS`` or a
    seed that changes per run."""
    env = os.environ.get("SFRTR_SIM_SEED")
    first = int(env) if env else random.SystemRandom().randrange(10**9)
    runs = int(os.environ.get("SFRTR_SIM_RUNS", default_runs))
    return first, runs


__all__ = ["Outcome", "report", "run", "run_block", "seeds", "shrink"]
