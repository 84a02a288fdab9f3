"""Interleavings found by the adversarial review of the fault-correctness work, replayed.

Each scripts a schedule over the simulation's models (virtual time; the real
TokenManager, EtcdStore and OAuthClient) and asserts the invariant the
original code broke: a rotated refresh token presented again (reuse, family
revoked), a lock left held, a live rescue cleared. They all failed on the
commit before the fixes they name.
"""

# ruff: noqa: E501
from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from sfrtr.cli import admin
from sfrtr.cli.admin import RefusedToClear
from sfrtr.errors import StoreError
from tests.sim.clock import FakeTime, SimLoop, patched_time
from tests.sim.etcd_model import EtcdModel
from tests.sim.invariants import check
from tests.sim.plan import Config, Plan, worker_names
from tests.sim.token_model import TokenEndpoint
from tests.sim.trace import Trace, sfrtr_logs_into
from tests.sim.world import World

BREAKS = ("reuse", "revoked", "concurrent", "crash", "spin")


def config(**changes: Any) -> Config:
    base: dict[str, Any] = dict(
        workers=2, customers=1, callers=0, think=1000.0, cancel_p=0.0, recovery="introspect",
        reuse_window=0.0, provider_timeout=3.0, lease_ttl=12, session_lifetime=300.0,
        provider_session=300.0, refresh_margin=60.0, wait_timeout=60.0,
        background_refresh=False, busy_backoff=1.0, fault_phase=1.0, skews=())
    base.update(changes)
    return Config(**base)


def run_script(cfg: Config, script: Any, seed: int = 1) -> tuple[World, Trace, list[str]]:
    loop = SimLoop()
    trace = Trace(loop)
    names = worker_names(cfg.workers)
    offsets = {w: 1000.0 * (i + 1) for i, w in enumerate(names)}
    skews = {w: 0.0 for w in names}
    fake = FakeTime(loop, offsets, skews)
    etcd = EtcdModel(loop, random.Random(f"etcd:{seed}"), trace.add)
    endpoint = TokenEndpoint(loop, random.Random(f"provider:{seed}"), "sim-client-secret",
                             trace.add, reuse_window=cfg.reuse_window,
                             session_timeout=cfg.provider_session, timeout=cfg.provider_timeout)
    with patched_time(fake), sfrtr_logs_into(trace):
        world = World(seed, Plan(cfg, []), loop, fake, skews, etcd, endpoint, trace)

        async def main() -> None:
            await world.spawn("w0", world._connect_all(world.workers[0]))
            await script(world)

        task = loop.create_task(main())
        loop.run_until_complete(task)
        violations = check(world)
    return world, trace, violations


async def call(world: World, w: Any, coro_fn: Any, label: str) -> Any:
    """Run a call in worker ``w``'s context; return its result or its exception."""
    async def wrapped() -> Any:
        try:
            result = await coro_fn()
        except BaseException as exc:
            world.trace(w.name, f"SCRIPT {label} -> {type(exc).__name__}: {exc}")
            return exc
        world.trace(w.name, f"SCRIPT {label} -> ok")
        return result
    return await world.spawn(w.name, wrapped())


def broken(violations: list[str]) -> list[str]:
    return [v for v in violations if v.startswith(BREAKS)]

# -- s1_reuse_window: Finding: under reuse_window, a worker that re-presented another worker's token judges

async def _s1_reuse_window(world):
    w0, w1 = world.workers
    ep = world.endpoint
    tok = await call(world, w0, lambda: w0.manager.token("org0"), "w0 token")
    c = await call(world, w0, lambda: w0.manager.refresh("org0", stale=tok), "w0 refresh ok (learn skew)")
    c = await call(world, w1, lambda: w1.manager.refresh("org0", stale=c.access_token), "w1 refresh ok (learn skew)")
    await asyncio.sleep(1)
    # w0's refresh: the provider rotates, the answer is lost -> indeterminate (intent by w0).
    ep.faults.drop_after = lambda now: 1.0
    await call(world, w0, lambda: w0.manager.refresh("org0", stale=c.access_token), "w0 refresh (answer dropped)")
    # w1 recovers it, repeatedly (answers keep being lost while the provider is degraded).
    for i in range(6):
        r = await call(world, w1, lambda: w1.manager.refresh("org0", stale=c.access_token), f"w1 recover #{i}")
        if not isinstance(r, BaseException):
            break
    ep.faults.drop_after = lambda now: 0.0
    await asyncio.sleep(20)
    await call(world, w1, lambda: w1.manager.refresh("org0", stale=c.access_token), "w1 final")


# -- s2_stuck_lock: Finding: a transient StoreError from store.rescues() in a Recover section leaves the

async def _s2_stuck_lock(world):
    w0, w1 = world.workers
    ep = world.endpoint
    tok = await call(world, w1, lambda: w1.manager.token("org0"), "w1 token")
    # w1's refresh: the connection resets after sending -> INDETERMINATE; X stays live.
    ep.faults.reset_before = lambda now: 1.0
    await call(world, w1, lambda: w1.manager.refresh("org0", stale=tok), "w1 refresh (reset)")
    ep.faults.reset_before = lambda now: 0.0
    # w0 recovers; its rescues() range gets one transient error (a lost answer).
    orig = w0.store.client.range
    state = {"n": 0}
    async def flaky(key, **kw):
        if b"rescue" in key and state["n"] == 0:
            state["n"] += 1
            await w0.store.client.travel()
            raise StoreError("etcd Range failed: UNAVAILABLE (injected, once)")
        return await orig(key, **kw)
    w0.store.client.range = flaky
    await call(world, w0, lambda: w0.manager.refresh("org0", stale=tok), "w0 refresh (recover)")
    # From now on only w1 serves org0 (w0 has no more traffic for it).
    for i in range(8):
        await call(world, w1, lambda: w1.manager.refresh("org0", stale=tok), f"w1 refresh #{i}")
        await asyncio.sleep(30)
    st = await w1.store.read("org0")
    world.trace(None, f"SCRIPT final: status={st.record.status.value} locked={st.locked} "
                      f"intent={st.record.intent.worker if st.record.intent else None} t={world.loop.time():.0f}")
    world.final = st  # type: ignore[attr-defined]


# -- s3_lease_swap: Finding: the redeem budget reads the store's CURRENT lease, not the lease the section's

async def _s3_lease_swap(world):
    w0, w1 = world.workers
    ep, loop = world.endpoint, world.loop
    t0 = await call(world, w1, lambda: w1.manager.token("org0"), "w1 token org0")
    t1 = await call(world, w0, lambda: w0.manager.token("org1"), "w0 token org1")
    # w1's refresh of org0 is reset after sending: indeterminate, X still live.
    ep.faults.reset_before = lambda now: 1.0
    await call(world, w1, lambda: w1.manager.refresh("org0", stale=t0), "w1 refresh org0 (reset)")
    ep.faults.reset_before = lambda now: 0.0
    # w0 will recover org0; it is stopped (SIGSTOP) right after its introspection is sent.
    orig = ep._introspect
    def hooked(form, done):
        orig(form, done)   # the provider has processed it: the answer is on its way
        from tests.sim.clock import WORKER
        if WORKER.get() == "w0" and "paused" not in world.__dict__:
            world.paused = True
            loop.pause("w0", loop.time() + 60.0)
            world.trace(None, f"SCRIPT SIGSTOP w0 for 60s at t={loop.time():.3f} (introspection answered)")
    ep._introspect = hooked
    rec = world.spawn("w0", w0.manager.refresh("org0", stale=t0))
    # While w0 is stopped another of its callers will need org1 refreshed (a 401) right as
    # it resumes: that flight's acquire re-grants the lease.
    async def org1_caller():
        await asyncio.sleep(8.0 + 59.0)
        try:
            await w0.manager.refresh("org1", stale=t1)
            world.trace("w0", "SCRIPT org1 refresh -> ok")
        except Exception as exc:
            world.trace("w0", f"SCRIPT org1 refresh -> {type(exc).__name__}")
    world.spawn("w0", org1_caller())
    await asyncio.sleep(9.0)
    # Meanwhile w1 gets a 401 for org0 and takes over once w0's lease is gone.
    await call(world, w1, lambda: w1.manager.refresh("org0", stale=t0), "w1 refresh org0 (takeover)")
    await asyncio.wait({rec}, timeout=120)
    world.trace("w0", f"SCRIPT w0 recovery -> {rec.exception() if rec.done() else 'pending'}")
    await asyncio.sleep(30)


# -- s4_clear: Finding: admin.clear deletes a reauth_required record together with a rescue entry that

async def _s4_clear(world):
    w0, w1 = world.workers
    ep, loop = world.endpoint, world.loop
    t0 = await call(world, w0, lambda: w0.manager.token("org0"), "w0 token")
    orig = ep._token_request
    def hooked(worker, form, done):
        orig(worker, form, done)
        if worker == "w0" and "paused" not in world.__dict__:
            world.paused = True
            loop.pause("w0", loop.time() + 60.0)
            world.trace(None, "SCRIPT SIGSTOP w0 for 60s (its refresh request is being processed)")
    ep._token_request = hooked
    osave = w0.store.save_rescue
    async def save_then_die(c, fence, rec):
        await osave(c, fence, rec)
        loop.kill("w0")
        world.trace(None, "SCRIPT w0 killed right after saving its rescue")
    w0.store.save_rescue = save_then_die
    world.spawn("w0", w0.manager.refresh("org0", stale=t0))
    await asyncio.sleep(2)
    await call(world, w1, lambda: w1.manager.refresh("org0", stale=t0), "w1 401 -> recover")
    await asyncio.sleep(60)
    rows = await admin.list_status(w1.store)
    world.trace(None, f"SCRIPT status: {[(r.customer, r.status.value, r.refresh_fingerprint) for r in rows]}")
    res = await call(world, w1, lambda: admin.clear(w1.store, "org0"), "operator clear org0")
    world.trace(None, f"SCRIPT clear returned {res}")
    world.cleared = res  # type: ignore[attr-defined]
    fam = ep.families[0]
    from sfrtr.secret import fingerprint
    world.trace(None, f"SCRIPT provider: family current {fingerprint(fam.current)} state={ep.state(fam.current)}; "
                      f"etcd keys left: {[k for k in world.etcd.keys]}")
    world.connected["org0"] = False


# -- s5_skew: Finding: _learn_skew takes local-clock-at-parse minus issued_at. Any delay between the

async def _s5_skew(world):
    w0, w1 = world.workers
    ep, loop = world.endpoint, world.loop
    tok = await call(world, w0, lambda: w0.manager.token("org0"), "w0 token")
    c = await call(world, w0, lambda: w0.manager.refresh("org0", stale=tok), "w0 refresh ok")
    # w1's refresh: the provider answers, then w1 is stopped 20 s before it parses the answer.
    orig = ep._token_request
    def hooked(worker, form, done):
        orig(worker, form, done)
        if worker == "w1" and "paused" not in world.__dict__:
            world.paused = True
            loop.pause("w1", loop.time() + 0.5 + 20.0)
            world.trace(None, "SCRIPT w1 stalled 20 s while its (good) answer is in transit")
    ep._token_request = hooked
    c = await call(world, w1, lambda: w1.manager.refresh("org0", stale=c.access_token), "w1 refresh ok (late parse)")
    world.trace("w1", f"SCRIPT w1 clock bounds {w1.manager._clock.low}..{w1.manager._clock.high}")
    await asyncio.sleep(1)
    ep.faults.drop_after = lambda now: 1.0
    await call(world, w0, lambda: w0.manager.refresh("org0", stale=c.access_token), "w0 refresh (answer lost)")
    ep.faults.drop_after = lambda now: 0.0
    await asyncio.sleep(22)   # no traffic for org0 for a while; then w1 gets a 401
    await call(world, w1, lambda: w1.manager.refresh("org0", stale=c.access_token), "w1 401 -> recover")


# -- s6_window_queue: Finding: the reuse-window judgement is made before the OAuth client's concurrency queue

async def _s6_window_queue(world):
    w0, _w1 = world.workers
    ep, _loop = world.endpoint, world.loop
    tok = await call(world, w0, lambda: w0.manager.token("org0"), "w0 token")
    c = await call(world, w0, lambda: w0.manager.refresh("org0", stale=tok), "w0 refresh ok")
    await asyncio.sleep(1)
    ep.faults.drop_after = lambda now: 1.0
    await call(world, w0, lambda: w0.manager.refresh("org0", stale=c.access_token), "w0 refresh (answer lost)")
    ep.faults.drop_after = lambda now: 0.0
    await asyncio.sleep(12)
    # w0's token-endpoint slots are all busy (a refresh storm: max_concurrent requests in
    # flight, each up to exchange_limit); model that as one slot held for a while.
    w0.oauth._slots = asyncio.Semaphore(1)
    async def hold():
        async with w0.oauth._slots:
            await asyncio.sleep(14.0)
    world.spawn("w0", hold())
    await asyncio.sleep(0)
    await call(world, w0, lambda: w0.manager.refresh("org0", stale=c.access_token), "w0 recover (own intent)")


# -- s7_notsent_recover: Finding: a recovery's re-presentation that is NOT_SENT releases the record as VALID

async def _s7_notsent_recover(world):
    w0, w1 = world.workers
    ep = world.endpoint
    tok = await call(world, w0, lambda: w0.manager.token("org0"), "w0 token")
    c = await call(world, w0, lambda: w0.manager.refresh("org0", stale=tok), "w0 refresh ok")
    await asyncio.sleep(1)
    ep.faults.drop_after = lambda now: 1.0
    await call(world, w0, lambda: w0.manager.refresh("org0", stale=c.access_token), "w0 refresh (answer lost)")
    ep.faults.drop_after = lambda now: 0.0
    ep.faults.refused = lambda now: 1.0     # the endpoint refuses connections for a moment
    await call(world, w0, lambda: w0.manager.refresh("org0", stale=c.access_token), "w0 recover (connect refused)")
    ep.faults.refused = lambda now: 0.0
    st = await w0.store.read("org0")
    world.trace(None, f"SCRIPT record now: {st.record.status.value} intent={st.record.intent}")
    await asyncio.sleep(30)
    await call(world, w1, lambda: w1.manager.refresh("org0", stale=c.access_token), "w1 401 -> refresh")


def test_a_recovery_never_presents_under_a_lease_that_is_not_its_locks():
    """s3: the budget read the process's current lease; a paused recovery came back,
    another flight re-granted a lease, and the section presented a token a takeover
    had already redeemed (fixed: the budget asks for the section's own lease)."""
    _, _, violations = run_script(config(customers=2), _s3_lease_swap)
    assert broken(violations) == []


@pytest.mark.parametrize("script", [
    _s7_notsent_recover,  # NOT_SENT released the indeterminate record as valid
    _s1_reuse_window,  # the window was timed from a recovery's own re-presentation
    _s5_skew,  # an answer read 20 s late made the provider's clock look 20 s slow
    _s6_window_queue,  # the window was judged before the OAuth concurrency queue
], ids=["not-sent-recovery", "first-presentation", "late-read-skew", "after-the-queue"])
def test_reuse_window_recovery_never_presents_outside_the_window(script: Any):
    _, _, violations = run_script(config(recovery="reuse_window", reuse_window=25.0), script)
    assert broken(violations) == []


def test_a_transient_error_in_a_recovery_never_leaves_the_lock_held():
    """s2: one failed rescues() read left w0's lock on its live lease; w1 waited forever."""
    world, _, violations = run_script(config(), _s2_stuck_lock)
    assert broken(violations) == []
    final = world.final  # type: ignore[attr-defined]
    assert not final.locked
    assert final.record.status.value == "valid"


def test_clear_refuses_a_dead_record_whose_rescue_is_live():
    """s4: clear deleted the record and the rescue holding the family's live token."""
    world, _, violations = run_script(config(), _s4_clear)
    assert isinstance(world.cleared, RefusedToClear)  # type: ignore[attr-defined]
    assert any(b"rescue" in k for k in world.etcd.keys)
    assert broken(violations) == []
