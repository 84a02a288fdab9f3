"""The emulator's server-to-server grants: JWT bearer and client credentials.

Neither issues a refresh token. The JWT bearer grant checks the assertion as
Salesforce does: RS256 signed by the key registered for the app (``iss``),
``sub`` a user of an org (``admin@<customer>.example``), ``aud`` a login URL,
``exp`` in the future and at most a few minutes away. The client credentials
grant needs the app's secret and a run-as customer set for the app.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from sfrtr.emulator.state import Family, Org
from sfrtr.emulator.wire import json_response, oauth_error

if TYPE_CHECKING:
    from sfrtr.emulator.server import Emulator

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
AUDIENCES = ("https://login.salesforce.com", "https://test.salesforce.com")
MAX_ASSERTION_LIFETIME = 300


@dataclass
class ServerGrants:
    """Which apps may use the server-to-server grants, and what they were given."""

    jwt_keys: dict[str, bytes] = field(default_factory=dict)
    """Public key PEM by client id (the certificate uploaded to the app)."""
    run_as: dict[str, str] = field(default_factory=dict)
    """Client credentials flow: the customer each app acts in, by client id."""
    issued: Counter[str] = field(default_factory=Counter)
    """Access tokens issued by these grants, per customer."""
    families: dict[tuple[str, str], Family] = field(default_factory=dict)

    def allow_jwt(self, client_id: str, public_key_pem: bytes) -> None:
        """Accept assertions for ``client_id`` signed by this key's private half."""
        self.jwt_keys[client_id] = public_key_pem

    def allow_client_credentials(self, client_id: str, customer: str) -> None:
        """Let ``client_id`` use the client credentials flow as ``customer``'s run-as user."""
        self.run_as[client_id] = customer


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _verify(assertion: str, public_pem: bytes) -> dict[str, Any] | None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        header_b64, claims_b64, signature_b64 = assertion.split(".")
        header = orjson.loads(_unb64(header_b64))
        claims = orjson.loads(_unb64(claims_b64))
        signature = _unb64(signature_b64)
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        return None
    if not isinstance(header, dict) or header.get("alg") != "RS256" or \
            not isinstance(claims, dict):
        return None
    key = load_pem_public_key(public_pem)
    if not isinstance(key, RSAPublicKey):
        return None
    try:
        key.verify(signature, f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(),
                   hashes.SHA256())
    except InvalidSignature:
        return None
    return claims


def _family(em: Emulator, client_id: str, org: Org, scope: str) -> Family:
    grants: ServerGrants = em.server_grants
    key = (client_id, org.name)
    family = grants.families.get(key)
    if family is None or family.revoked:
        family = em.world.new_family(em.world.apps[client_id], org, scope)
        grants.families[key] = family
    return family


def _issue(em: Emulator, request: web.Request, client_id: str, org: Org) -> web.Response:
    from sfrtr.emulator.oauth_routes import base_url

    family = _family(em, client_id, org, "api")
    access = em.world.issue_access(family, time.time())
    em.server_grants.issued[org.name] += 1
    return json_response(em.world.token_answer(family, access, None, base_url(request)))


def jwt_bearer(em: Emulator, request: web.Request, form: dict[str, str]) -> web.Response:
    """``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` with an ``assertion``."""
    grants: ServerGrants = em.server_grants
    assertion = form.get("assertion", "")
    try:
        claims_part = assertion.split(".")[1]
        unverified = orjson.loads(_unb64(claims_part))
    except (IndexError, ValueError, binascii.Error, orjson.JSONDecodeError):
        return oauth_error("invalid_grant", "invalid assertion")
    issuer = unverified.get("iss") if isinstance(unverified, dict) else None
    public = grants.jwt_keys.get(issuer) if isinstance(issuer, str) else None
    if public is None or issuer not in em.world.apps:
        return oauth_error("invalid_client_id", "client identifier invalid")
    claims = _verify(assertion, public)
    if claims is None:
        return oauth_error("invalid_grant", "invalid assertion")
    now = time.time()
    exp = claims.get("exp")
    if not isinstance(exp, int) or exp <= now or exp > now + MAX_ASSERTION_LIFETIME:
        return oauth_error("invalid_grant", "expired authorization code")
    audiences = (*AUDIENCES, *(u for u in (em.base_url,) if u))
    if claims.get("aud") not in audiences:
        return oauth_error("invalid_grant", "audience is invalid")
    subject = claims.get("sub")
    org = next((o for o in em.world.orgs.values() if o.username == subject), None)
    if org is None:
        return oauth_error("invalid_grant", "user hasn't approved this consumer")
    return _issue(em, request, issuer, org)


def client_credentials(em: Emulator, request: web.Request, form: dict[str, str],
                       client_id: str | None, secret: str | None) -> web.Response:
    """``grant_type=client_credentials`` with the app's key and secret."""
    grants: ServerGrants = em.server_grants
    app = em.world.apps.get(client_id or "")
    if app is None:
        return oauth_error("invalid_client_id", "client identifier invalid")
    if secret is None or not hmac.compare_digest(secret.encode(), app.client_secret.encode()):
        return oauth_error("invalid_client", "invalid client credentials")
    customer = grants.run_as.get(app.client_id)
    if customer is None:
        return oauth_error("invalid_grant", "no client credentials user enabled")
    return _issue(em, request, app.client_id, em.ensure_customer(customer))
