"""The emulator's model of Salesforce: connected apps, orgs, token families.

A *family* is what Salesforce revokes as a whole: every access and refresh
token issued to one user for one connected app, from one authorization. The
refresh-token state machine follows ``shared/reference/salesforce-protocol.md``
section 3.1: rotation kills the presented token, a rotated-out token presented
again revokes the family, and a token already being redeemed is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from sfrtr.emulator.records import OrgData


def sign(identity_url: str, issued_at: str, client_secret: str) -> str:
    """Salesforce's ``signature``: base64 HMAC-SHA256 of ``id + issued_at``."""
    mac = hmac.new(client_secret.encode(), (identity_url + issued_at).encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


@dataclass
class ConnectedApp:
    client_id: str
    client_secret: str
    rotation: bool = True
    """Refresh Token Rotation: every refresh returns a new refresh token."""
    reuse_window: float = 0.0
    """Seconds a rotated-out refresh token stays usable (0 = Salesforce)."""
    confidential: bool = True
    """Confidential clients must authenticate with the secret on code exchange."""


@dataclass
class Org:
    org_id: str
    name: str
    user_id: str
    data: OrgData
    api_limit: int = 15_000
    api_used: int = 0
    username: str = ""


@dataclass
class AccessToken:
    value: str
    family: Family
    issued_at: float
    last_used: float
    killed: bool = False


@dataclass
class Family:
    family_id: str
    app: ConnectedApp
    org: Org
    scope: str
    current_refresh: str | None
    rotated_at: dict[str, float] = field(default_factory=dict)
    """Rotated-out refresh tokens of this family and when they were rotated."""
    access_tokens: list[AccessToken] = field(default_factory=list)
    revoked: bool = False
    in_flight: set[str] = field(default_factory=set)


@dataclass
class PendingCode:
    code: str
    app: ConnectedApp
    org: Org
    redirect_uri: str
    scope: str
    challenge: str | None
    challenge_method: str | None
    expires_at: float
    used: bool = False


_ids = itertools.count(1)


def new_token(prefix: str) -> str:
    """A random opaque token, shaped loosely like Salesforce's."""
    return f"{prefix}!{secrets.token_urlsafe(48)}"


def new_org_id() -> str:
    return f"00D{next(_ids):015d}"


def new_user_id() -> str:
    return f"005{next(_ids):015d}"


@dataclass
class World:
    """Everything the emulator knows. Handlers mutate it; tests inspect it."""

    session_timeout: float = 7200.0
    """Inactivity timeout of access tokens, seconds (Salesforce's default 2 h)."""
    code_lifetime: float = 900.0
    apps: dict[str, ConnectedApp] = field(default_factory=dict)
    orgs: dict[str, Org] = field(default_factory=dict)
    """Orgs by their (customer) name."""
    families: dict[str, Family] = field(default_factory=dict)
    refresh_index: dict[str, Family] = field(default_factory=dict)
    """Every refresh token ever issued, live or rotated out, to its family."""
    access_index: dict[str, AccessToken] = field(default_factory=dict)
    codes: dict[str, PendingCode] = field(default_factory=dict)

    def new_family(self, app: ConnectedApp, org: Org, scope: str) -> Family:
        fid = f"fam{next(_ids)}"
        family = Family(family_id=fid, app=app, org=org, scope=scope, current_refresh=None)
        self.families[fid] = family
        return family

    def issue_access(self, family: Family, now: float) -> AccessToken:
        token = AccessToken(new_token(family.org.org_id), family, issued_at=now, last_used=now)
        family.access_tokens.append(token)
        self.access_index[token.value] = token
        return token

    def issue_refresh(self, family: Family) -> str:
        value = new_token("5Aep")
        if family.current_refresh is not None:
            family.rotated_at[family.current_refresh] = time.time()
        family.current_refresh = value
        self.refresh_index[value] = family
        return value

    def revoke_family(self, family: Family) -> bool:
        """Kill every token of the family. Returns False if it was already revoked."""
        if family.revoked:
            return False
        family.revoked = True
        for token in family.access_tokens:
            token.killed = True
        return True

    def access_alive(self, token: AccessToken, now: float) -> bool:
        return (
            not token.killed
            and not token.family.revoked
            and now - token.last_used < self.session_timeout
        )

    def expire_sessions(self, org_name: str | None = None) -> int:
        """Expire every live access token (of one org, or of all). Returns the count."""
        n = 0
        for token in self.access_index.values():
            if token.killed or (org_name is not None and token.family.org.name != org_name):
                continue
            token.killed = True
            n += 1
        # Dead tokens are never reused, so forget them to keep memory flat in
        # long benchmarks; a dead token simply becomes "unknown", which is the
        # same 401 on the wire.
        self.access_index = {k: t for k, t in self.access_index.items() if not t.killed}
        for family in self.families.values():
            family.access_tokens = [t for t in family.access_tokens if not t.killed]
        return n

    def token_answer(self, family: Family, access: AccessToken, refresh: str | None,
                     base_url: str) -> dict[str, Any]:
        """The JSON body of a successful token response, as Salesforce sends it."""
        issued_at = str(int(access.issued_at * 1000))
        identity = f"{base_url}/id/{family.org.org_id}/{family.org.user_id}"
        body: dict[str, Any] = {
            "access_token": access.value,
            "signature": sign(identity, issued_at, family.app.client_secret),
            "scope": family.scope,
            "instance_url": base_url,
            "id": identity,
            "token_type": "Bearer",
            "issued_at": issued_at,
        }
        if refresh is not None:
            body["refresh_token"] = refresh
        return body
