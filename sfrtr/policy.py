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
    recovery: RecoveryMode = "fail_closed"
    """What to do when a redemption's outcome is unknown (see ``docs/protocol.md``):
    ``fail_closed`` marks the customer for re-authorization (right for Salesforce);
    ``introspect`` asks the provider whether the old refresh token is still active;
    ``reuse_window`` redeems once more (only for providers with a reuse window)."""
    recovery_grace: float | None = None
    """How long an orphaned intent may still be committed by its writer before a
    takeover, seconds. ``None``: the store's lease TTL plus the provider timeout."""
    lease_margin: float = 2.0
    """A redemption starts only if the lease outlives the provider timeout by this."""
    store_patience: float = 120.0
    """How long a commit carrying rotated tokens is retried while the store is down."""
    busy_backoff: float = 1.0
    """Pause before re-reading after "token request is already being processed"."""

    def __post_init__(self) -> None:
        if self.session_lifetime <= 0 or self.refresh_margin < 0 or self.wait_timeout <= 0:
            raise ConfigurationError("lifetimes and timeouts must be positive")
        if self.refresh_margin >= self.session_lifetime:
            raise ConfigurationError("refresh_margin must be shorter than session_lifetime")
        if self.recovery not in ("fail_closed", "introspect", "reuse_window"):
            raise ConfigurationError(f"unknown recovery mode {self.recovery!r}")
