"""What came of presenting a refresh token: the five outcomes the protocol acts on."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sfrtr.oauth.grant import TokenGrant
from sfrtr.secret import Secret


class OutcomeKind(enum.StrEnum):
    """How a refresh ended, as far as the refresh token's fate goes."""

    OK = "ok"
    """Redeemed: a new access (and, under rotation, refresh) token."""
    REJECTED = "rejected"
    """``invalid_grant``: the refresh token is dead (expired, revoked, reused)."""
    BUSY = "busy"
    """"token request is already being processed": someone else is redeeming
    this very token. The grant is alive; this is not reuse."""
    NOT_SENT = "not_sent"
    """Failed before a byte of the request was sent, or refused before
    redemption (bad client credentials): the refresh token is untouched."""
    INDETERMINATE = "indeterminate"
    """Sent, but no answer (timeout, reset, 5xx): the token may or may not
    have been rotated."""
    INVALID = "invalid"
    """A 2xx answer that failed validation (not JSON, missing fields, bad
    signature, disallowed instance URL). The presented refresh token may be
    burnt: it is never presented again. ``salvaged`` holds the answer's new
    refresh token when it could be read; without it the outcome is as
    ambiguous as an INDETERMINATE one."""


@dataclass(frozen=True, slots=True)
class RefreshOutcome:
    """What :meth:`~sfrtr.OAuthClient.refresh` returns: the kind, the grant when
    ``OK``, and the provider's error otherwise (never raises for those)."""

    kind: OutcomeKind
    grant: TokenGrant | None = None
    error: str = ""
    """The provider's error code, or the transport failure's class name."""
    description: str = ""
    """Human-readable detail; never contains a token."""
    salvaged: Secret | None = None
    """INVALID only: the new refresh token read from the refused answer."""
