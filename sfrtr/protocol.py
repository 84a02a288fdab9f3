"""The refresh protocol's decisions, as plain functions over records (no I/O).

The token manager reads the store, asks :func:`plan` what to do, does the
I/O the step names, and asks the other functions here how to turn an outcome
into the record it must write. Every branch is therefore testable without a
server; ``docs/protocol.md`` maps each step to the invariant it protects.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Collection
from dataclasses import dataclass

from sfrtr.errors import (
    GrantSuspended,
    NotConnected,
    ReauthorizationRequired,
    SessionRefused,
    SfrtrError,
)
from sfrtr.oauth.grant import TokenGrant
from sfrtr.records import Intent, Status, TokenRecord, Versioned
from sfrtr.secret import Secret


@dataclass(frozen=True, slots=True)
class Use:
    """The stored record is good: use it, no refresh."""

    record: TokenRecord
    version: int


@dataclass(frozen=True, slots=True)
class Redeem:
    """Take the lock at ``version`` (with an intent), then redeem."""

    version: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Another live worker is refreshing: wait for the record to change."""

    version: int


@dataclass(frozen=True, slots=True)
class Recover:
    """An intent with no live lock (a worker died or stalled mid-refresh), or an
    outcome left ``indeterminate``: settle it once no request can still be in flight.

    ``orphan`` is true for a ``refreshing`` record: its writer may still commit,
    so the grace before a takeover also covers its lease.
    """

    version: int
    orphan: bool


@dataclass(frozen=True, slots=True)
class Reclaim:
    """The intent is this worker's own, from a critical section that ended before
    its outcome reached the store (an acquire whose answer was lost, a commit that
    ran out of patience). The worker knows what happened; it finishes the job."""

    version: int


@dataclass(frozen=True, slots=True)
class Revive:
    """A dead record with rescue entries: a late writer's tokens may bring it back."""

    version: int


@dataclass(frozen=True, slots=True)
class Fail:
    error: SfrtrError


Step = Use | Redeem | Wait | Recover | Reclaim | Revive | Fail


def needs_refresh(record: TokenRecord, now: float, margin: float) -> bool:
    """Whether the access token is within ``margin`` seconds of its estimated expiry."""
    return now >= record.expires_at - margin


def plan(customer: str, current: Versioned | None, *, stale: str | None, now: float,
         margin: float, own_intents: Collection[str] = (), held_back: bool = False) -> Step:
    """What to do next, given the store's current state.

    ``stale`` is the access token that just got a 401 (``None`` when the
    caller only found its cached token near expiry). A 401 is the final word:
    if the stored token is the one that failed, it is refreshed whatever its
    estimated expiry says, unless a refresh already proved unable to cure it
    (``refresh_after``). ``now`` is on the provider's clock. ``own_intents``
    are the ids of this worker's unfinished acquisitions for the customer.
    ``held_back``: this worker's own view that the record's backoff still runs
    (clocks disagree; either one saying "not yet" is enough).
    """
    if current is None:
        return Fail(NotConnected(customer))
    record = current.record
    intent = record.intent
    if intent is not None and intent.id and intent.id in own_intents:
        return Reclaim(current.version)
    if record.status is Status.REAUTH_REQUIRED:
        if current.rescued and not current.locked:
            return Revive(current.version)
        return Fail(ReauthorizationRequired(customer, record.reason))
    if current.locked:
        return Wait(current.version)
    if record.status is Status.REFRESHING:
        return Recover(current.version, orphan=True)
    if record.status is Status.INDETERMINATE:
        return Recover(current.version, orphan=False)
    if record.status is Status.SUSPENDED:
        if now < record.refresh_after or held_back:
            return Fail(GrantSuspended(customer, record.reason, record.refresh_after))
        return Redeem(current.version)
    failed = stale is not None and record.access_token.reveal() == stale
    if failed and (now < record.refresh_after or held_back):
        return Fail(SessionRefused(customer, record.reason, record.refresh_after))
    if not failed and not needs_refresh(record, now, margin):
        return Use(record, current.version)
    return Redeem(current.version)


def grant_record(grant: TokenGrant, *, lifetime: float, refresh_token: Secret | None = None,
                 generation: int = 0, grant_id: str = "") -> TokenRecord:
    """The record for a grant straight from the code exchange (or a refresh)."""
    token = grant.refresh_token if grant.refresh_token is not None else refresh_token
    if token is None:
        raise ValueError("a grant record needs a refresh token")
    return TokenRecord(
        access_token=grant.access_token, refresh_token=token,
        instance_url=grant.instance_url, issued_at=grant.issued_at,
        expires_at=grant.issued_at + lifetime, generation=generation,
        identity_url=grant.identity_url, scope=grant.scope, grant_id=grant_id,
        token_host=grant.token_host, client_id=grant.client_id)


def refreshing_record(record: TokenRecord, intent: Intent) -> TokenRecord:
    """What an acquire writes: ``record`` as ``refreshing`` under ``intent``.

    Same as ``record.replace(status=REFRESHING, intent=intent)`` at half the cost
    (``dataclasses.replace`` looks every field up by name): every refresh writes one.
    """
    values = list(_RECORD_VALUES(record))
    values[_STATUS] = Status.REFRESHING
    values[_INTENT] = intent
    return TokenRecord(*values)


_RECORD_FIELDS = [f.name for f in dataclasses.fields(TokenRecord)]
assert all(f.init and not f.kw_only for f in dataclasses.fields(TokenRecord))
_RECORD_VALUES = operator.attrgetter(*_RECORD_FIELDS)
_STATUS, _INTENT = _RECORD_FIELDS.index("status"), _RECORD_FIELDS.index("intent")


def refreshed_record(held: TokenRecord, grant: TokenGrant, *, lifetime: float) -> TokenRecord:
    """The record after a successful redemption of ``held.refresh_token``.

    Without rotation the provider sends no refresh token: the old one lives on.
    """
    # A refresh answer does not say which host and app issued the grant: they stay.
    # Built in one go, as grant_record does (a replace() after it costs as much again).
    return TokenRecord(
        access_token=grant.access_token,
        refresh_token=grant.refresh_token if grant.refresh_token is not None
        else held.refresh_token,
        instance_url=grant.instance_url, issued_at=grant.issued_at,
        expires_at=grant.issued_at + lifetime, generation=held.generation + 1,
        identity_url=grant.identity_url, scope=grant.scope, grant_id=held.grant_id,
        token_host=held.token_host, client_id=held.client_id)


def suspended_record(held: TokenRecord, refresh_token: Secret, reason: str,
                     until: float, backoff: float = 0.0) -> TokenRecord:
    """After a 2xx answer we refused to use: its new refresh token is kept (the one
    presented is burnt), the access token is not, and no refresh before ``until``."""
    return held.replace(refresh_token=refresh_token, generation=held.generation + 1,
                        status=Status.SUSPENDED, intent=None, reason=reason,
                        refresh_after=until, backoff=backoff, expires_at=0.0)


def held_back_record(held: TokenRecord, reason: str, until: float,
                     backoff: float = 0.0) -> TokenRecord:
    """A grant whose refresh the provider refused although its token is still active
    (IP restrictions, login hours, a locked user): kept, unused until ``until``."""
    return held.replace(status=Status.SUSPENDED, intent=None, reason=reason,
                        refresh_after=until, backoff=backoff, expires_at=0.0)


def refused_record(held: TokenRecord, reason: str, until: float,
                   backoff: float = 0.0) -> TokenRecord:
    """A valid record whose freshly refreshed session Salesforce refused anyway."""
    return held.replace(reason=reason, refresh_after=until, backoff=backoff)


def dead_record(held: TokenRecord, reason: str) -> TokenRecord:
    return held.replace(status=Status.REAUTH_REQUIRED, intent=None, reason=reason)


def indeterminate_record(held: TokenRecord, reason: str) -> TokenRecord:
    """A redemption whose outcome is unknown: the intent stays (it names the token),
    recovery settles it once no request can still be in flight."""
    return held.replace(status=Status.INDETERMINATE, reason=reason)


def released_record(held: TokenRecord) -> TokenRecord:
    """``held`` made usable again: the redemption did not happen."""
    return held.replace(status=Status.VALID if held.status is not Status.SUSPENDED
                        else Status.SUSPENDED, intent=None,
                        reason="" if held.status is not Status.SUSPENDED else held.reason)


def adoptable_after_rejection(held: TokenRecord, reread: Versioned | None) -> Versioned | None:
    """After ``invalid_grant``: a valid record with another refresh token wins.

    Someone else stored a newer grant while we redeemed the old one (a
    re-authorization, or a writer outside the protocol); adopt it rather
    than declare the customer dead.
    """
    if reread is None:
        return None
    record = reread.record
    if record.status is Status.VALID and record.refresh_token != held.refresh_token:
        return reread
    return None


def pick_rescue(stored: TokenRecord, rescues: list[tuple[int, TokenRecord]]
                ) -> tuple[int, TokenRecord] | None:
    """The rescue entry to adopt over ``stored``, if any.

    Only an entry of the same grant (a re-authorization starts a new one) and
    newer than the stored record can hold the live refresh token; among
    several, the newest generation (then the latest fence) wins.
    """
    newer = [(f, r) for f, r in rescues
             if r.grant_id == stored.grant_id and r.generation > stored.generation]
    if not newer:
        return None
    return max(newer, key=lambda item: (item[1].generation, item[0]))
