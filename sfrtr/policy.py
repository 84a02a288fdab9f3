"""The knobs of the refresh protocol, in one immutable value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sfrtr.errors import ConfigurationError

RecoveryMode = Literal["fail_closed", "introspect", "reuse_window"]


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    session_lifetime: float = 7200.0
    """Estimated access-token lifetime, seconds. Salesforce sends no ``expires_in``;
    its default session timeout is two hours. A 401 always overrides the estimate."""
    refresh_margin: float = 300.0
    """Refresh this many seconds before the estimated expiry."""
    background_refresh: bool = False
    """Refresh ahead in a background task, so callers never wait on the hot path."""
    learn_expiry: bool = False
    """After each refresh, introspect the new access token to learn its real expiry."""
    wait_timeout: float = 60.0
    """Longest a caller waits for another worker's refresh before giving up."""
    recovery: RecoveryMode = "introspect"
    """What to do when a redemption's outcome is unknown (see ``docs/protocol.md``):
    ``introspect`` (default) waits until the interrupted request can no longer be in
    flight, then asks the provider whether the old refresh token is still active:
    active means it was never redeemed (refresh it), inactive means it was rotated and
    its successor is lost (re-authorization). Salesforce introspects the app's own
    refresh tokens. ``fail_closed`` marks the customer for re-authorization at once
    (for providers that cannot introspect; it locks out customers whose token was
    still live). ``reuse_window`` redeems once more inside the provider's reuse window
    (Auth0, Okta, Xero); set ``reuse_window`` to that window."""
    recovery_grace: float | None = None
    """How long an orphaned intent is left to its writer before a takeover, seconds.
    ``None``: derived (lease TTL plus the longest a token request can take, plus
    ``lease_margin``). Under ``introspect`` a shorter grace is refused: introspecting
    while the old request may still be processed reads "active" and leads to reuse."""
    lease_margin: float = 2.0
    """A redemption starts only if the lease outlives the whole token request (timeout
    and answer graces) by this much."""
    reuse_window: float = 0.0
    """The provider's refresh-token reuse window, seconds (``reuse_window`` recovery)."""
    refused_backoff: float = 300.0
    """After Salesforce refuses a freshly refreshed session (a 401 a refresh cannot
    cure), or a 2xx answer could not be used: no refresh of that customer for this long."""
    store_patience: float = 120.0
    """How long a commit carrying rotated tokens is retried while the store is down."""
    busy_backoff: float = 1.0
    """Pause before re-reading after "token request is already being processed"."""
    handoff: float = 0.2
    """On a store that knows the fleet's live processes (etcd), a refresh that
    cannot wait for the session's end (a 401, or a session already past its
    estimated expiry) is sent at once by the process that refreshed the customer
    last (it uses it) while that one lives; the others wait up to this many
    seconds for its lock to show before they try, so a fleet that needs a
    customer at the same moment sends one acquire instead of one per process.
    When no process is known to use the customer (never refreshed since these
    processes started), everyone tries at once. Never past ``wait_timeout``
    (refused if not shorter). 0: every process tries at once."""
    refresh_stagger: float = 0.5
    """On such a store, the process first in line refreshes ``refresh_margin``
    before the estimated expiry; the others, when that time comes, move their
    turn later by their place in line (place / processes x this x the margin),
    serving the still-valid session meanwhile. The first one's new record
    usually reaches them before their turn, so an ahead-of-expiry refresh costs
    the fleet one acquire and no caller waits outside the process that
    refreshes. 0: all at the margin; below 1."""
    acquire_spread: float = 0.0
    """On a store whose reads are local (etcd's watch-fed mirror), a refresh first
    waits a random time up to this many seconds and looks again: when several
    processes need the same customer at once (every session expired together), the
    first one's lock can reach the others' mirrors before they send an acquire that
    cannot win. Each refresh pays half of it on average. Measured at 8 processes
    (docs/benchmarks.md): etcd round trips per refresh 9.25 off, 7.8 at 0.02 s, 6.4
    at 0.05 s, 4.0 at 0.1 s. 0 (the default): off."""

    def __post_init__(self) -> None:
        if self.session_lifetime <= 0 or self.refresh_margin < 0 or self.wait_timeout <= 0:
            raise ConfigurationError("lifetimes and timeouts must be positive")
        if self.refresh_margin >= self.session_lifetime:
            raise ConfigurationError("refresh_margin must be shorter than session_lifetime")
        if self.recovery not in ("fail_closed", "introspect", "reuse_window"):
            raise ConfigurationError(f"unknown recovery mode {self.recovery!r}")
        if self.recovery == "reuse_window" and self.reuse_window <= 0:
            raise ConfigurationError("recovery='reuse_window' needs the provider's reuse_window")
        if self.acquire_spread < 0 or self.handoff < 0:
            raise ConfigurationError("acquire_spread and handoff cannot be negative")
        if self.handoff >= self.wait_timeout:
            raise ConfigurationError("handoff must be shorter than wait_timeout")
        if not 0 <= self.refresh_stagger < 1:
            raise ConfigurationError("refresh_stagger is a fraction of the margin: 0 to < 1")
        if self.lease_margin < 0 or self.refused_backoff < 0 or (
                self.recovery_grace is not None and self.recovery_grace < 0):
            raise ConfigurationError("margins, graces and backoffs cannot be negative")
