"""The token manager: fresh access tokens for many customers, refreshed safely.

The hot path (:meth:`TokenManager.token` with a fresh token) is a dict
lookup and a clock comparison: no I/O, no lock. Everything else goes through
one in-flight refresh per customer (singleflight) which follows the protocol
of ``docs/protocol.md`` against the configured store.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import anyio

from sfrtr import protocol
from sfrtr.errors import (
    ConfigurationError,
    CoordinationTimeout,
    InvalidTokenResponse,
    LeaseLost,
    OAuthError,
    ReauthorizationRequired,
    RefreshIndeterminate,
    SfrtrError,
    StoreError,
    TokenEndpointUnavailable,
)
from sfrtr.oauth.client import OAuthClient
from sfrtr.oauth.grant import TokenGrant
from sfrtr.oauth.outcome import OutcomeKind, RefreshOutcome
from sfrtr.policy import RefreshPolicy
from sfrtr.records import Intent, Status, TokenRecord, Versioned
from sfrtr.secret import fingerprint
from sfrtr.singleflight import Singleflight
from sfrtr.store.base import TokenStore
from sfrtr.store.memory import MemoryStore

T = TypeVar("T")
log = logging.getLogger("sfrtr.manager")
_monotonic = time.monotonic  # a module global: one lookup less on the hot path

#: Client-side OAuth errors that mean our configuration is wrong, not the grant.
_CONFIG_ERRORS = frozenset({"invalid_client", "invalid_client_id", "unsupported_grant_type",
                            "invalid_request"})


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
    """

    __slots__ = ("credentials", "expires_at", "generation", "refresh_at", "token")

    def __init__(self, credentials: Credentials, refresh_at: float, expires_at: float,
                 generation: int) -> None:
        self.credentials = credentials
        self.token = credentials.access_token
        self.refresh_at = refresh_at
        self.expires_at = expires_at
        self.generation = generation


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


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class TokenManager:
    """Hands out access tokens per customer; refreshes each at most once at a time.

    One manager per process is the intended shape: it owns the cache that the
    hot path reads and the singleflight group that coalesces refreshes.
    """

    def __init__(self, oauth: OAuthClient, store: TokenStore | None = None,
                 policy: RefreshPolicy | None = None, *, worker_id: str | None = None) -> None:
        self.oauth = oauth
        self.store: TokenStore = store if store is not None else MemoryStore()
        self.policy = policy or RefreshPolicy()
        self.worker_id = worker_id or default_worker_id()
        needed = self.oauth.config.timeout + self.policy.lease_margin
        if self.store.lease_ttl and self.store.lease_ttl * 2 / 3 <= needed:
            # Keepalives every TTL/3 leave at least 2/3 of the TTL; a refresh
            # needs the provider timeout plus a margin of it, or it never starts.
            raise ConfigurationError(
                f"lease TTL {self.store.lease_ttl:g}s is too short for a provider timeout of "
                f"{self.oauth.config.timeout:g}s: make it more than {needed * 1.5:g}s")
        self.stats = ManagerStats()
        self._cache: dict[str, _Entry] = {}
        self._flights: Singleflight[tuple[str, str | None], _Entry] = Singleflight()
        self._orphans_seen: dict[tuple[str, int], float] = {}
        self._background: set[asyncio.Task[object]] = set()
        self.store.subscribe(self._on_store_change)

    # -- hot path ----------------------------------------------------------

    async def token(self, customer: str) -> str:
        """A fresh access token for ``customer``.

        Raises :class:`~sfrtr.ReauthorizationRequired` if the grant is dead,
        :class:`~sfrtr.NotConnected` if there is none.
        """
        entry = self._cache.get(customer)
        if entry is not None and _monotonic() < entry.refresh_at:
            return entry.token
        return (await self._slow(customer, entry)).token

    async def credentials(self, customer: str) -> Credentials:
        """Like :meth:`token`, with the instance URL the token is valid for."""
        entry = self._cache.get(customer)
        if entry is not None and _monotonic() < entry.refresh_at:
            return entry.credentials
        return (await self._slow(customer, entry)).credentials

    async def refresh(self, customer: str, *, stale: str) -> Credentials:
        """Credentials newer than ``stale``, the access token that just got a 401.

        If someone already replaced ``stale``, returns the replacement without
        refreshing; otherwise refreshes exactly once for all such callers.
        """
        entry = self._cache.get(customer)
        if entry is not None and entry.credentials.access_token != stale and \
                time.monotonic() < entry.refresh_at:
            return entry.credentials
        return (await self._fly(customer, stale)).credentials

    async def _slow(self, customer: str, entry: _Entry | None) -> _Entry:
        if entry is not None and self.policy.background_refresh and \
                time.monotonic() < entry.expires_at:
            self._refresh_in_background(customer)
            return entry
        return await self._fly(customer, None)

    def _refresh_in_background(self, customer: str) -> None:
        if self._flights.in_flight((customer, None)):
            return
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(
            self._fly(customer, None))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[object]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("background refresh failed: %s", exc)

    # -- grants ------------------------------------------------------------

    async def connect(self, customer: str, grant: TokenGrant) -> TokenRecord:
        """Store a customer's first grant (or a re-authorization), replacing any record."""
        if grant.refresh_token is None:
            raise InvalidTokenResponse("a grant without a refresh token cannot be stored")
        record = protocol.grant_record(grant, lifetime=self.policy.session_lifetime)
        stored = await self.store.put(customer, record)
        self._cache_put(customer, stored.record)
        log.info("customer %s connected (refresh %s)", customer, record.refresh_token.fingerprint)
        return stored.record

    async def disconnect(self, customer: str, *, revoke: bool = True) -> None:
        """Forget a customer's grant; revoke it at the provider first if asked."""
        current = await self.store.read(customer)
        if revoke and current is not None and current.record.status is not \
                Status.REAUTH_REQUIRED:
            try:
                await self.oauth.revoke(current.record.refresh_token)
            except OAuthError as exc:
                log.info("revoke for %s refused (%s); deleting anyway", customer, exc.error)
        await self.store.delete(customer)
        self._cache.pop(customer, None)

    async def status(self, customer: str) -> Status | None:
        current = await self.store.read(customer)
        return None if current is None else current.record.status

    async def wait_idle(self) -> None:
        """Wait until background refreshes and refreshes in flight have finished."""
        while self._background or len(self._flights):
            if self._background:
                await asyncio.wait(list(self._background))
            await self._flights.wait_idle()

    async def aclose(self) -> None:
        """Let refreshes in flight finish (they may hold burnt tokens), then close."""
        await self.wait_idle()
        await self.store.aclose()
        await self.oauth.aclose()

    # -- the protocol --------------------------------------------------------

    def _on_store_change(self, customer: str, state: Versioned | None) -> None:
        """Keep the hot-path cache in step with the store, whoever wrote it."""
        if state is None or state.record.status is Status.REAUTH_REQUIRED:
            self._cache.pop(customer, None)
        elif state.record.status is Status.VALID:
            self._cache_put(customer, state.record)

    def _cache_put(self, customer: str, record: TokenRecord) -> _Entry:
        now_wall, now_mono = time.time(), time.monotonic()
        expires_in = record.expires_at - now_wall
        entry = _Entry(
            Credentials(record.access_token.reveal(), record.instance_url),
            refresh_at=now_mono + expires_in - self.policy.refresh_margin,
            expires_at=now_mono + expires_in,
            generation=record.generation)
        current = self._cache.get(customer)
        if current is None or current.generation <= entry.generation or \
                record.generation == 0:
            self._cache[customer] = entry
        return entry

    async def _fly(self, customer: str, stale: str | None) -> _Entry:
        # Callers reporting different stale tokens get different flights: each
        # one's question is "newer than mine?". They still meet at the store.
        key = (customer, fingerprint(stale) if stale is not None else None)
        entry, _ = await self._flights.do(key, functools.partial(self._flight, customer, stale))
        return entry

    async def _flight(self, customer: str, stale: str | None) -> _Entry:
        deadline = time.monotonic() + self.policy.wait_timeout
        while True:
            current = await self.store.read(customer)
            step = protocol.plan(customer, current, stale=stale, now=time.time(),
                                 margin=self.policy.refresh_margin)
            if isinstance(step, protocol.Use):
                if current is not None and stale is not None:
                    self.stats.adopted += 1
                return self._cache_put(customer, step.record)
            if isinstance(step, protocol.Fail):
                self._cache.pop(customer, None)
                raise step.error
            if isinstance(step, protocol.Wait):
                self.stats.waits += 1
                await self._wait(customer, step.version, deadline)
                continue
            assert current is not None
            if isinstance(step, protocol.Recover) and not step.fenced:
                seen = self._orphans_seen.setdefault((customer, step.version), time.monotonic())
                left = seen + self._grace() - time.monotonic()
                if left > 0:
                    await self._wait(customer, step.version, deadline, cap=left)
                    continue
            acquired = await self.store.acquire(customer, step.version,
                                                self._intent(current.record))
            if acquired is None:
                continue  # lost the race; read again
            with anyio.CancelScope(shield=True):
                # From here a refresh token may get burnt: nothing may stop us
                # before its successor is stored (or the loss is recorded).
                if isinstance(step, protocol.Recover):
                    self._orphans_seen.pop((customer, step.version), None)
                    return await self._recover(customer, acquired.version, current.record)
                return await self._redeem(customer, acquired.version, current.record)

    def _grace(self) -> float:
        if self.policy.recovery_grace is not None:
            return self.policy.recovery_grace
        return self.store.lease_ttl + self.oauth.config.timeout + self.policy.lease_margin

    async def _wait(self, customer: str, version: int, deadline: float,
                    cap: float | None = None) -> Versioned | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CoordinationTimeout(
                f"gave up after {self.policy.wait_timeout:.0f}s waiting for the refresh of "
                f"customer {customer!r} by another worker")
        return await self.store.wait_for_change(
            customer, version, remaining if cap is None else min(cap, remaining))

    def _intent(self, record: TokenRecord) -> Intent:
        return Intent(worker=self.worker_id,
                      refresh_fingerprint=record.refresh_token.fingerprint,
                      started_at=time.time())

    async def _commit(self, customer: str, fence: int, record: TokenRecord) -> Versioned | None:
        return await self._durably(lambda: self.store.commit(customer, fence, record))

    async def _save_rescue(self, customer: str, fence: int, record: TokenRecord) -> None:
        await self._durably(lambda: self.store.save_rescue(customer, fence, record))

    async def _durably(self, write: Callable[[], Awaitable[T]]) -> T:
        """Retry a write of the critical section while the store is unreachable.

        These writes carry rotated tokens, or release a lock: giving up at the
        first network error would lose a token that exists nowhere else.
        """
        deadline = time.monotonic() + self.policy.store_patience
        delay = 0.1
        while True:
            try:
                return await write()
            except StoreError as exc:
                if time.monotonic() + delay > deadline:
                    log.error("store write abandoned after %.0fs: %s",
                              self.policy.store_patience, exc)
                    raise
                log.warning("store write failed (%s); retrying in %.1fs", exc, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _redeem(self, customer: str, fence: int, held: TokenRecord, *,
                      retry: bool = False) -> _Entry:
        """Present ``held.refresh_token`` (we hold the lock at ``fence``) and store
        whatever came of it."""
        lease = self.store.lease_remaining()
        if lease is not None and lease < self.oauth.config.timeout + self.policy.lease_margin:
            await self._commit(customer, fence, protocol.released_record(held))
            raise LeaseLost(f"lease too short to refresh customer {customer!r} safely")
        log.debug("redeeming refresh %s for %s", held.refresh_token.fingerprint, customer)
        outcome = await self.oauth.refresh(held.refresh_token)
        self.stats.redemptions += 1
        kind = outcome.kind
        if kind is OutcomeKind.OK:
            assert outcome.grant is not None
            record = protocol.refreshed_record(held, outcome.grant,
                                               lifetime=self.policy.session_lifetime)
            return await self._store_new(customer, fence, record)
        if kind is OutcomeKind.NOT_SENT or kind is OutcomeKind.INVALID:
            await self._commit(customer, fence, protocol.released_record(held))
            raise _untouched_error(customer, outcome)
        if kind is OutcomeKind.REJECTED:
            return await self._rejected(customer, fence, held, outcome)
        if kind is OutcomeKind.BUSY:
            # Someone outside this store is redeeming the same token. Give a
            # writer among us the chance to show up; otherwise the token is
            # in other hands and its successor may never reach us.
            await anyio.sleep(self.policy.busy_backoff)
            reread = await self.store.read(customer)
            adopted = protocol.adoptable_after_rejection(held, reread)
            if adopted is not None:
                self.stats.adopted += 1
                return self._cache_put(customer, adopted.record)
            return await self._ambiguous(
                customer, fence, held, "another client redeemed the same refresh token "
                "concurrently (token request is already being processed)", retry=retry)
        return await self._ambiguous(
            customer, fence, held,
            f"the refresh request got no usable answer ({outcome.error}); "
            "the rotated refresh token may be lost", retry=retry)

    async def _store_new(self, customer: str, fence: int, record: TokenRecord) -> _Entry:
        committed = await self._commit(customer, fence, record)
        if committed is None and not await self._is_stored(customer, record):
            # Fenced out: a takeover or a re-authorization moved the record while
            # we redeemed. Our tokens are live; keep them for adoption.
            await self._save_rescue(customer, fence, record)
            self.stats.rescued += 1
            log.warning("commit for %s was fenced out; tokens kept as rescue %d",
                        customer, fence)
            await self._adopt_rescue_if_dead(customer)
        entry = self._cache_put(customer, record)
        if self.policy.learn_expiry:
            await self._learn_expiry(customer, record)
        return entry

    async def _is_stored(self, customer: str, record: TokenRecord) -> bool:
        """Whether ``record``'s tokens are what the store holds (a retried commit
        whose first attempt landed although its answer was lost)."""
        current = await self.store.read(customer)
        return current is not None and current.record.refresh_token == record.refresh_token \
            and current.record.access_token == record.access_token

    async def _learn_expiry(self, customer: str, record: TokenRecord) -> None:
        try:
            info = await self.oauth.introspect(record.access_token, hint="access_token")
        except SfrtrError as exc:
            log.info("expiry introspection for %s failed (%s); keeping the estimate",
                     customer, type(exc).__name__)
            return
        if info.active and info.expires_at is not None:
            self._cache_put(customer, record.replace(expires_at=info.expires_at))

    async def _rejected(self, customer: str, fence: int, held: TokenRecord,
                        outcome: RefreshOutcome) -> _Entry:
        reread = await self.store.read(customer)
        adopted = protocol.adoptable_after_rejection(held, reread)
        if adopted is not None:
            self.stats.adopted += 1
            return self._cache_put(customer, adopted.record)
        reason = f"refresh token rejected: {outcome.description or outcome.error}"
        return await self._mark_dead(customer, fence, held, reason, ReauthorizationRequired)

    async def _mark_dead(self, customer: str, fence: int, held: TokenRecord, reason: str,
                         error: type[ReauthorizationRequired]) -> _Entry:
        committed = await self._commit(customer, fence, protocol.dead_record(held, reason))
        if committed is None:
            reread = await self.store.read(customer)
            adopted = protocol.adoptable_after_rejection(held, reread)
            if adopted is not None:
                return self._cache_put(customer, adopted.record)
        self.stats.reauth_marked += 1
        self._cache.pop(customer, None)
        log.warning("customer %s must re-authorize: %s", customer, reason)
        raise error(customer, reason)

    async def _ambiguous(self, customer: str, fence: int, held: TokenRecord, reason: str, *,
                         retry: bool) -> _Entry:
        """A redemption whose outcome is unknown; the recovery policy decides."""
        mode = self.policy.recovery
        if mode == "introspect":
            try:
                info = await self.oauth.introspect(held.refresh_token)
            except SfrtrError as exc:
                await self._commit(customer, fence, held.replace(
                    status=Status.INDETERMINATE, reason=reason))
                raise TokenEndpointUnavailable(
                    f"cannot settle an interrupted refresh for {customer!r} yet "
                    f"({type(exc).__name__}); will retry") from None
            if info.active:
                if not retry:  # not rotated after all: redeeming it is not reuse
                    return await self._redeem(customer, fence, held, retry=True)
                await self._commit(customer, fence, protocol.released_record(held))
                raise TokenEndpointUnavailable(f"refresh for {customer!r} failed twice")
        elif mode == "reuse_window" and not retry:
            return await self._redeem(customer, fence, held, retry=True)
        return await self._mark_dead(customer, fence, held, reason, RefreshIndeterminate)

    async def _recover(self, customer: str, fence: int, orphan: TokenRecord) -> _Entry:
        """We took the lock over an orphaned intent (its writer is gone or stalled)."""
        self.stats.recoveries += 1
        adopted = await self._take_rescue(customer, fence, orphan.generation)
        if adopted is not None:
            return adopted
        worker = orphan.intent.worker if orphan.intent else "unknown"
        base = protocol.released_record(orphan)
        return await self._ambiguous(
            customer, fence, base,
            f"a refresh by worker {worker} was interrupted; the rotated refresh token may "
            "be lost", retry=False)

    async def _take_rescue(self, customer: str, fence: int, generation: int) -> _Entry | None:
        rescues = await self.store.rescues(customer)
        picked = protocol.pick_rescue(generation, rescues)
        if picked is None:
            return None
        rescue_fence, record = picked
        record = protocol.released_record(record)
        if await self._commit(customer, fence, record) is None:
            return None
        for old_fence, old in rescues:
            if old.generation <= record.generation:
                await self.store.drop_rescue(customer, old_fence)
        self.stats.rescues_adopted += 1
        log.warning("customer %s: adopted rescued tokens (fence %d)", customer, rescue_fence)
        return self._cache_put(customer, record)

    async def _adopt_rescue_if_dead(self, customer: str) -> None:
        """After saving a rescue: if a takeover already declared the grant dead,
        bring it back with the rescued tokens."""
        current = await self.store.read(customer)
        if current is None or current.locked or current.record.status in (
                Status.VALID, Status.REFRESHING):
            return
        acquired = await self.store.acquire(customer, current.version,
                                            self._intent(current.record))
        if acquired is None:
            return
        if await self._take_rescue(customer, acquired.version, current.record.generation) is None:
            await self._commit(customer, acquired.version, current.record)


def _untouched_error(customer: str, outcome: RefreshOutcome) -> SfrtrError:
    if outcome.kind is OutcomeKind.INVALID:
        return InvalidTokenResponse(f"refresh for {customer!r}: {outcome.description}")
    if outcome.error in _CONFIG_ERRORS:
        return ConfigurationError(
            f"token endpoint refused the client: {outcome.error} {outcome.description}".strip())
    return TokenEndpointUnavailable(
        f"could not reach the token endpoint for {customer!r} ({outcome.error})")


__all__ = ["Credentials", "ManagerStats", "TokenManager"]
