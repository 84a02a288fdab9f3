"""Adversarial review of today's changes: place in line as it landed in 4a7df0b (the
last lock holder first, ``RefreshOrder.known``, the lazy stagger in ``_slow``) and the
perf-cpu work (the token request's timer-driven deadline in the caller's task, the
slot semaphore, the section task settling its flight from a done-callback, the
instance-URL cache).

One finding, fixed (the comment above its test says how, the docstring what
broke); the other tests are suspicions that held.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

import sfrtr.manager as manager_module
import sfrtr.oauth.client as client_module
from sfrtr import (
    Intent,
    MemoryStore,
    OAuthClient,
    OAuthConfig,
    RefreshPolicy,
    Secret,
    TokenManager,
    TokenRecord,
)
from sfrtr.emulator import Emulator
from sfrtr.errors import InvalidTokenResponse
from sfrtr.oauth.instance_url import InstanceUrlPolicy
from sfrtr.oauth.outcome import OutcomeKind
from sfrtr.store.base import RefreshOrder
from sfrtr.store.etcd_launcher import LocalEtcd
from tests.conftest import emulator_grant, emulator_oauth
from tests.etcd_helpers import store_of as _store_of
from tests.etcd_helpers import until

pytestmark = pytest.mark.anyio
store_of = functools.partial(_store_of, lease_ttl=6)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ERROR = orjson.dumps({"error": "invalid_grant", "error_description": "expired"})


# -- helpers -----------------------------------------------------------------------


@pytest.fixture
def serve(token_endpoint: Callable[..., Awaitable[OAuthClient]]
          ) -> Callable[..., Awaitable[OAuthClient]]:
    """A token endpoint served by ``handler``; an OAuth client for it."""
    return token_endpoint



class _Captured(client_module._Deadline):
    made: list[client_module._Deadline] = []  # noqa: RUF012 (a test's log)

    def __init__(self, task: asyncio.Task[Any], config: OAuthConfig) -> None:
        super().__init__(task, config)
        _Captured.made.append(self)


# -- B: the timer-driven deadline and the caller's cancellation --------------------


@pytest.mark.parametrize("first", ["deadline", "caller"])
async def test_deadline_and_callers_cancel_in_one_iteration_stay_a_cancellation(
        serve: Callable[..., Awaitable[OAuthClient]], monkeypatch: pytest.MonkeyPatch,
        first: str) -> None:
    """Held. The deadline's cancellation and the caller's land in the same callback,
    in either order: the caller gets ``CancelledError`` (not a classified outcome),
    its own cancellation request is still counted on the task (``uncancel`` took back
    only the deadline's), and the slot is back."""
    started = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(5)
        return web.Response(status=400, body=ERROR)

    oauth = await serve(silent)
    _Captured.made = []
    monkeypatch.setattr(client_module, "_Deadline", _Captured)
    seen: dict[str, int] = {}

    async def caller() -> Any:
        try:
            return await oauth.refresh(Secret("rt"))
        finally:
            task = asyncio.current_task()
            assert task is not None
            seen["cancelling"] = task.cancelling()

    call = asyncio.ensure_future(caller())
    await started.wait()
    deadline = _Captured.made[-1]
    assert deadline.handle is not None
    deadline.handle.cancel()  # the real timer: this test fires it by hand
    if first == "deadline":
        deadline._expire()
        call.cancel()
    else:
        call.cancel()
        deadline._expire()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert seen["cancelling"] == 1
    assert oauth._slots is not None
    assert oauth._slots._value == oauth.config.max_concurrent


async def test_a_deadline_alone_inside_an_outer_timeout_leaves_the_outer_one_armed(
        serve: Callable[..., Awaitable[OAuthClient]]) -> None:
    """Held. Inside the caller's own ``asyncio.timeout`` (not expired), the deadline's
    expiry is an INDETERMINATE outcome, and the outer timeout still works afterwards
    (no cancellation request left behind or taken from it)."""
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(status=400, body=ERROR)

    oauth = await serve(silent, timeout=0.3, connect_timeout=0.1, head_grace=0.05,
                        answer_grace=0.05)
    seen: list[Any] = []

    async def inside_an_outer_timeout() -> None:
        async with asyncio.timeout(1.0):
            seen.append((await oauth.refresh(Secret("rt"))).kind)
            task = asyncio.current_task()
            assert task is not None
            seen.append(task.cancelling())
            await asyncio.sleep(5)  # the outer timeout must still end this

    with pytest.raises(TimeoutError):
        await inside_an_outer_timeout()
    assert seen == [OutcomeKind.INDETERMINATE, 0]


async def test_a_slot_comes_back_on_every_exit_path(
        serve: Callable[..., Awaitable[OAuthClient]]) -> None:
    """Held. One slot (``max_concurrent=1``). A caller cancelled while it waits for the
    slot, and one cancelled in the very callback that hands it the slot (the
    semaphore's ``release`` woke it; its cancel lands before it runs), both give it
    back: a third caller gets it and completes, and the count is whole at the end."""
    gate = asyncio.Event()

    async def gated(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(status=400, body=ERROR, content_type="application/json")

    oauth = await serve(gated, max_concurrent=1)
    victims: list[asyncio.Future[Any]] = []

    class CancelOnRelease(asyncio.Semaphore):
        def release(self) -> None:
            super().release()
            for victim in victims:
                victim.cancel()  # woken by this release, cancelled before it runs
            victims.clear()

    oauth._slots = CancelOnRelease(1)
    holder = asyncio.ensure_future(oauth.refresh(Secret("rt-a")))
    await until(lambda: oauth._slots is not None and oauth._slots.locked())
    waiting = asyncio.ensure_future(oauth.refresh(Secret("rt-b")))
    woken = asyncio.ensure_future(oauth.refresh(Secret("rt-c")))
    last = asyncio.ensure_future(oauth.refresh(Secret("rt-d")))
    await asyncio.sleep(0.05)
    waiting.cancel()  # cancelled while it waits for the slot
    with pytest.raises(asyncio.CancelledError):
        await waiting
    victims.append(woken)
    gate.set()
    assert (await holder).kind is OutcomeKind.REJECTED
    with pytest.raises(asyncio.CancelledError):
        await woken
    async with asyncio.timeout(3):
        assert (await last).kind is OutcomeKind.REJECTED
    assert oauth._slots._value == 1


def test_the_instance_url_cache_is_keyed_by_policy() -> None:
    """Held. A URL one policy passed (and so cached) is refused by a stricter one:
    the cache key is (policy, url), and equal policies are equal in what they allow."""
    loose = InstanceUrlPolicy.for_emulator()
    assert loose.validate("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    with pytest.raises(InvalidTokenResponse):
        InstanceUrlPolicy().validate("http://127.0.0.1:8080")
    custom = InstanceUrlPolicy(domains=("example.com",))
    assert custom.validate("https://org.example.com") == "https://org.example.com"
    with pytest.raises(InvalidTokenResponse):
        InstanceUrlPolicy().validate("https://org.example.com")

    class Stricter(InstanceUrlPolicy):
        def _validate(self, url: str) -> str:
            raise InvalidTokenResponse("nothing is allowed")

    InstanceUrlPolicy().validate("https://na1.my.salesforce.com")
    with pytest.raises(InvalidTokenResponse):
        Stricter().validate("https://na1.my.salesforce.com")


def test_a_sections_repr_shows_no_token() -> None:
    """Held. ``_Section`` (a slotted dataclass with the generated repr) holds the prior,
    held and new records: its repr shows fingerprints only."""
    record = TokenRecord(access_token=Secret("AT-SECRET-1"), refresh_token=Secret("RT-SECRET-1"),
                         instance_url="https://x.my.salesforce.com", issued_at=1.0,
                         expires_at=time.time() + 3600)
    section = manager_module._Section(Intent("w", "fp", 0.0, id="i"), record, record, 7,
                                      result=record, customer="acme")
    text = repr(section) + str(section)
    assert "SECRET" not in text


# -- A: the lazy stagger in _slow --------------------------------------------------


class Second(MemoryStore):
    """A memory store whose process is second of two for every customer, behind a
    known holder."""

    def refresh_order(self, customer: str) -> RefreshOrder:
        return RefreshOrder(1, 2, True)


class _Clock:
    """The manager's monotonic clock moved by ``offset``; ``bind`` moves its provider
    clock with it (``plan`` judges expiry on that one)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def bind(self, manager: TokenManager) -> TokenManager:
        real = manager._provider_now
        manager._provider_now = lambda: real() + self.offset  # type: ignore[method-assign]
        return manager


async def test_the_stagger_comes_before_the_background_refresh(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held. ``background_refresh=True``, this process second in line. When the
    entry's refresh time first comes, ``_slow`` applies the stagger before it looks at
    the background refresh: the still-valid session is served and nothing is started;
    only at the staggered time does the background refresh start (and still before
    the estimated expiry)."""
    clock = _Clock()
    monkeypatch.setattr(manager_module, "_monotonic", clock)
    manager = clock.bind(TokenManager(emulator_oauth(emulator), Second(),
                                      RefreshPolicy(lease_margin=0.5, background_refresh=True)))
    try:
        record = await manager.connect("acme", emulator_grant(emulator, "acme"))
        first = await manager.token("acme")
        assert first == record.access_token.reveal()
        entry = manager._cache["acme"]
        clock.offset = entry.refresh_at - time.monotonic() + 1.0  # its time has come
        entry.calls = 0
        assert await manager.token("acme") == first
        assert entry.staggered
        assert not manager._background
        assert not manager._flights.in_flight("acme")
        staggered_at = entry.refresh_at
        assert staggered_at < entry.expires_at
        clock.offset = staggered_at - time.monotonic() + 0.5
        entry.calls = 0
        assert await manager.token("acme") == first  # served; refreshed beside it
        assert manager._background or manager._flights.in_flight("acme")
        await manager.wait_idle()
        assert manager._cache["acme"].token != first
        assert emulator.ledger["redemptions"] == 1
    finally:
        await manager.aclose()


async def test_a_loop_that_runs_no_timers_is_caught_by_the_count_after_the_stagger(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held. Calls that never yield (so no timer runs: the entry's timer for its
    refresh time stays pending) reach the stagger through the count, and past the
    staggered time a refresh starts within ``_CHECK_EVERY`` + 1 calls. The timer
    still pending for the old refresh time does not keep the new one from being
    checked (it only costs one clock read when it fires)."""
    clock = _Clock()
    monkeypatch.setattr(manager_module, "_monotonic", clock)
    manager = clock.bind(TokenManager(emulator_oauth(emulator), Second(),
                                      RefreshPolicy(lease_margin=0.5)))
    try:
        record = await manager.connect("acme", emulator_grant(emulator, "acme"))
        first = await manager.token("acme")
        assert first == record.access_token.reveal()
        entry = manager._cache["acme"]
        assert entry.timer is not None  # armed for the unstaggered time (far, by the loop)
        clock.offset = entry.refresh_at - time.monotonic() + 1.0
        for _ in range(manager_module._CHECK_EVERY + 1):
            assert await manager.token("acme") == first  # never yields
        assert entry.staggered
        assert not manager._flights.in_flight("acme")
        # The timer armed for the unstaggered time fires late (this loop ran none):
        # it only costs a clock read, which re-arms for the staggered time.
        loop = asyncio.get_running_loop()
        entry.due(loop)
        assert entry.calls == 0
        assert await manager.token("acme") == first
        assert entry.timer is not None
        assert abs(entry.timer.when() - loop.time() - (entry.refresh_at - clock())) < 1.0
        clock.offset = entry.refresh_at - time.monotonic() + 0.5
        served = 0
        while await manager.token("acme") == first:
            served += 1
            assert served <= manager_module._CHECK_EVERY + 1
        assert emulator.ledger["redemptions"] == 1
    finally:
        await manager.aclose()


# -- A: the last holder is this process's own previous lease -----------------------



# Found by review; fixed: a store remembers the leases it held before (a re-grant),
# and a customer whose last holder is one of them is its own to go first for.
async def test_a_regranted_holder_does_not_wait_behind_its_own_old_lease(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str, mirror: str) -> None:
    """Finding (low: a needless wait, no invariant). Process A refreshes ``acme`` (its
    lease L1 is the last lock holder). A's lease is dropped locally (a stall past its
    deadline, a slow keepalive answer) and re-granted as L2; L1 still lives on etcd
    for up to its TTL, and its member key with it. ``refresh_order`` on A: holder = L1
    (a live member, not A's current lease), so A is second behind *itself*, with
    ``known=True``. A 401 on A for ``acme`` then waits the full handoff for a lock
    nobody will take: L1 is A's, and A will never act under it. (The others wait
    too, on a process that will not come.) The same holds for every customer A last
    refreshed: after a lease loss, which is when the fleet is most loaded.

    Fix: the store remembers the leases it held (until their TTL has certainly run
    out) and treats a holder among them as itself (place 0); or on a re-grant, move
    ``holder`` of every mirrored customer held by the old lease to the new one (the
    process is the same, and its interest in the customer is unchanged); or revoke
    the old lease once a new one is granted (its locks are orphans already)."""
    store = await store_of(etcd_server, namespace, mirror=mirror, lease_ttl=6)
    other = await store_of(etcd_server, namespace, lease_ttl=6)
    manager = TokenManager(emulator_oauth(emulator), store,
                           RefreshPolicy(lease_margin=0.5, handoff=1.0))
    try:
        record = await manager.connect("acme", emulator_grant(emulator, "acme"))
        await until(lambda: store._members == other._members ==
                    {store.lease_id, other.lease_id})
        fresh = await manager.refresh("acme", stale=record.access_token.reveal())
        old = store.lease_id
        await until(lambda: store._mirror["acme"].holder == old)
        store._lose_lease("test: the local deadline passed")
        await until(lambda: store.lease_id is not None)
        new = store.lease_id
        assert new != old
        await until(lambda: store._members == {old, new, other.lease_id})
        order = store.refresh_order("acme")
        started = time.monotonic()
        again = await manager.refresh("acme", stale=fresh.access_token)
        took = time.monotonic() - started
        assert again.access_token != fresh.access_token
        assert took < 0.5, (f"the 401 waited {took:.2f}s behind the process's own old "
                            f"lease (its order: {order})")
    finally:
        await manager.aclose()
        await store.aclose()
        await other.aclose()


async def test_a_reauthorization_elsewhere_costs_the_new_grant_one_handoff(
        emulator: Emulator, etcd_server: LocalEtcd, namespace: str, mirror: str) -> None:
    """Held (harmless). Process A refreshed ``acme`` (A is its last holder). Process B
    re-authorizes it (``connect``: a put, which takes no lock). A stays first in line
    and known for the new grant; a 401 on B pays the handoff once, refreshes (one
    redemption), and B is first from then on: its next 401 does not wait. If B only
    ran the web flow and A serves the customer, A staying first is right."""
    handoff = 0.5
    one = await store_of(etcd_server, namespace, mirror=mirror)
    two = await store_of(etcd_server, namespace, mirror=mirror)
    policy = RefreshPolicy(lease_margin=0.5, handoff=handoff)
    a = TokenManager(emulator_oauth(emulator), one, policy)
    b = TokenManager(emulator_oauth(emulator), two, policy)
    try:
        await until(lambda: one._members == two._members == {one.lease_id, two.lease_id})
        record = await a.connect("acme", emulator_grant(emulator, "acme"))
        await two.read("acme")  # B follows acme (a served mirror learns holders from then)
        await a.refresh("acme", stale=record.access_token.reveal())
        regrant = await b.connect("acme", emulator_grant(emulator, "acme"))
        await until(lambda: two._mirror["acme"].holder == one.lease_id)
        assert two.refresh_order("acme") == RefreshOrder(1, 2, True)
        before = emulator.ledger["redemptions"]
        started = time.monotonic()
        fresh = await b.refresh("acme", stale=regrant.access_token.reveal())
        first_wait = time.monotonic() - started
        assert fresh.access_token != regrant.access_token.reveal()
        assert emulator.ledger["redemptions"] == before + 1
        assert handoff * 0.8 <= first_wait < handoff + 2.0
        await until(lambda: two.refresh_order("acme").place == 0)
        started = time.monotonic()
        again = await b.refresh("acme", stale=fresh.access_token)
        assert again.access_token != fresh.access_token
        assert time.monotonic() - started < handoff * 0.8
    finally:
        await a.aclose()
        await b.aclose()
        await one.aclose()
        await two.aclose()
