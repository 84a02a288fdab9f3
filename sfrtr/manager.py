"""The token manager: fresh access tokens for many customers, refreshed safely.

The hot path (:meth:`TokenManager.token` with a fresh token) is a dict
lookup and a counter: no I/O, no lock, and no clock read. Everything else goes
through one in-flight refresh per customer (singleflight) which follows the
protocol of ``docs/protocol.md`` against the configured store.

Why no clock read, and what bounds a timer that does not fire. Reading
``time.monotonic()`` was most of what a fresh-token call cost beyond a bare
awaited dict lookup. Instead, the first call that finds an entry fresh reads
the clock once and arms a timer on the running loop for the entry's
``refresh_at``; until then the entry serves ``_CHECK_EVERY`` calls without
looking at the clock, after which a call reads the clock again. So:

* while the loop that owns the timer runs its callbacks, an entry is served
  no later than ``refresh_at`` plus that loop's lag, which the refresh margin
  (default 300 s) keeps far from the estimated expiry;
* the entry remembers its loop: a call on another loop (the owning one
  stopped or closed, so its timer can never fire) re-arms on its own loop at
  its next clock read, and a loop that runs no timer at all (one callback
  that never yields) is caught by the count: past ``refresh_at`` at most
  ``_CHECK_EVERY`` calls are served before one reads the clock;
* a 401 goes through :meth:`TokenManager.refresh`, which never trusts the
  cached entry for the token that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import secrets
import socket
import time
from asyncio.events import _get_running_loop
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, TypeVar

from sfrtr import protocol
from sfrtr.errors import (
    ConfigurationError,
    CoordinationTimeout,
    GrantSuspended,
    InvalidTokenResponse,
    LeaseLost,
    NotConnected,
    OAuthError,
    ReauthorizationRequired,
    RefreshIndeterminate,
    SessionRefused,
    SfrtrError,
    StoreError,
    TokenEndpointUnavailable,
)
from sfrtr.flight_task import FlightTask, holding_a_cancel, spawn_flight
from sfrtr.hooks import Hooks, Observer
from sfrtr.oauth.client import LEASE_TOO_SHORT, REDIRECT_REFUSED, OAuthClient
from sfrtr.oauth.grant import TokenGrant
from sfrtr.oauth.outcome import OutcomeKind, RefreshOutcome
from sfrtr.policy import RefreshPolicy
from sfrtr.provider_clock import ProviderClock
from sfrtr.records import Intent, Status, TokenRecord, Versioned
from sfrtr.secret import Secret, fingerprint
from sfrtr.singleflight import Singleflight
from sfrtr.store.base import RefreshOrder, TokenStore
from sfrtr.store.memory import MemoryStore
from sfrtr.store.sealing import SealingError

T = TypeVar("T")
log = logging.getLogger(__name__)
_monotonic = time.monotonic  # a module global: one lookup less where the clock is read
_CHECK_EVERY = 64
"""Fresh-token calls an entry serves between two reads of the clock (see the module doc):
a bound in calls on a timer that cannot fire; the cost is one clock read per 64 calls."""

#: Client-side OAuth errors that mean our configuration is wrong, not the grant.
_CONFIG_ERRORS = frozenset({"invalid_client", "invalid_client_id", "unsupported_grant_type",
                            "invalid_request", REDIRECT_REFUSED})
_STORE_RETRY_DELAY = 5.0
"""Seconds between background attempts to store tokens the store refused to take."""


class Credentials(NamedTuple):
    """What an API call needs: the bearer token and where to send it."""

    access_token: str
    instance_url: str

    def __repr__(self) -> str:
        return (f"Credentials(access_token=sha256:{fingerprint(self.access_token)}, "
                f"instance_url={self.instance_url!r})")

    def __str__(self) -> str:
        return repr(self)


class _Entry:
    """A cached, usable record. ``refresh_at`` is on the monotonic clock.

    ``token`` duplicates ``credentials.access_token``: a slot read is the
    cheapest thing the hot path can do, and a NamedTuple field is not.
    ``version`` is the store version the record was read or written at: the
    cache only ever moves forward, so a late flight cannot put back an older
    grant's tokens. ``calls`` is how many fresh-token calls may still skip the
    clock: 0 means read it (a new entry, a count used up, or the timer on
    ``loop`` said ``refresh_at`` has come).
    """

    __slots__ = ("calls", "credentials", "expires_at", "loop", "refresh_at", "staggered", "timer",
                 "token", "version")

    def __init__(self, credentials: Credentials, refresh_at: float, expires_at: float,
                 version: int) -> None:
        self.credentials = credentials
        self.token = credentials.access_token
        self.refresh_at = refresh_at
        self.expires_at = expires_at
        self.version = version
        self.calls = 0
        self.staggered = False
        """Whether this process's place in line was applied to ``refresh_at`` (once,
        when it first came: see ``TokenManager._stagger``)."""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None

    def vouch(self) -> bool:
        """Read the clock: whether the entry is fresh, and if so let the next
        ``_CHECK_EVERY`` calls skip the clock, with a timer on the running loop
        to end that at ``refresh_at``."""
        now = _monotonic()
        if now >= self.refresh_at:
            self.calls = 0
            return False
        loop = _get_running_loop()
        if loop is None:
            return True  # nothing can time it: every call reads the clock
        if self.timer is None or self.loop is not loop:
            # A timer on another loop may never fire (that loop stopped or
            # closed): arm one here. The old one, if it fires, is ignored.
            self.loop = loop
            self.timer = loop.call_at(loop.time() + (self.refresh_at - now), self.due, loop)
        self.calls = _CHECK_EVERY
        return True

    def due(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is loop:
            self.calls = 0
            self.timer = None

    def retire(self) -> None:
        """No longer cached: never served again, and its timer is released."""
        self.calls = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


@dataclass(slots=True)
class _Section:
    """One critical section: the lock is ours at ``fence`` until its outcome is stored.

    A section that ends before its outcome reached the store (the store was
    down longer than ``store_patience``) stays in ``TokenManager._unfinished``;
    the next flight for the customer finishes it, because only this process
    knows whether the token was sent and what came back.
    """

    intent: Intent
    prior: TokenRecord
    """The record the acquire replaced: put back as it was if nothing was sent."""
    held: TokenRecord
    """The record whose refresh token this section may present."""
    fence: int
    sent: bool = False
    result: TokenRecord | None = None
    """Tokens the provider returned that are not stored yet."""
    customer: str = ""
    grants: int = 0
    """How many times this process had stored a grant for the customer (connect,
    disconnect) when the section began: if that moves, the grant it holds was
    replaced under it (the put released its lock), and nothing may be sent."""


class _Preempted(Exception):
    """Our fence was lost (a takeover or a re-authorization moved the record)."""


@dataclass
class ManagerStats:
    """What this manager did; read by tests, benchmarks and the demo."""

    redemptions: int = 0
    adopted: int = 0
    """Flights that found a newer record stored by someone else and used it."""
    waits: int = 0
    rescued: int = 0
    """Redeemed tokens whose commit was fenced out and went to rescue."""
    rescues_adopted: int = 0
    recoveries: int = 0
    reauth_marked: int = 0
    reclaimed: int = 0
    """Own sections finished by a later flight (a lost acquire answer, a store outage)."""


def default_worker_id() -> str:
    """``host:pid:random``: unique per process, readable in logs and intents."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class TokenManager:
    """Hands out access tokens per customer; refreshes each at most once at a time.

    One manager per process is the intended shape: it owns the cache that the
    hot path reads and the singleflight group that coalesces refreshes. Use it
    as ``async with TokenManager(...) as manager:`` or call :meth:`aclose`.
    """

    def __init__(self, oauth: OAuthClient, store: TokenStore | None = None,
                 policy: RefreshPolicy | None = None, *, worker_id: str | None = None,
                 hooks: Hooks | None = None, apps: Iterable[OAuthClient] = ()) -> None:
        """A manager over ``oauth`` (the token endpoint) and ``store`` (shared records).

        ``store`` defaults to a :class:`~sfrtr.MemoryStore` (one process only);
        ``policy`` to :class:`~sfrtr.RefreshPolicy`'s defaults; ``worker_id``
        (written into intents, shown in logs) to host:pid:random. ``hooks``: the
        application's callbacks on a grant's transitions (:class:`~sfrtr.hooks.Hooks`),
        called by the one worker that made each transition. ``apps``: more connected
        apps (an OAuth client each) whose grants this manager serves beside
        ``oauth``'s, e.g. during a move from one app to another; a grant's
        refreshes, introspection and revocation go to the app and login host that
        issued it (see :meth:`OAuthClient.for_host` for sandboxes and My Domains).
        The manager closes them all in :meth:`aclose`. Raises
        :class:`~sfrtr.ConfigurationError` when the store's lease is too short
        for the token requests the policy allows.
        """
        self.oauth = oauth
        self.apps: dict[str, OAuthClient] = {oauth.config.client_id: oauth}
        for app in apps:
            if app.config.client_id in self.apps:
                raise ConfigurationError("two OAuth clients for one connected app: give "
                                         "each app once (hosts come from its grants)")
            self.apps[app.config.client_id] = app
        self._hosts: dict[tuple[str, str], OAuthClient] = {}
        self.store: TokenStore = store if store is not None else MemoryStore()
        self.policy = policy or RefreshPolicy()
        self.worker_id = worker_id or default_worker_id()
        self.hooks = hooks or Hooks()
        self.observer: Observer | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._risks_told: dict[str, None] = {}
        """Orphaned intents this worker reported as a lockout risk (oldest first)."""
        # Spread simultaneous acquires only where a second look is free (a local mirror).
        self._spread = self.policy.acquire_spread if getattr(self.store, "local_reads", False) \
            else 0.0
        self._spread_rng = random.Random(self.worker_id)  # replayable in the simulation
        self._order: Callable[[str], RefreshOrder] | None = getattr(
            self.store, "refresh_order", None)
        """The store's place-in-line advice (etcd), for ``handoff`` and ``refresh_stagger``."""
        self._check_timing()
        self.stats = ManagerStats()
        self._cache: dict[str, _Entry] = {}
        self._flights: Singleflight[str, _Entry] = Singleflight(spawn_flight)
        self._flight_fn = self._flight  # bound once: not one method object per caller
        self._unfinished: dict[str, _Section] = {}
        self._unsent: dict[str, dict[str, tuple[int, TokenRecord]]] = {}
        """Customer -> {id of our intent whose acquire got no answer: (the version that
        acquire compared against, the record it replaced)}. If one landed, nothing was
        sent under it, so the record it replaced is put back; once the record moved
        past that version without it, it never can land. Several can be pending: a
        stale mirror lets the next flight try again before the first one shows."""
        self._orphans_seen: dict[str, tuple[int, float]] = {}
        self._clock = ProviderClock()
        self._presented: dict[str, tuple[str, float]] = {}
        """reuse_window only: customer -> (refresh fingerprint, local monotonic time this
        worker first presented it), to judge the window without any wall clock."""
        self._background: set[asyncio.Task[object]] = set()
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._settlers: dict[tuple[str, bool], asyncio.TimerHandle] = {}
        """(customer, a retry?) -> the pending timer that looks at its unknown outcome
        again: at most one retry and one end-of-grace look per customer."""
        self._unsettled: set[str] = set()
        self._grants: dict[str, int] = {}
        """Customer -> grants stored or deleted by this process (see _Section.grants)."""
        self._holds: dict[str, tuple[float, float]] = {}
        """Customer -> (the record's refresh_after, local monotonic end of its backoff)."""
        self.store.subscribe(self._on_store_change)

    def _check_timing(self) -> None:
        exchange = max(app.config.exchange_limit for app in self.apps.values())
        needed = self._request_limit()
        ttl = self.store.lease_ttl
        if ttl and ttl * 2 / 3 <= needed:
            # Keepalives every TTL/3 leave at least 2/3 of the TTL; a refresh
            # needs the whole request plus a margin of it, or it never starts.
            raise ConfigurationError(
                f"lease TTL {ttl:g}s is too short for token requests of up to {exchange:g}s "
                f"plus a margin of {self.policy.lease_margin:g}s: make it more than "
                f"{needed * 1.5:g}s")
        grace = self.policy.recovery_grace
        if self.policy.recovery == "introspect" and grace is not None and grace < needed:
            raise ConfigurationError(
                f"recovery_grace {grace:g}s is shorter than a token request can last "
                f"({needed:g}s): introspecting while it may still be processed reads "
                "'active' and leads to reuse")
        if self.policy.recovery == "reuse_window":
            latest = ttl + needed
            if self.policy.reuse_window <= latest:
                raise ConfigurationError(
                    f"reuse_window {self.policy.reuse_window:g}s cannot be met: a takeover "
                    f"can come {latest:g}s after the first request (lease TTL + request + "
                    "margin); shorten the lease or the timeout, or use 'introspect'")

    # -- hot path ----------------------------------------------------------

    async def token(self, customer: str) -> str:
        """A fresh access token for ``customer``.

        With a fresh token cached this does no I/O, takes no lock and (64 calls
        in 65) reads no clock. Raises :class:`~sfrtr.ReauthorizationRequired` if
        the grant is dead, :class:`~sfrtr.NotConnected` if there is none, and
        what a refresh can raise (:class:`~sfrtr.TokenEndpointUnavailable`,
        :class:`~sfrtr.CoordinationTimeout`, ...) when one was needed.
        """
        try:
            entry = self._cache[customer]
        except KeyError:
            return (await self._slow(customer, None)).token
        if entry.calls:
            entry.calls -= 1
            return entry.token
        if entry.vouch():
            return entry.token
        return (await self._slow(customer, entry)).token

    async def credentials(self, customer: str) -> Credentials:
        """Like :meth:`token`, with the instance URL the token is valid for."""
        try:
            entry = self._cache[customer]
        except KeyError:
            return (await self._slow(customer, None)).credentials
        if entry.calls:
            entry.calls -= 1
            return entry.credentials
        if entry.vouch():
            return entry.credentials
        return (await self._slow(customer, entry)).credentials

    async def refresh(self, customer: str, *, stale: str) -> Credentials:
        """Credentials newer than ``stale``, the access token that just got a 401.

        If someone already replaced ``stale``, returns the replacement without
        refreshing; otherwise refreshes exactly once for all such callers.
        Raises :class:`~sfrtr.SessionRefused` while a refreshed session of the
        customer was refused too (see :meth:`reject_session`).
        """
        entry = self._cache.get(customer)
        if entry is not None and entry.credentials.access_token != stale and \
                _monotonic() < entry.refresh_at:
            return entry.credentials
        if self.observer is None:
            return (await self._fly(customer, stale)).credentials
        return (await self._observe_wait(self._fly(customer, stale))).credentials

    async def reject_session(self, customer: str, access_token: str,
                             reason: str) -> SessionRefused:
        """Record that Salesforce refused ``access_token`` although it was just refreshed.

        A refresh cannot cure such a 401, and each one burns a rotation: no
        worker refreshes the customer for ``refused_backoff`` seconds. Returns
        the error to raise (the client raises it).
        """
        until = self._provider_now() + self.policy.refused_backoff
        current = await self.store.read(customer)
        if current is not None and not current.locked and \
                current.record.status is Status.VALID and \
                current.record.access_token.reveal() == access_token:
            with contextlib.suppress(StoreError):
                await self.store.commit(customer, current.version,
                                        protocol.refused_record(current.record, reason, until,
                                                               self.policy.refused_backoff))
        log.warning("customer %s: a refreshed session was refused (%s); no refresh for %.0fs",
                    customer, reason, self.policy.refused_backoff, extra=self._fields(customer))
        return SessionRefused(customer, reason, until)

    def _slow(self, customer: str, entry: _Entry | None) -> Awaitable[_Entry]:
        """What a caller without a fresh entry awaits: the customer's flight.

        Not a coroutine: in a storm every caller passes here, and each frame
        and bound method per caller is garbage the collector must walk while
        ten thousand callers wait (``docs/benchmarks.md``)."""
        if entry is not None and not entry.staggered and self._stagger(customer, entry):
            return _ready(entry)
        if entry is not None and self.policy.background_refresh and \
                _monotonic() < entry.expires_at:
            self._refresh_in_background(customer)
            return _ready(entry)
        joined = self._flights.join(customer, self._flight_fn, customer, None)
        return joined if self.observer is None else self._observe_wait(joined)

    def _stagger(self, customer: str, entry: _Entry) -> bool:
        """The entry's refresh time has come: a process later in line for the customer
        refreshes later (``refresh_stagger``), serving the still-valid session, so
        that the first one's new record usually arrives first. Applied once per entry,
        when its time first comes: the place in line is a hash over every live
        process, worth computing once per refresh, not on every record event."""
        entry.staggered = True
        if self._order is None or not self.policy.refresh_stagger:
            return False
        place, processes, _ = self._order(customer)
        if not place:
            return False
        entry.refresh_at += self.policy.refresh_margin * self.policy.refresh_stagger * \
            place / processes
        return entry.vouch()

    async def _observe_wait(self, joined: Awaitable[_Entry]) -> _Entry:
        started = time.perf_counter()
        try:
            return await joined
        finally:
            if self.observer is not None:
                self.observer.waited(time.perf_counter() - started)

    def observe(self, observer: Observer) -> None:
        """Report refreshes, provider calls and caller waits to ``observer`` (what
        :func:`sfrtr.telemetry.instrument` calls). The hot path stays as it is."""
        self.observer = observer
        flight = self._flight

        async def traced(customer: str, stale: str | None) -> _Entry:
            with observer.span("sfrtr.refresh", customer):
                return await flight(customer, stale)

        self._flight_fn = traced

    def _refresh_in_background(self, customer: str) -> None:
        if self._flights.in_flight(customer):
            if customer in self._unsettled:  # that flight may fail: look again later
                self._settle_later(customer, _STORE_RETRY_DELAY)
            return
        self._in_background(customer, self._fly(customer, None), settles=True)

    def _in_background(self, customer: str, work: Coroutine[object, object, object], *,
                       settles: bool = False) -> None:
        """Run ``work`` for ``customer`` beside the callers. ``settles``: it is a flight
        whose outcome decides whether an unknown outcome of ours is settled."""
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(functools.partial(self._background_done, customer, settles))

    def _background_done(self, customer: str, settles: bool, task: asyncio.Task[object]) -> None:
        self._background.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.warning("background refresh of %s failed: %s", customer, exc,
                        extra=self._fields(customer))
            self._retry_unstored(customer)
        # Only a flight's end settles a customer: a look for a lost acquire that found
        # nothing says nothing of the unknown outcome still in the record (seed
        # 740196656: it ended the settling while the record stayed indeterminate).
        if settles and customer in self._unsettled:
            if exc is None or isinstance(exc, ReauthorizationRequired | NotConnected |
                                          GrantSuspended | SessionRefused):
                self._unsettled.discard(customer)  # settled, one way or the other
            else:  # the store or the provider failed: try again until it settles
                self._settle_later(customer, _STORE_RETRY_DELAY)

    def _settle_later(self, customer: str, delay: float) -> None:
        """Drive an unknown outcome this worker left to its end, even if no caller
        comes back for the customer (every cache may still hold a fresh token).

        At most two timers per customer: a retry (the earliest asked for) and a look
        when a grace ends (the latest asked for: the time the outcome can first be
        settled). A timer per ask grew without bound through a long outage (each
        firing asking again while a flight ran); one per customer lost the end-of-
        grace look behind an earlier retry (sim seed 175424400)."""
        self._unsettled.add(customer)
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        key = (customer, delay <= _STORE_RETRY_DELAY)
        pending = self._settlers.get(key)
        if pending is not None and not pending.cancelled() and pending.when() > loop.time():
            if key[1] and pending.when() <= when:
                return  # an earlier retry is already due
            pending.cancel()
        self._settlers[key] = loop.call_at(when, self._settle_now, key)

    def _settle_now(self, key: tuple[str, bool]) -> None:
        self._settlers.pop(key, None)
        self._refresh_in_background(key[0])

    def _retry_unstored(self, customer: str) -> None:
        """After a failure, own unfinished business is retried in the background until
        the store takes it: tokens held only in memory, or an acquire whose answer was
        lost (its lock would otherwise stay ours, and every other worker wait on it,
        until this worker happens to need the customer again)."""
        pending = customer in self._unfinished or customer in self._unsent
        if not pending or customer in self._retries:
            return
        loop = _get_running_loop()
        if loop is None:
            return  # a flight's coroutine closed after its loop (never driven again)
        self._retries[customer] = loop.call_later(
            _STORE_RETRY_DELAY, self._retry_now, customer)

    def _retry_now(self, customer: str) -> None:
        del self._retries[customer]
        if customer in self._unsent and customer not in self._unfinished:
            # Only an acquire whose answer was lost is pending: look for it, but do
            # not refresh (a refresh is for a caller, or the background refresher).
            self._in_background(customer, self._look_for_unsent(customer))
            return
        self._refresh_in_background(customer)

    async def _look_for_unsent(self, customer: str) -> None:
        """Our acquire's answer was lost: if it landed, its lock holds every other
        worker and only we can release it. The store's view may lag (a slow watch),
        so look until the record shows our intent (reclaim it) or moves past the
        version that acquire compared against (it can never land: forget it)."""
        current = await self.store.read(customer)
        own = self._pending_intents(customer, current)
        if not own:
            return
        shown = current.record.intent.id if current is not None and \
            current.record.intent is not None else ""
        if shown in own:
            await self._fly(customer, None)  # plans a Reclaim
            return
        self._retry_unstored(customer)

    # -- grants ------------------------------------------------------------

    async def connect(self, customer: str, grant: TokenGrant) -> TokenRecord:
        """Store a customer's first grant (or a re-authorization), replacing any record."""
        if grant.refresh_token is None:
            raise InvalidTokenResponse("a grant without a refresh token cannot be stored")
        record = protocol.grant_record(grant, lifetime=self.policy.session_lifetime,
                                       grant_id=secrets.token_hex(8))
        self._grants[customer] = self._grants.get(customer, 0) + 1
        stored = await self.store.put(customer, record)
        self._cache_put(customer, stored.record, stored.version)
        log.info("customer %s connected (refresh %s)", customer, record.refresh_token.fingerprint,
                 extra=self._fields(customer, record.refresh_token))
        return stored.record

    async def disconnect(self, customer: str, *, revoke: bool = True) -> None:
        """Forget a customer's grant; revoke it at the provider first if asked."""
        # Read only to revoke: a record this worker cannot open (sealed under a key it
        # lacks) can still be deleted, unrevoked.
        current = None
        if revoke:
            try:
                current = await self.store.read(customer)
            except SealingError:
                log.warning("customer %s: the record does not open with this worker's keys; "
                            "deleting it without revoking the grant", customer,
                            extra=self._fields(customer))
        if current is not None and current.record.status is not Status.REAUTH_REQUIRED:
            try:
                await self._oauth_for(current.record).revoke(current.record.refresh_token)
            except OAuthError as exc:
                log.info("revoke for %s refused (%s); deleting anyway", customer, exc.error,
                         extra=self._fields(customer))
        self._grants[customer] = self._grants.get(customer, 0) + 1
        await self.store.delete(customer)
        self._uncache(customer)

    async def status(self, customer: str) -> Status | None:
        """The stored status of ``customer``'s grant (read from the store, not the
        cache), or ``None`` if it has none."""
        current = await self.store.read(customer)
        return None if current is None else current.record.status

    async def wait_idle(self) -> None:
        """Wait until background refreshes and refreshes in flight have finished."""
        while True:
            pending: list[asyncio.Future[object]] = [*self._background]
            if not pending and not len(self._flights):
                return
            if pending:
                await asyncio.wait(pending)
            await self._flights.wait_idle()

    async def __aenter__(self) -> TokenManager:
        """``async with TokenManager(...) as manager``: the manager, ready to use."""
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Close it (:meth:`aclose`), whether or not the block raised."""
        await self.aclose()

    def keep_alive(self, *, max_idle: float = 7 * 86_400.0, period: float = 3600.0,
                   rate: float = 1.0) -> asyncio.Task[None]:
        """Keep idle grants alive from this worker: an :class:`~sfrtr.IdleKeeper` in
        the background (safe in every worker: one pass per ``period`` runs across the
        fleet), refreshing each grant unused for ``max_idle`` seconds, at most
        ``rate`` refreshes per second. Stopped by :meth:`aclose`."""
        from sfrtr.keeper import IdleKeeper  # the keeper builds on the manager

        if self._keeper is not None and not self._keeper.done():
            raise ConfigurationError("this manager already keeps its grants alive")
        keeper = IdleKeeper(self, max_idle=max_idle, period=period, rate=rate)
        self._keeper = asyncio.get_running_loop().create_task(keeper.run(),
                                                              name="sfrtr-keeper")
        return self._keeper

    async def aclose(self) -> None:
        """Let refreshes in flight finish (they may hold burnt tokens), then close
        the store and the OAuth client."""
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.wait({self._keeper})  # a refresh it started finishes below
        # A hook may start a refresh (and a refresh fires hooks): wait for both until
        # neither has anything running, so no section is cut off by the store closing.
        for _ in range(10):
            await self.wait_idle()
            if not self.hooks.running:
                break
            await self.hooks.drain()
        for timer in [*self._settlers.values(), *self._retries.values()]:
            timer.cancel()
        for entry in self._cache.values():
            entry.retire()  # releases the hot-path timers; a later call reads the clock
        for customer, section in self._unfinished.items():
            if section.result is not None:
                log.error("customer %s: rotated tokens could not be stored before close; "
                          "they are lost (refresh %s)", customer,
                          section.result.refresh_token.fingerprint,
                          extra=self._fields(customer, section.result.refresh_token))
        await self.store.aclose()
        for app in self.apps.values():
            await app.aclose()

    # -- clocks and cache ----------------------------------------------------

    def _fields(self, customer: str, token: Secret | None = None) -> dict[str, str]:
        """Structured fields for a log record (``extra``): the customer, this worker
        and, for a log about a token, its fingerprint (never the token)."""
        fields = {"customer": customer, "worker": self.worker_id}
        if token is not None:
            fields["token_fingerprint"] = token.fingerprint
        return fields

    def _oauth_for(self, record: TokenRecord) -> OAuthClient:
        """The OAuth client for a grant's own app and login host (records written
        before grants remembered them: the manager's own)."""
        app = self.oauth if not record.client_id else self.apps.get(record.client_id)
        if app is None:
            raise ConfigurationError(
                f"this grant belongs to connected app {record.client_id!r}, which this "
                "manager was not given: TokenManager(..., apps=[OAuthClient(...)])")
        host = record.token_host
        if not host or host == app.config.login_url.rstrip("/"):
            return app
        key = (app.config.client_id, host)
        client = self._hosts.get(key)
        if client is None:
            client = self._hosts[key] = app.for_host(host)
        return client

    def _provider_now(self) -> float:
        """Now on the provider's clock: expiry never depends on agreeing with it."""
        return self._clock.now()

    def _on_store_change(self, customer: str, state: Versioned | None) -> None:
        """Keep the hot-path cache in step with the store, whoever wrote it; and see
        that an unknown outcome gets settled even if its writer died."""
        if state is None or state.record.status in (Status.REAUTH_REQUIRED, Status.SUSPENDED):
            self._uncache(customer)
        elif state.record.status is Status.VALID:
            current = self._cache.get(customer)
            # A mirror may tell one write twice (a Txn's record and lock events, a
            # reload): the entry of that version stays, with its timer, its place in
            # line and any expiry learned since.
            if current is None or current.version < state.version:
                self._cache_put(customer, state.record, state.version)
        elif state.record.status is Status.INDETERMINATE and \
                customer not in self._unsettled and _get_running_loop() is not None:
            # An unknown outcome. Its writer settles it once the grace has passed, but
            # it may be dead, and every other worker may still hold a fresh access
            # token, so no caller would come (invariant 5: settled within a bound after
            # the fault; seed 190602359). Look once the writer would have settled it,
            # lease included: a flight that finds it settled only reads it. (Whether
            # the lock is still shown does not matter: a mirror may show the commit's
            # record before the lock's deletion, or never notify the deletion alone.)
            self._settle_later(customer, self._grace(orphan=True, intent=state.record.intent))

    def _cache_put(self, customer: str, record: TokenRecord, version: int) -> _Entry:
        now_mono = _monotonic()
        expires_in = record.expires_at - self._provider_now()
        entry = _Entry(
            Credentials(record.access_token.reveal(), record.instance_url),
            refresh_at=now_mono + expires_in - self.policy.refresh_margin,
            expires_at=now_mono + expires_in, version=version)
        current = self._cache.get(customer)
        if current is None or current.version <= version:
            self._cache[customer] = entry
            if current is not None:
                current.retire()
        return entry

    def _uncache(self, customer: str) -> None:
        entry = self._cache.pop(customer, None)
        if entry is not None:
            entry.retire()

    # -- flights ---------------------------------------------------------------

    async def _fly(self, customer: str, stale: str | None) -> _Entry:
        # One flight per customer. A caller that joined a flight started for
        # another question ("fresh enough?" rather than "newer than mine?") and
        # got its own stale token back asks again.
        while True:
            entry = await self._flights.join(customer, self._flight_fn, customer, stale)
            if stale is None or entry.token != stale:
                return entry

    async def _flight(self, customer: str, stale: str | None) -> _Entry:
        deadline = _monotonic() + self.policy.wait_timeout
        spread = self._spread
        handoff = self.policy.handoff if self._order is not None else 0.0
        while True:
            current = await self.store.read(customer)
            if current is not None:
                self._oauth_for(current.record)  # an app this manager lacks: say so, lock nothing
            section = self._unfinished.get(customer)
            own = self._pending_intents(customer, current)
            if section is not None:
                own = (*own, section.intent.id)
            step = protocol.plan(customer, current, stale=stale, now=self._provider_now(),
                                 margin=self.policy.refresh_margin, own_intents=own,
                                 held_back=self._held_back(customer, current))
            if section is not None and not isinstance(step, protocol.Reclaim):
                # Our unfinished section's intent is gone from the store: someone
                # moved on. Tokens we still hold go to rescue; nothing else to do.
                await self._drop_section(customer, section, current)
                continue
            if not isinstance(step, protocol.Recover):
                self._orphans_seen.pop(customer, None)
            if isinstance(step, protocol.Use):
                if stale is not None:
                    self.stats.adopted += 1
                # An acquire of ours whose answer was lost may still show up (the
                # mirror may lag): if it landed, its lock holds every other worker
                # until we reclaim it, and nobody else can. Keep looking.
                self._retry_unstored(customer)
                return self._cache_put(customer, step.record, step.version)
            if isinstance(step, protocol.Fail):
                self._uncache(customer)
                self._retry_unstored(customer)
                raise step.error
            assert current is not None
            if isinstance(step, protocol.Wait):
                self.stats.waits += 1
                await self._wait(customer, current, deadline)
                continue
            if isinstance(step, protocol.Reclaim):
                await self._reclaim(customer, current)
                continue
            if isinstance(step, protocol.Recover):
                left = self._grace_left(customer, step, current.record.intent)
                if left > 0:
                    await self._wait(customer, current, deadline, cap=left)
                    continue
            if handoff and isinstance(step, protocol.Redeem):
                urgent = stale is not None or \
                    current.record.expires_at <= self._provider_now()
                waited, handoff = handoff, 0.0
                order = self._order(customer) if urgent and self._order else None
                if order is not None and order.place and order.known and \
                        _monotonic() < deadline:
                    # Every process may need this customer right now (its session
                    # ended early): the first in line (the process that refreshed it
                    # last, so one that uses it) sends the acquire, the others give
                    # its lock a moment to reach them, then wait on it. (Not past the
                    # flight's deadline: a customer found free then is refreshed.)
                    await self._wait(customer, current, deadline, cap=waited)
                    continue
            if spread and isinstance(step, protocol.Redeem):
                # Other processes may want this customer at this very moment: a short
                # random pause lets the first one's lock reach this mirror, so this
                # worker waits on it instead of sending an acquire that cannot win.
                await asyncio.sleep(self._spread_rng.random() * spread)
                spread = 0.0
                continue
            entry = await self._run_section(customer, step, current)
            if entry is not None:
                return entry

    def _held_back(self, customer: str, current: Versioned | None) -> bool:
        """Whether a backoff written into the record still runs by this worker's own
        monotonic clock, counted from when it first saw it. ``refresh_after`` is on
        the provider's clock as its writer measured it; a worker whose clock is off
        (and has had no answer to measure it by) must not cut the backoff short."""
        if current is None or not current.record.refresh_after:
            self._holds.pop(customer, None)
            return False
        after = current.record.refresh_after
        hold = self._holds.get(customer)
        if hold is None or hold[0] != after:
            hold = (after, _monotonic() + current.record.backoff)
            self._holds[customer] = hold
        return _monotonic() < hold[1]

    def _pending_intents(self, customer: str, current: Versioned | None) -> tuple[str, ...]:
        """Ids of our acquires whose answers were lost and that may still show up;
        those whose compare can never hold again are forgotten."""
        pending = self._unsent.get(customer)
        if not pending:
            return ()  # shared: a flight keeps it alive while it waits
        shown = current.record.intent.id if current is not None and \
            current.record.intent is not None else ""
        version = current.version if current is not None else 0
        for intent_id, (expected, _) in list(pending.items()):
            if intent_id != shown and version != expected:
                del pending[intent_id]
        if not pending:
            del self._unsent[customer]
        return tuple(pending)

    def _grace_left(self, customer: str, step: protocol.Recover,
                    intent: Intent | None) -> float:
        """Seconds before an orphaned or indeterminate record may be settled, timed
        on the local monotonic clock from when this worker first saw it."""
        seen = self._orphans_seen.get(customer)
        if seen is None or seen[0] != step.version:
            seen = (step.version, _monotonic())
            self._orphans_seen[customer] = seen
        return seen[1] + self._grace(orphan=step.orphan, intent=intent) - _monotonic()

    def _grace(self, *, orphan: bool, intent: Intent | None = None) -> float:
        """How long no request presented under the record's intent can still be in
        flight (the writer's own limit when it declared one: fleets are not always
        configured alike), plus, for an orphan, a lease TTL: its writer may still
        commit, which is cheaper than a takeover."""
        settle = max(self._request_limit(), intent.limit if intent is not None else 0.0)
        configured = self.policy.recovery_grace
        if configured is None:
            grace = self.store.lease_ttl + settle if orphan else settle
        else:
            grace = configured if orphan else min(configured, settle)
        if self.policy.recovery != "fail_closed":
            # Never introspect, nor present again, while a request may be in flight.
            grace = max(grace, settle)
        return grace

    async def _wait(self, customer: str, seen: Versioned, deadline: float,
                    cap: float | None = None) -> None:
        remaining = deadline - _monotonic()
        if remaining <= 0:
            # Whatever holds the customer up (a slow holder, an orphan whose grace is
            # not over) is watched from the background until it settles, even if no
            # caller comes back for it.
            self._settle_later(customer, _STORE_RETRY_DELAY)
            raise CoordinationTimeout(
                f"gave up after {self.policy.wait_timeout:.0f}s waiting for the refresh of "
                f"customer {customer!r} by another worker")
        await self.store.wait_for_change(
            customer, seen.stamp, remaining if cap is None else min(cap, remaining))

    async def _run_section(self, customer: str, step: protocol.Step,
                           current: Versioned) -> _Entry | None:
        """Run the critical section in the flight's task: from the acquire on, a
        refresh token may get burnt, and nothing may stop the section before its
        outcome is stored. A caller's cancellation never reaches the flight; a
        cancel of the flight's task by another task is held until the section
        ends (:mod:`sfrtr.flight_task`)."""
        task = asyncio.current_task()
        flight = task if isinstance(task, FlightTask) else None
        if flight is not None:
            flight.enter_critical()
        entry = None
        try:
            entry = await self._section(customer, step, current)
            return entry
        except _Preempted:
            self._retry_unstored(customer)
            return None
        except BaseException:
            self._retry_unstored(customer)
            raise
        finally:
            if flight is not None:
                # A token stored: a cancel held meanwhile has nothing left to stop, and
                # the callers (some may have joined after it) get the token. Otherwise
                # the flight would plan again: the cancel ends it.
                flight.leave_critical(deliver=entry is None)

    # -- the critical section ---------------------------------------------------

    def _intent(self, record: TokenRecord) -> Intent:
        # On the provider's clock, once an answer told us how far ours is off;
        # 0 (unknown) before that: a reuse window is never judged on a guess.
        started = self._clock.earliest() if self._clock.known else 0.0
        earlier = record.intent
        if earlier is not None and earlier.refresh_fingerprint == record.refresh_token.fingerprint:
            # Recovering the same token: it may have been presented since the first
            # intent, and a provider's reuse window counts from then.
            started = min(started, earlier.started_at)
        return Intent(worker=self.worker_id,
                      refresh_fingerprint=record.refresh_token.fingerprint,
                      started_at=started, id=secrets.token_hex(8),
                      limit=self._request_limit())

    def _request_limit(self) -> float:
        """The longest a token request of this worker can last, margin included."""
        return max(app.config.exchange_limit for app in self.apps.values()) + \
            self.policy.lease_margin

    def _budget(self, section: _Section, window_end: float | None) -> float | None:
        """Seconds the section can vouch for a request starting now: its own lease's
        (not whatever lease the process holds now: a re-granted one does not hold
        this lock), and the provider's reuse window when presenting inside it."""
        if section.customer and self._grants.get(section.customer, 0) != section.grants:
            return 0.0  # re-authorized or disconnected here since: the lock is gone
        if holding_a_cancel():
            return 0.0  # asked to stop while it waited for a request slot: send nothing
        lease = self.store.lease_remaining(section.intent.lease or None)
        left = None if lease is None else lease - self.policy.lease_margin
        if window_end is not None:
            window = window_end - _monotonic()
            left = window if left is None else min(left, window)
        return left

    async def _section(self, customer: str, step: protocol.Step,
                       current: Versioned) -> _Entry | None:
        intent = self._intent(current.record)
        grants = self._grants.get(customer, 0)
        # Until the acquire's answer says otherwise, it may have landed unseen.
        pending = self._unsent.setdefault(customer, {})
        pending[intent.id] = (current.version, current.record)
        try:
            acquired = await self.store.acquire(customer, current.version, intent)
        except LeaseLost:
            self._forget_unsent(customer, intent.id)  # etcd refused the write: nothing landed
            raise
        self._forget_unsent(customer, intent.id)
        if acquired is None:
            return None  # lost the race; plan again
        held = current.record
        if isinstance(step, protocol.Recover | protocol.Revive):
            held = protocol.released_record(current.record)
        landed = acquired.record.intent if acquired.record.intent is not None else intent
        section = _Section(landed, current.record, held, acquired.version,
                           customer=customer, grants=grants)
        del acquired  # not kept alive through the wait for a slot
        self._unfinished[customer] = section
        try:
            if isinstance(step, protocol.Revive):
                return await self._revive(customer, section, current.record)
            if isinstance(step, protocol.Recover):
                return await self._recover(customer, section, current.record)
            return await self._redeem(customer, section)
        except _Preempted:
            self._finished(customer, section)
            raise

    def _forget_unsent(self, customer: str, intent_id: str) -> None:
        pending = self._unsent.get(customer)
        if pending is not None:
            pending.pop(intent_id, None)
            if not pending:
                del self._unsent[customer]

    def _finished(self, customer: str, section: _Section) -> None:
        if self._unfinished.get(customer) is section:
            del self._unfinished[customer]

    async def _commit(self, customer: str, section: _Section,
                      record: TokenRecord) -> Versioned:
        """Write ``record`` at the section's fence (patiently); :class:`_Preempted`
        if the fence was lost. The section is finished once this returns."""
        started = _monotonic()
        try:  # the first try without _durably's closure and frame: the usual case
            committed = await self.store.commit(customer, section.fence, record)
        except StoreError as exc:
            committed = await self._durably(
                lambda: self.store.commit(customer, section.fence, record),
                failed=exc, started=started)
        if committed is None:
            # A retried commit whose first attempt landed (its answer lost) finds the
            # version moved by its own write: that is this commit, not a takeover, and
            # the transition it made is this worker's to report (hooks, cache, errors).
            committed = await self._landed(customer, record)
            if committed is None:
                raise _Preempted
        self._finished(customer, section)
        return committed

    async def _landed(self, customer: str, record: TokenRecord) -> Versioned | None:
        """The stored state if it is exactly ``record`` (our own write), else ``None``."""
        try:
            current = await self.store.read(customer)
        except StoreError:
            return None  # unknown is not ours: the caller goes on as fenced out
        if current is None or current.locked or current.record != record:
            return None
        return current

    async def _durably(self, write: Callable[[], Awaitable[T]], *,
                       failed: StoreError | None = None, started: float | None = None) -> T:
        """Retry a write of the critical section while the store is unreachable.

        These writes carry rotated tokens, or release a lock: giving up at the
        first network error would lose a token that exists nowhere else. When
        patience runs out the section stays unfinished and is retried later.
        ``failed``: the first attempt was made by the caller, begun at ``started``
        (patience counts from then), and failed so.
        """
        deadline = (_monotonic() if started is None else started) + self.policy.store_patience
        delay = 0.1
        error = failed
        while True:
            if error is None:
                try:
                    return await write()
                except StoreError as exc:
                    error = exc
            if _monotonic() + delay > deadline:
                log.error("store write failed for %.0fs (%s); kept in memory, retrying "
                          "in the background", self.policy.store_patience, error)
                raise error
            log.warning("store write failed (%s); retrying in %.1fs", error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            error = None

    async def _redeem(self, customer: str, section: _Section, *, retry: bool = False,
                      window_end: float | None = None) -> _Entry | None:
        """Present ``section.held.refresh_token`` (the lock is ours at the fence) and
        store whatever came of it. ``retry``: the token may have been presented
        before (a recovery); ``window_end``: the monotonic time its provider reuse
        window closes, which the whole request must fit in."""
        held = section.held
        fp = held.refresh_token.fingerprint
        if log.isEnabledFor(logging.DEBUG):  # not a dict of fields per refresh for nothing
            log.debug("redeeming refresh %s for %s", fp, customer,
                      extra=self._fields(customer, held.refresh_token))
        if self.policy.recovery == "reuse_window" and not retry:
            # This worker presents the token first: the window cannot open earlier.
            self._presented[customer] = (fp, _monotonic())
        sent = self._clock.local()
        budget = functools.partial(self._budget, section, window_end)
        observer = self.observer
        if observer is None:
            outcome = await self._oauth_for(held).refresh(held.refresh_token, budget=budget)
        else:
            started = time.perf_counter()
            with observer.span("sfrtr.provider_call", customer):
                outcome = await self._oauth_for(held).refresh(held.refresh_token, budget=budget)
            observer.provider_call(time.perf_counter() - started, outcome.kind.value)
        if outcome.kind is OutcomeKind.NOT_SENT:
            # Put back what the acquire replaced: for a recovery that is the orphan or
            # the indeterminate outcome, not a "valid" record whose token may be burnt.
            await self._commit(customer, section, section.prior)
            if holding_a_cancel():
                raise asyncio.CancelledError  # not sent because it was asked to stop
            raise _untouched_error(customer, outcome)
        section.sent = True
        self.stats.redemptions += 1
        if outcome.kind is OutcomeKind.OK:
            assert outcome.grant is not None
            self._clock.learn(sent, self._clock.local(), outcome.grant.issued_at)
            record = protocol.refreshed_record(held, outcome.grant,
                                               lifetime=self.policy.session_lifetime)
            section.result = record
            return await self._store_new(customer, section, record)
        if outcome.kind is OutcomeKind.INVALID and outcome.salvaged is not None:
            until = self._provider_now() + self.policy.refused_backoff
            reason = (f"a refresh answer was refused ({outcome.description}); its new refresh "
                      "token was kept: fix the configuration, no re-authorization is needed")
            record = protocol.suspended_record(held, outcome.salvaged, reason, until,
                                               self.policy.refused_backoff)
            section.result = record
            await self._store_new(customer, section, record)
            raise GrantSuspended(customer, reason, until)
        if outcome.kind is OutcomeKind.REJECTED:
            return await self._rejected(customer, section, outcome)
        if outcome.kind is OutcomeKind.BUSY:
            # Someone else is redeeming this very token: give a writer among us
            # the chance to show up before calling the outcome unknown.
            await asyncio.sleep(self.policy.busy_backoff)
            adopted = protocol.adoptable_after_rejection(held, await self.store.read(customer))
            if adopted is not None:
                self._finished(customer, section)
                self.stats.adopted += 1
                return self._cache_put(customer, adopted.record, adopted.version)
            return await self._ambiguous(
                customer, section, "another client redeemed the same refresh token "
                "concurrently (token request is already being processed)", retry=retry)
        return await self._ambiguous(
            customer, section,
            f"the refresh request got no usable answer ({outcome.error}); "
            "the rotated refresh token may be lost", retry=retry)

    async def _store_new(self, customer: str, section: _Section,
                         record: TokenRecord) -> _Entry | None:
        """Commit rotated tokens; if fenced out, keep them as a rescue and return
        ``None`` (the flight plans again: the rescue may revive a dead record)."""
        try:
            committed = await self._commit(customer, section, record)
        except _Preempted:
            if await self._is_stored(customer, record):
                self._finished(customer, section)
                return None
            await self._durably(lambda: self.store.save_rescue(customer, section.fence, record))
            self._finished(customer, section)
            self.stats.rescued += 1
            log.warning("commit for %s was fenced out; tokens kept as rescue %d",
                        customer, section.fence, extra=self._fields(customer, record.refresh_token))
            return None
        if record.status is not Status.VALID:
            return None
        self.hooks.refreshed(customer, record.generation)
        entry = self._cache.get(customer)
        if entry is None or entry.version != committed.version:
            # The store's change callback usually cached this very version already.
            entry = self._cache_put(customer, record, committed.version)
        if self.policy.learn_expiry and not holding_a_cancel():  # asked to stop: no request
            await self._learn_expiry(customer, record, committed.version)
        return entry

    async def _is_stored(self, customer: str, record: TokenRecord) -> bool:
        """Whether ``record``'s tokens are what the store holds (a retried commit
        whose first attempt landed although its answer was lost)."""
        try:
            current = await self.store.read(customer)
        except StoreError as exc:
            # Unknown is not stored: a record this worker cannot read (sealed under a
            # key it lacks, say) must not stand between fenced-out tokens and their
            # rescue. A rescue of tokens that did land is dropped as not newer.
            log.warning("customer %s: cannot read the record after a fenced-out commit "
                        "(%s); keeping the tokens as a rescue", customer, type(exc).__name__,
                        extra=self._fields(customer))
            return False
        return current is not None and current.record.refresh_token == record.refresh_token \
            and current.record.access_token == record.access_token

    async def _learn_expiry(self, customer: str, record: TokenRecord, version: int) -> None:
        try:
            info = await self._oauth_for(record).introspect(record.access_token,
                                                            hint="access_token")
        except SfrtrError as exc:
            log.info("expiry introspection for %s failed (%s); keeping the estimate",
                     customer, type(exc).__name__, extra=self._fields(customer))
            return
        if info.active and info.expires_at is not None:
            self._cache_put(customer, record.replace(expires_at=info.expires_at), version)

    async def _rejected(self, customer: str, section: _Section,
                        outcome: RefreshOutcome) -> _Entry:
        adopted = protocol.adoptable_after_rejection(section.held,
                                                     await self.store.read(customer))
        if adopted is not None:
            self._finished(customer, section)
            self.stats.adopted += 1
            return self._cache_put(customer, adopted.record, adopted.version)
        reason = f"refresh token rejected: {outcome.description or outcome.error}"
        if self.policy.recovery != "fail_closed":
            # invalid_grant also says "IP restricted or invalid login hours" or "user is
            # locked": the token is refused *now*, not dead. Only an inactive token
            # justifies a re-authorization; an active one is held back for a while.
            try:
                info = await self._oauth_for(section.held).introspect(
                    section.held.refresh_token)
            except SfrtrError:
                info = None
            if info is not None and info.active:
                until = self._provider_now() + self.policy.refused_backoff
                await self._commit(customer, section, protocol.held_back_record(
                    section.held, f"refresh refused, token still active: {reason}", until,
                    self.policy.refused_backoff))
                raise GrantSuspended(customer, reason, until)
        return await self._mark_dead(customer, section, reason, ReauthorizationRequired)

    async def _mark_dead(self, customer: str, section: _Section, reason: str,
                         error: type[ReauthorizationRequired]) -> _Entry:
        await self._commit(customer, section, protocol.dead_record(section.held, reason))
        self.stats.reauth_marked += 1
        self.hooks.reauth_required(customer, reason)
        self._uncache(customer)
        log.warning("customer %s must re-authorize: %s", customer, reason,
                    extra=self._fields(customer, section.held.refresh_token))
        raise error(customer, reason)

    async def _ambiguous(self, customer: str, section: _Section, reason: str, *,
                         retry: bool) -> _Entry | None:
        """A redemption whose outcome is unknown; the recovery policy decides."""
        mode = self.policy.recovery
        if mode == "fail_closed":
            return await self._mark_dead(customer, section, reason, RefreshIndeterminate)
        # introspect and reuse_window alike: settled by recovery once the request can
        # no longer be in flight (presenting it again while it may still be processed
        # is a concurrent redemption, refused as such or worse).
        await self._leave_indeterminate(customer, section, reason)
        raise TokenEndpointUnavailable(
            f"the refresh of {customer!r} has an unknown outcome ({reason}); it is settled "
            "once no request can still be in flight "
            f"(about {self._grace(orphan=False):.0f}s)")

    async def _leave_indeterminate(self, customer: str, section: _Section,
                                   reason: str) -> None:
        record = protocol.indeterminate_record(
            section.held.replace(intent=section.intent), reason)
        await self._commit(customer, section, record)
        if section.prior.status is Status.VALID:
            # This worker's own redemption went unanswered: the risk starts here. (A
            # recovery that cannot settle yet, whose acquire replaced an orphan or an
            # indeterminate record, re-records a risk already reported.)
            self.hooks.lockout_risk(customer, reason)
        # Settle it even if no caller comes back for it (every cache may still hold a
        # fresh access token): a background flight once the grace has passed.
        self._settle_later(customer, self._grace(orphan=False, intent=section.intent) + 1.0)

    async def _recover(self, customer: str, section: _Section,
                       orphan: TokenRecord) -> _Entry | None:
        """We hold the lock over an orphaned intent or an indeterminate outcome, and
        no request presented under it can still be in flight."""
        self.stats.recoveries += 1
        told = orphan.intent.id if orphan.intent is not None else ""
        if orphan.status is Status.REFRESHING and told not in self._risks_told:
            # A holder vanished mid-refresh and told nobody: this worker is the first
            # to know (an indeterminate record was reported by the worker that wrote
            # it); once per orphaned intent, however many rounds its recovery takes.
            self._risks_told[told] = None
            while len(self._risks_told) > 1000:
                del self._risks_told[next(iter(self._risks_told))]
            self.hooks.lockout_risk(customer, "a refresh by worker "
                                    f"{orphan.intent.worker if orphan.intent else 'unknown'} "
                                    "was interrupted; recovering it")
        adopted = await self._take_rescue(customer, section, orphan)
        if adopted is not None:
            return adopted
        worker = orphan.intent.worker if orphan.intent else "unknown"
        lost = (f"a refresh by worker {worker} was interrupted and the refresh token was "
                "rotated: its successor is lost")
        # An indeterminate record's reason says what was unknown; any other reason
        # a record carries (a refused session's, say) says nothing about this loss.
        unknown = orphan.reason if orphan.status is Status.INDETERMINATE and orphan.reason \
            else f"a refresh by worker {worker} was interrupted; the rotated refresh " \
            "token may be lost"
        mode = self.policy.recovery
        if mode == "fail_closed":
            return await self._mark_dead(customer, section, unknown,
                                         RefreshIndeterminate)
        window_end = self._reuse_window_end(customer, orphan) if mode == "reuse_window" \
            else None
        if window_end is not None:
            # The rotation (if any) came after the first presentation: still inside the
            # provider's window (for the whole request: the budget checks it after any
            # queueing), presenting the token again returns its successor.
            return await self._redeem(customer, section, retry=True, window_end=window_end)
        # introspect, and reuse_window outside its window (or with no clock to tell):
        # ask the provider, now that no request presented under the intent can be
        # in flight.
        try:
            info = await self._oauth_for(section.held).introspect(section.held.refresh_token)
        except SfrtrError as exc:
            # Unknown is not inactive: never redeem, never declare it dead.
            await self._leave_indeterminate(customer, section, unknown)
            raise TokenEndpointUnavailable(
                f"cannot settle an interrupted refresh for {customer!r} yet "
                f"({type(exc).__name__}); will retry") from None
        if info.active:  # never redeemed, and no request can still redeem it
            return await self._redeem(customer, section, retry=True)
        return await self._mark_dead(customer, section, lost, RefreshIndeterminate)

    def _reuse_window_end(self, customer: str, orphan: TokenRecord) -> float | None:
        """When (local monotonic) the provider's reuse window certainly closes for the
        token ``orphan`` holds, or ``None`` if it may be closed already (or nobody can
        tell). Counted from the token's first presentation: on this worker's
        monotonic clock if it made it, else from the first intent's start on the
        provider's clock, judged as late as it can be."""
        limit = self.policy.reuse_window - self.policy.lease_margin
        fp, first = self._presented.get(customer, ("", 0.0))
        if fp == orphan.refresh_token.fingerprint:
            age = _monotonic() - first
        elif orphan.intent is not None and orphan.intent.started_at > 0 and self._clock.known:
            age = self._clock.latest() - orphan.intent.started_at
        else:
            return None
        if age >= limit:
            return None
        return _monotonic() + (limit - age)

    async def _revive(self, customer: str, section: _Section, dead: TokenRecord) -> _Entry:
        """A dead record with rescues: adopt one of this grant, or drop them all."""
        adopted = await self._take_rescue(customer, section, dead)
        if adopted is not None:
            return adopted
        await self._commit(customer, section, dead)  # release the lock, still dead
        raise ReauthorizationRequired(customer, dead.reason)

    async def _take_rescue(self, customer: str, section: _Section,
                           stored: TokenRecord) -> _Entry | None:
        """Adopt the rescue that holds this grant's newest tokens, if any, and drop
        the entries that can never help (another grant's, or older ones)."""
        rescues = await self.store.rescues(customer)
        picked = protocol.pick_rescue(stored, rescues)
        entry: _Entry | None = None
        newest = stored.generation
        if picked is not None:
            rescue_fence, rescued = picked
            newest = rescued.generation
            record = protocol.released_record(rescued)
            committed = await self._commit(customer, section, record)
            self.stats.rescues_adopted += 1
            log.warning("customer %s: adopted rescued tokens (fence %d)", customer, rescue_fence,
                        extra=self._fields(customer, record.refresh_token))
            if record.status is Status.VALID:
                self.hooks.refreshed(customer, record.generation)
                entry = self._cache_put(customer, record, committed.version)
        for fence, old in rescues:
            if old.grant_id != stored.grant_id or old.generation <= newest:
                await self._drop_rescue(customer, fence)
        if picked is not None and entry is None:
            raise _Preempted  # adopted a suspended grant: plan again (it fails clearly)
        return entry

    async def _drop_rescue(self, customer: str, fence: int) -> None:
        await self._durably(lambda: self.store.drop_rescue(customer, fence))

    # -- own unfinished business --------------------------------------------------

    async def _reclaim(self, customer: str, current: Versioned) -> None:
        """The store shows our own intent from a section that ended early: finish it.

        Nothing sent: the record the acquire replaced goes back exactly as it was (it
        may itself be an orphan or an indeterminate outcome: "releasing" it as valid
        would present a token that may be burnt)."""
        record = current.record
        mine = record.intent.id if record.intent is not None else ""
        section = self._unfinished.get(customer)
        unsent = self._unsent.get(customer, {}).get(mine)
        if section is not None and section.intent.id == mine:
            if section.result is not None:
                target = section.result
            elif section.sent:
                target = (protocol.dead_record(section.held, "a refresh got no answer")
                          if self.policy.recovery == "fail_closed" else
                          protocol.indeterminate_record(record, "a refresh got no answer"))
            else:
                target = section.prior
        elif unsent is not None:
            target = unsent[1]  # an acquire whose answer was lost
        else:
            return
        committed = await self.store.commit(customer, current.version, target)
        if committed is None:
            return  # the record moved on: plan again
        self.stats.reclaimed += 1
        if section is not None and target is section.result and \
                target.status is Status.VALID:
            self.hooks.refreshed(customer, target.generation)  # stored by this reclaim
        if target.status is Status.REAUTH_REQUIRED:
            self.hooks.reauth_required(customer, target.reason)
        elif target.status is Status.INDETERMINATE:
            self.hooks.lockout_risk(customer, target.reason)
        if section is not None and section.intent.id == mine:
            self._finished(customer, section)
        if unsent is not None:
            self._forget_unsent(customer, mine)
        if target.status is Status.VALID and target.intent is None:
            self._cache_put(customer, target, committed.version)

    async def _drop_section(self, customer: str, section: _Section,
                            current: Versioned | None) -> None:
        stored = current.record.refresh_token if current is not None else None
        if section.result is not None and stored != section.result.refresh_token:
            await self.store.save_rescue(customer, section.fence, section.result)
            self.stats.rescued += 1
        self._finished(customer, section)


async def _ready(entry: _Entry) -> _Entry:
    return entry


def _untouched_error(customer: str, outcome: RefreshOutcome) -> SfrtrError:
    if outcome.error == LEASE_TOO_SHORT:
        return LeaseLost(f"not enough time to refresh customer {customer!r} safely "
                         f"({outcome.description})")
    if outcome.error in _CONFIG_ERRORS:
        return ConfigurationError(
            f"token endpoint refused the client: {outcome.error} {outcome.description}".strip())
    return TokenEndpointUnavailable(
        f"could not reach the token endpoint for {customer!r} ({outcome.error})")


__all__ = ["Credentials", "ManagerStats", "TokenManager"]
