"""Parsing and validating a token-endpoint success answer."""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass
from typing import Any

from sfrtr.errors import InvalidTokenResponse
from sfrtr.oauth.instance_url import InstanceUrlPolicy
from sfrtr.secret import Secret

REQUIRED = ("access_token", "instance_url", "id", "token_type", "issued_at")


@dataclass(frozen=True, slots=True, repr=False)
class TokenGrant:
    """A validated token answer. ``refresh_token`` is None when not rotated."""

    access_token: Secret
    refresh_token: Secret | None
    instance_url: str
    identity_url: str
    issued_at: float
    """Epoch seconds (Salesforce sends milliseconds as a string)."""
    scope: str
    token_host: str = ""
    """The login host that issued the grant (``https://test.salesforce.com`` for a
    sandbox, a My Domain); its refreshes, introspection and revocation go there."""
    client_id: str = ""
    """The connected app the grant belongs to."""

    def __repr__(self) -> str:
        refresh = self.refresh_token.fingerprint if self.refresh_token else None
        return (f"TokenGrant(access={self.access_token.fingerprint}, refresh={refresh}, "
                f"instance_url={self.instance_url!r})")


def signature(identity_url: str, issued_at: str, client_secret: str) -> str:
    """Salesforce's answer signature: base64 HMAC-SHA256 of ``id + issued_at``
    keyed by the client secret (what a token answer's ``signature`` must equal)."""
    mac = hmac.digest(client_secret.encode(), (identity_url + issued_at).encode(), "sha256")
    return base64.b64encode(mac).decode()


def parse_grant(body: Any, *, policy: InstanceUrlPolicy,
                client_secret: Secret | None) -> TokenGrant:
    """Validate a decoded JSON answer; raise :class:`InvalidTokenResponse` if it is wrong.

    The signature is checked whenever a client secret is configured (public
    PKCE clients have none to check with).
    """
    if not isinstance(body, dict):
        raise InvalidTokenResponse("token answer is not a JSON object")
    for name in REQUIRED:
        if not isinstance(body.get(name), str) or not body[name]:
            raise InvalidTokenResponse(f"token answer field {name!r} is missing or not a string")
    for name in ("refresh_token", "scope", "signature"):
        if name in body and not isinstance(body[name], str):
            raise InvalidTokenResponse(f"token answer field {name!r} is not a string")
    if body["token_type"] != "Bearer":
        raise InvalidTokenResponse("token answer token_type is not Bearer")
    issued_raw: str = body["issued_at"]
    if not issued_raw.isdigit() or len(issued_raw) > 16:
        raise InvalidTokenResponse("token answer issued_at is not epoch milliseconds")
    if client_secret is not None:
        sent = body.get("signature")
        if not sent:
            raise InvalidTokenResponse("token answer has no signature")
        expected = signature(body["id"], issued_raw, client_secret.reveal())
        if not hmac.compare_digest(expected.encode(), sent.encode()):
            raise InvalidTokenResponse("token answer signature does not verify")
    refresh = body.get("refresh_token")
    return TokenGrant(
        access_token=Secret(body["access_token"]),
        refresh_token=Secret(refresh) if refresh else None,
        instance_url=policy.validate(body["instance_url"]),
        identity_url=body["id"],
        issued_at=int(issued_raw) / 1000.0,
        scope=body.get("scope", ""),
    )
