"""The refresh protocol's decisions, as plain functions over records (no I/O).

The token manager reads the store, asks :func:`plan` what to do, does the
I/O the step names, and asks the other functions here how to turn an outcome
into the record it must write. Every branch is therefore testable without a
server; ``docs/protocol.md`` maps each step to the invariant it protects.
"""

from __future__ import annotations

from dataclasses import dataclass

from sfrtr.errors import NotConnected, ReauthorizationRequired, SfrtrError
from sfrtr.oauth.grant import TokenGrant
from sfrtr.records import Status, TokenRecord, Versioned
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
    """An intent with no live lock: a worker died or stalled mid-refresh.

    ``fenced`` is false while the old holder could still commit (the record
    is exactly as it left it): wait out the grace period before taking over.
    """

    version: int
    fenced: bool


@dataclass(frozen=True, slots=True)
class Fail:
    error: SfrtrError


Step = Use | Redeem | Wait | Recover | Fail


def needs_refresh(record: TokenRecord, now: float, margin: float) -> bool:
    """Whether the access token is within ``margin`` seconds of its estimated expiry."""
    return now >= record.expires_at - margin


def plan(customer: str, current: Versioned | None, *, stale: str | None, now: float,
         margin: float) -> Step:
    """What to do next, given the store's current state.

    ``stale`` is the access token that just got a 401 (``None`` when the
    caller only found its cached token near expiry). A 401 is the final word:
    if the stored token is the one that failed, it is refreshed whatever its
    estimated expiry says.
    """
    if current is None:
        return Fail(NotConnected(customer))
    record = current.record
    if record.status is Status.REAUTH_REQUIRED:
        return Fail(ReauthorizationRequired(customer, record.reason))
    if record.status is Status.REFRESHING:
        return Wait(current.version) if current.locked else Recover(current.version, False)
    if record.status is Status.INDETERMINATE:
        return Wait(current.version) if current.locked else Recover(current.version, True)
    if current.locked:
        return Wait(current.version)
    failed = stale is not None and record.access_token.reveal() == stale
    if not failed and not needs_refresh(record, now, margin):
        return Use(record, current.version)
    return Redeem(current.version)


def grant_record(grant: TokenGrant, *, lifetime: float, refresh_token: Secret | None = None,
                 generation: int = 0) -> TokenRecord:
    """The record for a grant straight from the code exchange (or a refresh)."""
    token = grant.refresh_token if grant.refresh_token is not None else refresh_token
    if token is None:
        raise ValueError("a grant record needs a refresh token")
    return TokenRecord(
        access_token=grant.access_token, refresh_token=token,
        instance_url=grant.instance_url, issued_at=grant.issued_at,
        expires_at=grant.issued_at + lifetime, generation=generation,
        identity_url=grant.identity_url, scope=grant.scope)


def refreshed_record(held: TokenRecord, grant: TokenGrant, *, lifetime: float) -> TokenRecord:
    """The record after a successful redemption of ``held.refresh_token``.

    Without rotation the provider sends no refresh token: the old one lives on.
    """
    return grant_record(grant, lifetime=lifetime, refresh_token=held.refresh_token,
                        generation=held.generation + 1)


def dead_record(held: TokenRecord, reason: str) -> TokenRecord:
    return held.replace(status=Status.REAUTH_REQUIRED, intent=None, reason=reason)


def released_record(held: TokenRecord) -> TokenRecord:
    """``held`` made usable again: the redemption did not happen."""
    return held.replace(status=Status.VALID, intent=None, reason="")


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


def pick_rescue(generation: int, rescues: list[tuple[int, TokenRecord]]
                ) -> tuple[int, TokenRecord] | None:
    """The rescue entry to adopt over a record of ``generation``, if any.

    Only an entry newer than the stored record can hold the live refresh
    token; among several, the newest generation (then the latest fence) wins.
    """
    newer = [(f, r) for f, r in rescues if r.generation > generation]
    if not newer:
        return None
    return max(newer, key=lambda item: (item[1].generation, item[0]))
