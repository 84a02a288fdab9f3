"""Server-to-server tokens: the OAuth 2.0 JWT bearer and client credentials flows.

Neither flow has a refresh token, so there is nothing to rotate, reuse or
lose: a new access token is simply requested when the cached one is too old
or Salesforce refused it. What remains of the refresh-token machinery is what
makes it cheap and polite:

- the hot path is a dict lookup and a clock read (no I/O, no lock);
- concurrent callers for one customer share a single token request
  (:class:`~sfrtr.Singleflight`), so an expiry under load costs one request;
- a token refused again right after a new one was issued (no new token cures
  that) stops token requests for the customer for ``refused_backoff`` seconds.

:class:`ServerTokenSource` is what :class:`~sfrtr.Client` needs from a token
manager (``credentials``, ``refresh``, ``reject_session``, ``oauth``), so
``Client(customer, source)`` works unchanged. Salesforce answers carry no
expiry; ``session_lifetime`` is how long a token is trusted before a new one
is requested (the org's session timeout, 15 minutes at the shortest).
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import orjson

from sfrtr.errors import (
    ConfigurationError,
    InvalidTokenResponse,
    OAuthError,
    SessionRefused,
    TokenEndpointUnavailable,
)
from sfrtr.manager import Credentials
from sfrtr.oauth.client import OAuthClient
from sfrtr.secret import Secret
from sfrtr.singleflight import Singleflight

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_MAX_ANSWER = 64 * 1024


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class JwtBearer:
    """The JWT bearer flow: a connected app's certificate signs an assertion.

    ``client_id`` is the app's consumer key, ``username`` the user to act as
    (pre-authorized for the app), ``private_key`` the PEM of the key whose
    certificate is uploaded to the app. ``login_url`` is both where the token
    request goes and the assertion's audience (``https://login.salesforce.com``,
    ``https://test.salesforce.com`` or a My Domain login URL).
    """

    client_id: str
    username: str
    private_key: Secret
    login_url: str = "https://login.salesforce.com"
    lifetime: float = 180.0
    """Seconds the assertion is valid (Salesforce allows at most 3 minutes)."""

    def __post_init__(self) -> None:
        if not self.client_id or not self.username:
            raise ConfigurationError("client_id and username are required")
        if not isinstance(self.private_key, Secret):
            raise ConfigurationError("private_key must be wrapped in sfrtr.Secret")

    def _key(self) -> RSAPrivateKey:
        try:
            from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
            from cryptography.hazmat.primitives.serialization import load_pem_private_key
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise ConfigurationError(
                "the JWT bearer flow needs the cryptography package: "
                "pip install 'sfrtr[encryption]'") from None
        try:
            key = load_pem_private_key(self.private_key.reveal().encode(), password=None)
        except (ValueError, TypeError):
            raise ConfigurationError("private_key is not an unencrypted PEM key") from None
        if not isinstance(key, RSAPrivateKey):
            raise ConfigurationError("the JWT bearer flow signs with an RSA key (RS256)")
        return key

    def assertion(self, now: float | None = None) -> str:
        """A signed RS256 assertion: ``iss`` the app, ``sub`` the user, ``aud`` the login URL."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        issued = int(time.time() if now is None else now)
        header = _b64url(orjson.dumps({"alg": "RS256", "typ": "JWT"}))
        claims = _b64url(orjson.dumps({
            "iss": self.client_id, "sub": self.username, "aud": self.login_url.rstrip("/"),
            "exp": issued + int(self.lifetime), "jti": uuid.uuid4().hex}))
        signing_input = f"{header}.{claims}".encode()
        signature = self._key().sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{header}.{claims}.{_b64url(signature)}"

    def form(self) -> dict[str, str]:
        """The token request's form fields."""
        return {"grant_type": JWT_GRANT, "assertion": self.assertion()}


@dataclass(frozen=True)
class ClientCredentials:
    """The client credentials flow: the app's key and secret, acting as its run-as user.

    ``login_url`` must be the org's My Domain URL (Salesforce does not take this
    flow on login.salesforce.com).
    """

    client_id: str
    client_secret: Secret
    login_url: str

    def __post_init__(self) -> None:
        if not self.client_id or not isinstance(self.client_secret, Secret):
            raise ConfigurationError("client_id and a Secret client_secret are required")

    def form(self) -> dict[str, str]:
        """The token request's form fields."""
        return {"grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self.client_secret.reveal()}


Flow = JwtBearer | ClientCredentials


class _Entry:
    __slots__ = ("credentials", "refresh_at")

    def __init__(self, credentials: Credentials, refresh_at: float) -> None:
        self.credentials = credentials
        self.refresh_at = refresh_at


class ServerTokenSource:
    """Access tokens from server-to-server flows, one flow per customer.

    ``oauth`` supplies the HTTP session, the timeouts, the proxy and the
    instance URL policy (its own app settings are not used by the flows).
    """

    def __init__(self, oauth: OAuthClient, *, session_lifetime: float = 900.0,
                 margin: float = 60.0, refused_backoff: float = 60.0) -> None:
        if margin >= session_lifetime:
            raise ConfigurationError("margin must be shorter than session_lifetime")
        self.oauth = oauth
        self.session_lifetime = session_lifetime
        self.margin = margin
        self.refused_backoff = refused_backoff
        self.token_requests = 0
        """Token requests sent so far (a coalesced expiry adds one)."""
        self._flows: dict[str, Flow] = {}
        self._cache: dict[str, _Entry] = {}
        self._refused: dict[str, tuple[float, str]] = {}
        self._flights: Singleflight[str, _Entry] = Singleflight()

    def __repr__(self) -> str:
        return f"ServerTokenSource(customers={len(self._flows)})"

    async def __aenter__(self) -> ServerTokenSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._cache.clear()

    def add(self, customer: str, flow: Flow) -> None:
        """Serve ``customer`` with ``flow`` (replacing any earlier flow and token)."""
        self._flows[customer] = flow
        self._cache.pop(customer, None)
        self._refused.pop(customer, None)

    async def credentials(self, customer: str) -> Credentials:
        """A usable token: cached while fresh (no I/O), else one shared request."""
        entry = self._cache.get(customer)
        if entry is not None and time.monotonic() < entry.refresh_at:
            return entry.credentials
        return await self._fetch(customer)

    async def refresh(self, customer: str, *, stale: str) -> Credentials:
        """A token other than ``stale`` (which Salesforce refused)."""
        entry = self._cache.get(customer)
        if entry is not None and entry.credentials.access_token != stale and \
                time.monotonic() < entry.refresh_at:
            return entry.credentials
        refused = self._refused.get(customer)
        if refused is not None and time.time() < refused[0]:
            raise SessionRefused(customer, refused[1], refused[0])
        if entry is not None and entry.credentials.access_token == stale:
            del self._cache[customer]
        return await self._fetch(customer)

    async def reject_session(self, customer: str, access_token: str,
                             reason: str) -> SessionRefused:
        """A new token was refused too: stop asking for one for ``refused_backoff`` s.

        The refused token stays cached, so calls meanwhile fail on their 401
        with :class:`~sfrtr.SessionRefused` instead of requesting tokens.
        """
        until = time.time() + self.refused_backoff
        self._refused[customer] = (until, reason)
        return SessionRefused(customer, reason, until)

    async def _fetch(self, customer: str) -> Credentials:
        entry, _ = await self._flights.do(customer, self._request, customer)
        return entry.credentials

    async def _request(self, customer: str) -> _Entry:
        flow = self._flows.get(customer)
        if flow is None:
            raise ConfigurationError(f"no server-to-server flow for customer {customer!r}")
        config = self.oauth.config
        url = f"{flow.login_url.rstrip('/')}/services/oauth2/token"
        if not url.startswith(("https://", "http://")):
            raise ConfigurationError("login_url must be an http(s) URL")
        self.token_requests += 1
        try:
            async with self.oauth.session.post(
                    url, data=flow.form(), headers={"Accept": "application/json"},
                    allow_redirects=False, **config.request_options(url),
                    timeout=aiohttp.ClientTimeout(total=config.timeout,
                                                  connect=config.connect_timeout)) as resp:
                raw = await resp.content.read(_MAX_ANSWER + 1)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TokenEndpointUnavailable(
                f"{type(exc).__name__} asking {flow.login_url} for a token") from None
        try:
            body = orjson.loads(raw) if len(raw) <= _MAX_ANSWER else None
        except orjson.JSONDecodeError:
            body = None
        if status != 200:
            error = body.get("error") if isinstance(body, dict) else None
            description = body.get("error_description") if isinstance(body, dict) else None
            raise OAuthError(str(error or "invalid_response"), str(description or ""), status)
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str) or \
                not body["access_token"]:
            raise InvalidTokenResponse("token answer has no access_token")
        instance_url = config.instance_policy.validate(body.get("instance_url"))
        entry = _Entry(Credentials(body["access_token"], instance_url),
                       time.monotonic() + self.session_lifetime - self.margin)
        self._cache[customer] = entry
        return entry


__all__ = ["JWT_GRANT", "ClientCredentials", "JwtBearer", "ServerTokenSource"]
