"""Second adversarial review of the flight task: the fixes of 5c19c0e (held cancels
dropped by a section that stored its token, a held section sends nothing new, no
section after a teardown's sweep, a cancelled helper task is a transport failure)
and the CPU work of e11e3b0 (singleflight runs ``fn``'s coroutine as the task,
``_commit``'s first attempt outside ``_durably``).

Findings are strict xfails: each fails today for the reason quoted above it.
Everything runs against the emulator over real sockets and real stores; loops
torn down without ``aclose()`` run in a thread of their own while the emulator
serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from sfrtr import (
    MemoryStore,
    OAuthClient,
    RefreshPolicy,
    SqliteStore,
    StoreError,
    TokenManager,
)
from sfrtr.emulator import Emulator, TokenState
from sfrtr.emulator.sdk import oauth_config
from sfrtr.records import Status
from sfrtr.singleflight import Singleflight
from tests.conftest import emulator_grant, emulator_oauth

_SHORT = {"timeout": 2.0, "connect_timeout": 1.0, "head_grace": 0.1, "answer_grace": 0.4}


async def _in_a_loop_of_its_own(app: Any) -> None:
    """``asyncio.run(app())`` in another thread: the emulator keeps serving here."""
    await asyncio.wait_for(asyncio.to_thread(asyncio.run, app()), 20.0)


def _close_abandoned(manager: TokenManager) -> list[str]:
    """Close the coroutines a closed loop left pending in ``manager`` (flights,
    background refreshes, hook calls) here and now, not in the garbage collector's
    unraisable hook at some later point; return what their ``finally`` blocks raised."""
    raised: list[str] = []
    pending = [c.task for c in manager._flights._calls.values() if c.task is not None]
    pending += [*manager._background, *manager.hooks._running]
    for task in pending:
        if task.done():
            continue
        try:
            task.get_coro().close()
        except BaseException as exc:
            raised.append(f"{type(exc).__name__}: {exc}")
    return raised


class _SlowResolver(aiohttp.ThreadedResolver):
    """The system resolver with a DNS server's latency (a cold cache)."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> Any:
        await asyncio.sleep(0.5)
        return await super().resolve(host, port, socket.AF_INET)


# -- findings (strict xfails) -------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason=(
    "rule 3 only notices a teardown when a flight in its section holds the sweep's "
    "cancel: with no section under way at the sweep, a refresh started afterwards "
    "(here a background refresh started by a last token() call in a task's cleanup) "
    "begins its section, sends its request and is abandoned when the loop closes: "
    "the provider rotated the token, the record stays 'refreshing' under an orphaned "
    "intent and the successor is lost"))
async def test_a_refresh_started_during_a_teardown_with_no_section_held_is_abandoned(
        emulator: Emulator) -> None:
    store = MemoryStore()
    grant = emulator_grant(emulator, "acme")
    emulator.faults.set("token", latency=0.4)
    managers: list[TokenManager] = []

    async def app() -> None:
        # The session is due for its refresh (not expired): token() serves it and
        # refreshes in the background.
        manager = TokenManager(emulator_oauth(emulator, **_SHORT), store,
                               RefreshPolicy(lease_margin=0.5, background_refresh=True,
                                             session_lifetime=30.0, refresh_margin=29.8))
        managers.append(manager)
        await manager.connect("acme", grant)

        async def worker() -> None:
            try:
                await asyncio.sleep(60)
            finally:  # cancelled by asyncio.run's sweep
                await manager.token("acme")  # one last API call on the way out
                await asyncio.sleep(0.2)  # then it closes its other resources

        asyncio.get_running_loop().create_task(worker())
        await asyncio.sleep(0.4)  # no refresh under way; return without aclose()

    await _in_a_loop_of_its_own(app)
    await asyncio.sleep(0.6)  # the request, if it left, is answered by now
    abandoned = _close_abandoned(managers[0])
    stored = (await store.read("acme")).record
    state = emulator.refresh_token_state(stored.refresh_token.reveal())
    facts = (f"record {stored.status.value} (intent {stored.intent}), its refresh token "
             f"{state.value} at the provider, {emulator.ledger['redemptions']} redemptions; "
             f"torn_down={managers[0]._torn_down}; abandoned pending: {abandoned}")
    assert stored.intent is None, facts
    assert state is TokenState.LIVE, facts


@pytest.mark.xfail(strict=True, reason=(
    "rule 3's _torn_down is never cleared: a cancel of a held flight from outside a "
    "running loop that is not the loop's end (stray tasks cancelled between two "
    "run_until_complete calls on one loop) leaves the manager refusing every later "
    "section: each refresh raises CancelledError, though nobody cancelled its caller"))
async def test_a_manager_whose_flight_held_a_cancel_between_two_runs_never_refreshes_again(
        emulator: Emulator) -> None:
    store = MemoryStore()
    grant_x, grant_y = emulator_grant(emulator, "x"), emulator_grant(emulator, "y")
    emulator.faults.set("token", latency=0.4)
    seen: dict[str, Any] = {}

    def sync_application() -> None:
        """One loop for the process, driven with run_until_complete per job, which
        tidies up stray tasks between jobs (as asyncio.run would) but keeps the loop."""
        loop = asyncio.new_event_loop()
        manager = TokenManager(emulator_oauth(emulator, **_SHORT), store,
                               RefreshPolicy(lease_margin=0.5))
        try:
            async def first_job() -> None:
                old_x = await manager.connect("x", grant_x)
                seen["old_y"] = (await manager.connect("y", grant_y)).access_token.reveal()
                with pytest.raises(TimeoutError):  # the caller gives up; its flight goes on
                    await asyncio.wait_for(
                        manager.refresh("x", stale=old_x.access_token.reveal()), 0.1)

            loop.run_until_complete(first_job())
            strays = asyncio.all_tasks(loop)
            for task in strays:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*strays, return_exceptions=True))
            seen["x"] = loop.run_until_complete(store.read("x")).record

            async def second_job() -> str:
                return (await manager.refresh("y", stale=seen["old_y"])).access_token

            try:
                seen["y"] = loop.run_until_complete(second_job())
            except BaseException as exc:  # reported below
                seen["y"] = exc
            loop.run_until_complete(manager.aclose())
        finally:
            loop.close()

    await asyncio.wait_for(asyncio.to_thread(sync_application), 10.0)
    # The held section itself finished: x was refreshed and stored.
    assert seen["x"].status is Status.VALID
    assert seen["x"].generation == 1
    assert isinstance(seen["y"], str), f"the second job's refresh raised {seen['y']!r}"
    stored_y = (await store.read("y")).record
    assert seen["y"] == stored_y.access_token.reveal()


@pytest.mark.xfail(strict=True, reason=(
    "rule 4 classifies a request cut off in its DNS lookup (nothing sent: 0 "
    "redemptions, the token live) as a transport failure after sending "
    "(ClientConnectionError -> INDETERMINATE); under recovery='fail_closed' the "
    "teardown marks a live grant reauth_required (invariant 4)"))
async def test_a_teardown_during_the_dns_lookup_under_fail_closed_locks_out_a_live_grant(
        emulator: Emulator) -> None:
    store = MemoryStore()
    assert emulator.base_url is not None
    port = emulator.base_url.rsplit(":", 1)[1]
    grant = dataclasses.replace(emulator_grant(emulator, "acme"), token_host="")

    async def app() -> None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=_SlowResolver()))
        oauth = OAuthClient(oauth_config(f"http://localhost:{port}", **_SHORT), session)
        manager = TokenManager(oauth, store,
                               RefreshPolicy(lease_margin=0.5, recovery="fail_closed"))
        record = await manager.connect("acme", grant)
        asyncio.get_running_loop().create_task(
            manager.refresh("acme", stale=record.access_token.reveal()))
        await asyncio.sleep(0.2)  # acquired; the token host's name is being resolved

    await _in_a_loop_of_its_own(app)
    stored = (await store.read("acme")).record
    assert emulator.ledger["redemptions"] == 0  # the request never left
    assert emulator.refresh_token_state(stored.refresh_token.reveal()) is TokenState.LIVE
    assert stored.status is not Status.REAUTH_REQUIRED, stored.reason


@pytest.mark.xfail(strict=True, reason=(
    "rule 4 misreads a task's own pending cancellation: a task that cancelled itself "
    "(cancelling() already 1 when the request starts, the cancel thrown at the "
    "request's first suspension) gets TokenEndpointUnavailable ('sent, no answer; "
    "it may have been processed') and is not cancelled"))
async def test_a_task_that_cancelled_itself_gets_a_transport_error_not_its_cancel(
        emulator: Emulator) -> None:
    oauth = emulator_oauth(emulator)
    grant = emulator_grant(emulator, "acme")
    try:
        async def user() -> object:
            current = asyncio.current_task()
            assert current is not None
            current.cancel()  # "stop at the next await"
            return await oauth.introspect(grant.refresh_token)

        task = asyncio.create_task(user())
        await asyncio.wait({task}, timeout=5.0)
        assert task.done()
        outcome = "cancelled" if task.cancelled() else repr(task.exception())
        assert task.cancelled(), outcome
    finally:
        await oauth.aclose()


@pytest.mark.xfail(strict=True, reason=(
    "a section holding a teardown's cancel still sends a follow-up request: with "
    "learn_expiry it introspects the new access token after the commit (a rejected "
    "refresh under introspect recovery does the same), so the teardown waits two "
    "token requests, past the documented bound of one request plus store_patience"))
async def test_a_held_section_introspects_after_its_commit_past_the_teardown_bound(
        emulator: Emulator) -> None:
    store = MemoryStore()
    grant = emulator_grant(emulator, "acme")
    oauth = emulator_oauth(emulator, **_SHORT)
    policy = RefreshPolicy(lease_margin=0.5, store_patience=0.1, learn_expiry=True)
    bound = oauth.config.exchange_limit + policy.store_patience
    returned: list[float] = []

    async def app() -> None:
        manager = TokenManager(oauth, store, policy)
        record = await manager.connect("acme", grant)
        emulator.faults.set("token", latency=1.4)
        emulator.faults.set("introspect", latency=1.8)
        asyncio.get_running_loop().create_task(
            manager.refresh("acme", stale=record.access_token.reveal()))
        await asyncio.sleep(0.1)  # the token request is out; return without aclose()
        returned.append(time.monotonic())

    await _in_a_loop_of_its_own(app)
    torn_down = time.monotonic() - returned[0]
    stored = (await store.read("acme")).record
    assert stored.status is Status.VALID  # the section stored its refresh
    assert stored.generation == 1
    assert torn_down <= bound, f"teardown took {torn_down:.1f}s (bound {bound:.1f}s)"


@pytest.mark.xfail(strict=True, reason=(
    "e11e3b0 moved the commit's first attempt out of _durably, whose patience now "
    "starts after that attempt failed: a commit whose attempts each wait the store's "
    "busy timeout is retried for store_patience plus one more attempt (1.5 + 0.5 + "
    "1.5 s) where it gave up after store_patience plus at most one attempt before"))
async def test_a_commits_store_patience_counts_from_its_first_attempt(
        emulator: Emulator, tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    busy = 1.5
    policy = RefreshPolicy(lease_margin=0.5, store_patience=0.5)
    manager = TokenManager(emulator_oauth(emulator), SqliteStore(path, busy_timeout=busy),
                           policy)
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        record = await manager.connect("acme", emulator_grant(emulator, "acme"))
        emulator.faults.set("token", latency=0.5)
        started = time.monotonic()
        flight = asyncio.ensure_future(manager.refresh("acme",
                                                       stale=record.access_token.reveal()))
        await asyncio.sleep(0.25)  # acquired; the token request is being processed
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the database
        with pytest.raises(StoreError):
            await flight  # rotated, not stored: kept in memory
        gave_up = time.monotonic() - started - 0.5  # after the token request's answer
        blocker.execute("ROLLBACK")
        # The section is finished by the next flight (nothing lost).
        fresh = await manager.refresh("acme", stale=record.access_token.reveal())
        stored = (await manager.store.read("acme")).record
        assert stored.generation == 1
        assert fresh.access_token == stored.access_token.reveal()
        assert gave_up <= policy.store_patience + busy + 0.4, \
            f"the commit gave up {gave_up:.1f}s after it began"
    finally:
        emulator.faults.clear()
        blocker.close()
        await manager.aclose()


@pytest.mark.xfail(strict=True, reason=(
    "e11e3b0 calls fn(*args) in join() before the call's task exists: a plain "
    "function (not an async def) that joins its own key while it builds its "
    "awaitable starts a second call for the key (fn runs twice, two calls in "
    "flight), against 'nothing the call does can start a second one for the key'"))
async def test_singleflight_a_plain_function_joining_its_own_key_starts_no_second_call(
        ) -> None:
    group: Singleflight[str, int] = Singleflight()
    runs = 0
    joined: list[asyncio.Future[int]] = []

    async def work(n: int) -> int:
        await asyncio.sleep(0.05)
        return n

    def start() -> Any:
        nonlocal runs
        runs += 1
        if runs == 1:  # e.g. a wrapper that attaches a follow-up waiter for a log line
            joined.append(group.join("k", start))
        return work(runs)

    first = await group.do("k", start)
    results = {first[0], *[await f for f in joined]}
    assert runs == 1, f"fn ran {runs} times; callers got {results}"


# -- what holds ---------------------------------------------------------------------------


async def test_genuine_cancellations_of_non_flight_callers_stay_cancellations(
        emulator: Emulator) -> None:
    """Rule 4 leaves a caller's own cancellation alone when it is requested while the
    request is under way: asyncio.timeout, wait_for and anyio.fail_after give
    TimeoutError; a cancel from another task (even of a task whose cancelling() was
    already 1 from an earlier, swallowed cancel) and an anyio scope cancelled from
    another task give CancelledError; never TokenEndpointUnavailable."""
    oauth = emulator_oauth(emulator)
    grant = emulator_grant(emulator, "acme")
    emulator.faults.set("introspect", latency=0.6)
    ask = oauth.introspect

    try:
        async def with_timeout() -> object:
            async with asyncio.timeout(0.2):
                return await ask(grant.refresh_token)

        async def with_anyio_deadline() -> object:
            with anyio.fail_after(0.2):
                return await ask(grant.refresh_token)

        for coro in (with_timeout(), asyncio.wait_for(ask(grant.refresh_token), 0.2),
                     with_anyio_deadline()):
            with pytest.raises(TimeoutError):
                await coro

        async def swallowed_then_asked() -> object:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)  # swallowed without uncancel(): cancelling() stays 1
            return await ask(grant.refresh_token)

        task = asyncio.create_task(swallowed_then_asked())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.1)  # the request is under way
        assert task.cancelling() == 1
        task.cancel()
        await asyncio.wait({task}, timeout=3.0)
        assert task.cancelled()

        scope = anyio.CancelScope()
        outcome: list[object] = []

        async def in_a_scope() -> None:
            with scope:
                outcome.append(await ask(grant.refresh_token))
            outcome.append("scope exited")

        task = asyncio.create_task(in_a_scope())
        await asyncio.sleep(0.1)
        scope.cancel()
        await asyncio.wait({task}, timeout=3.0)
        assert task.done()
        assert task.exception() is None
        assert outcome == ["scope exited"]
        assert scope.cancelled_caught
    finally:
        emulator.faults.clear()
        await oauth.aclose()


async def test_a_commit_whose_first_attempt_fails_is_retried_within_patience(
        emulator: Emulator, tmp_path: Path) -> None:
    """The first attempt, now outside _durably, hands its failure in: the store back
    within store_patience, the rotated token is stored by a retry, once."""
    path = tmp_path / "tokens.db"
    manager = TokenManager(emulator_oauth(emulator), SqliteStore(path, busy_timeout=0.3),
                           RefreshPolicy(lease_margin=0.5, store_patience=5.0))
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        record = await manager.connect("acme", emulator_grant(emulator, "acme"))
        emulator.faults.set("token", latency=0.5)
        flight = asyncio.ensure_future(manager.refresh("acme",
                                                       stale=record.access_token.reveal()))
        await asyncio.sleep(0.25)
        blocker.execute("BEGIN EXCLUSIVE")
        released = threading.Timer(1.2, blocker.execute, ("ROLLBACK",))
        released.start()
        fresh = await asyncio.wait_for(flight, 6.0)
        released.join()
        stored = (await manager.store.read("acme")).record
        assert stored.status is Status.VALID
        assert stored.generation == 1
        assert stored.intent is None
        assert fresh.access_token == stored.access_token.reveal()
        assert emulator.ledger["redemptions"] == 1
        assert "acme" not in manager._unfinished
    finally:
        emulator.faults.clear()
        blocker.close()
        await manager.aclose()


async def test_singleflight_fn_raising_synchronously_reaches_its_caller_only() -> None:
    """A plain ``fn`` that raises before making its awaitable: join() raises it to the
    caller, no task runs, and the key is free for the next call (the _Call registered
    before the task is left behind with no task, and replaced)."""
    group: Singleflight[str, int] = Singleflight()

    def broken() -> Any:
        raise ValueError("bad arguments")

    async def fine() -> int:
        return 7

    with pytest.raises(ValueError, match="bad arguments"):
        await group.do("k", broken)
    assert not group.in_flight("k")
    assert len(group) == 0
    await group.wait_idle()
    assert await group.do("k", fine) == (7, False)
    assert "k" not in group._calls


async def test_a_cancel_held_while_waiting_for_a_request_slot_sends_nothing(
        emulator: Emulator) -> None:
    """Rule 2 with two sections on one request slot: the second one, whose flight's
    cancel is held while it waits, sends nothing, puts its record back exactly as it
    was and ends cancelled; the first, with no cancel, stores its refresh."""
    store = MemoryStore()
    manager = TokenManager(emulator_oauth(emulator, **_SHORT, max_concurrent=1), store,
                           RefreshPolicy(lease_margin=0.5))
    try:
        a = await manager.connect("a", emulator_grant(emulator, "a"))
        b = await manager.connect("b", emulator_grant(emulator, "b"))
        emulator.faults.set("token", latency=0.4)
        first = asyncio.create_task(manager.refresh("a", stale=a.access_token.reveal()))
        second = asyncio.create_task(manager.refresh("b", stale=b.access_token.reveal()))
        await asyncio.sleep(0.1)
        flight_b = manager._flights._calls["b"].task
        assert flight_b is not None
        assert flight_b.cancel()
        await asyncio.wait({first, second}, timeout=5.0)
        assert (await first).access_token == (await store.read("a")).record.access_token.reveal()
        assert second.cancelled()
        stored_b = (await store.read("b")).record
        assert stored_b == b
        assert emulator.ledger["redemptions"] == 1
        assert emulator.refresh_token_state(b.refresh_token.reveal()) is TokenState.LIVE
    finally:
        emulator.faults.clear()
        await manager.aclose()
