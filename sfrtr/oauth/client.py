"""The OAuth client: refresh, code exchange, revoke, introspect.

Every refresh is classified into a :class:`~sfrtr.oauth.outcome.RefreshOutcome`;
only code exchange, revoke and introspect raise. Requests can leave through
an outbound proxy, so refreshes come from an allow-listed static IP
(Salesforce's Refresh Token IP Allowlist).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus, urlencode

import aiohttp
import orjson

from sfrtr.errors import (
    ConfigurationError,
    InvalidTokenResponse,
    OAuthError,
    TokenEndpointUnavailable,
)
from sfrtr.oauth.grant import TokenGrant, parse_grant
from sfrtr.oauth.instance_url import InstanceUrlPolicy
from sfrtr.oauth.outcome import OutcomeKind, RefreshOutcome
from sfrtr.secret import Secret

log = logging.getLogger(__name__)

BUSY_MARKER = "already being processed"
MAX_ANSWER_BYTES = 64 * 1024
LEASE_TOO_SHORT = "lease_too_short"
"""``RefreshOutcome.error`` when the caller's lease could not cover the request."""
REDIRECT_REFUSED = "redirect_refused"

#: Failures that happen before the request is written: the token is untouched.
_BEFORE_SEND: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,  # refused, DNS, TLS handshake, proxy connect
    aiohttp.ConnectionTimeoutError,
    aiohttp.InvalidURL,
    # The proxy refused the CONNECT (407, 403, 502): no tunnel, nothing reached the
    # token endpoint. aiohttp raises this only while setting up the tunnel.
    aiohttp.ClientHttpProxyError,
)


@dataclass(frozen=True, slots=True)
class Introspection:
    """What introspection says of a token: whether it is live, and its times
    (epoch seconds) when the provider tells them."""

    active: bool
    expires_at: float | None = None
    issued_at: float | None = None
    token_type: str = ""


@dataclass(frozen=True)
class OAuthConfig:
    """How to reach the token endpoint, and as whom."""

    client_id: str
    client_secret: Secret | None = None
    """Confidential apps sign answers with it; ``None`` for public PKCE clients."""
    login_url: str = "https://login.salesforce.com"
    instance_policy: InstanceUrlPolicy = field(default_factory=InstanceUrlPolicy)
    timeout: float = 10.0
    """Seconds for a whole token request. Also bounds a refresh's critical section."""
    connect_timeout: float = 5.0
    head_grace: float = 0.25
    """Seconds past ``timeout`` for an answer that may already sit in the socket buffer."""
    answer_grace: float = 2.0
    """Seconds past ``timeout`` granted to an answer whose head has arrived."""
    max_concurrent: int = 64
    """Token-endpoint requests in flight at once; more wait their turn before
    sending (a storm of refreshes must not become a storm of TCP connects)."""
    proxy: str | None = None
    """Outbound HTTP(S) proxy URL for token and API requests."""
    proxy_auth: tuple[str, Secret] | None = None
    """Proxy username and password."""

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ConfigurationError("client_id is required")
        if self.client_secret is not None and not isinstance(self.client_secret, Secret):
            raise ConfigurationError("client_secret must be wrapped in sfrtr.Secret")
        if not self.login_url.startswith(("https://", "http://")):
            raise ConfigurationError("login_url must be an http(s) URL")
        if self.max_concurrent < 1:
            raise ConfigurationError("max_concurrent must be at least 1")
        if self.connect_timeout >= self.timeout:
            raise ConfigurationError("connect_timeout must be shorter than timeout")
        if self.head_grace < 0 or self.answer_grace < 0:
            raise ConfigurationError("answer graces cannot be negative")

    @property
    def exchange_limit(self) -> float:
        """The longest one token request can take, graces included: after this, a
        request sent by this client can no longer be waiting for its answer."""
        return self.timeout + self.head_grace + self.answer_grace

    @property
    def token_url(self) -> str:
        """The token endpoint: ``login_url`` + ``/services/oauth2/token``."""
        return self.login_url.rstrip("/") + "/services/oauth2/token"

    def request_options(self, url: str) -> dict[str, Any]:
        """Proxy keyword arguments for an aiohttp request to ``url``.

        Proxy credentials go on the CONNECT request for https targets, and on
        the request itself for plain http (aiohttp does not copy them there);
        never both, so they never travel inside the tunnel to the target.
        """
        if not self.proxy:
            return {}
        options: dict[str, Any] = {"proxy": self.proxy}
        if self.proxy_auth:
            user, password = self.proxy_auth
            header = {"Proxy-Authorization": basic_credentials(user, password.reveal())}
            options["proxy_headers" if url.startswith("https:") else "headers"] = header
        return options


class OAuthClient:
    """Talks to one connected app's token endpoint.

    Without ``session`` it makes its own aiohttp session on first use and closes
    it in :meth:`aclose`; a session passed in stays the caller's to close. Use it
    as ``async with OAuthClient(config) as oauth:`` to close it on the way out.
    Transport failures never escape as aiohttp's exceptions: a refresh is
    classified (:class:`RefreshOutcome`), the other calls raise
    :class:`~sfrtr.TokenEndpointUnavailable`.
    """

    def __init__(self, config: OAuthConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self._session = session
        self._owns_session = session is None
        # Only the connect phase is aiohttp's to time out (a connect timeout
        # means nothing was sent); the whole exchange is bounded in _post.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout)
        self._slots: asyncio.Semaphore | None = None

    def for_host(self, login_url: str) -> OAuthClient:
        """The same connected app on another login host (a sandbox's
        ``https://test.salesforce.com``, a customer's My Domain), sharing this
        client's session. The host must pass the config's instance-URL policy
        (https on a Salesforce domain by default), so a login host taken from a
        request can never send the app's credentials elsewhere."""
        try:
            origin = self.config.instance_policy.validate(login_url)
        except InvalidTokenResponse:
            raise ConfigurationError(
                f"login host {login_url[:200]!r} is not allowed: use https on a Salesforce "
                "domain (login, test, or a My Domain)") from None
        if origin == self.config.login_url.rstrip("/"):
            return self
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_concurrent)
        other = OAuthClient(dataclasses.replace(self.config, login_url=origin), self.session)
        other._slots = self._slots  # one cap on concurrent token requests, all hosts
        return other

    @property
    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session requests go through (made here when none was given)."""
        if self._session is None or self._session.closed:
            # One pool for token and API calls. aiohttp's default cap of 100
            # connections queues requests unfairly under load; allow more.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0))
            self._owns_session = True
        return self._session

    async def __aenter__(self) -> OAuthClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session this client made (not one it was given). Idempotent."""
        if self._owns_session and self._session is not None:
            await self._session.close()

    def _form(self, **fields: str) -> dict[str, str]:
        form = {"client_id": self.config.client_id, **fields}
        if self.config.client_secret is not None:
            form["client_secret"] = self.config.client_secret.reveal()
        return form

    async def _post(self, url: str, form: dict[str, str],
                    budget: Callable[[], float | None] | None = None) -> tuple[int, bytes]:
        """POST a form; the whole exchange is bounded by ``config.timeout``.

        The deadline is ours, not aiohttp's, for one reason: an answer that
        has already arrived must not be thrown away because the deadline
        passed while this process was paused (a stopped or starved process
        wakes with both the answer and the expired timer ready). If the
        answer's head arrived, the body gets ``answer_grace`` more seconds.

        ``budget`` is asked after the wait for a slot, with no await between
        the check and the exchange's start: if it gives less than
        :attr:`OAuthConfig.exchange_limit` seconds, :class:`_NoBudget` is
        raised and nothing is sent (the caller's lease would not cover the
        request). Checked before a wait, a pause of the process in between
        (one loop iteration is enough for a GC pause or a SIGSTOP to land) let
        a request leave long after its lease.
        """
        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self.config.max_concurrent)
        # Not ``async with``: a storm queues here, and every coroutine it keeps alive
        # while it waits is one more object for the garbage collector to walk.
        await slots.acquire()  # waiting here sends nothing and starts no deadline
        try:
            if budget is not None:
                left = budget()
                if left is not None and left < self.config.exchange_limit:
                    raise _NoBudget(left)
            # The exchange runs in this task (no task of its own): a deadline that
            # runs out cancels it, as ``asyncio.timeout`` does, and the cancellation
            # comes back out as a TimeoutError; one the caller asked for stays one.
            task = asyncio.current_task()
            assert task is not None
            deadline = _Deadline(task, self.config)
            try:
                return await self._exchange(url, form, deadline)
            except asyncio.CancelledError:
                if deadline.settle():
                    raise TimeoutError("token endpoint did not answer in time") from None
                raise
            finally:
                deadline.disarm()
        finally:
            slots.release()

    async def _exchange(self, url: str, form: dict[str, str],
                        answered: _Deadline) -> tuple[int, bytes]:
        if self.config.proxy:
            options = self.config.request_options(url)
            headers = {**_HEADERS, **options.pop("headers", {})}
        else:
            options, headers = _NO_OPTIONS, _HEADERS
        # Never follow a redirect: a 307/308 would re-post the refresh token and the
        # client secret to whatever host the answer names.
        async with self.session.post(url, data=_encode(form), timeout=self._timeout,
                                     headers=headers, allow_redirects=False,
                                     **options) as resp:
            answered.set()
            body = bytearray()
            while chunk := await resp.content.read(MAX_ANSWER_BYTES + 1 - len(body)):
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise InvalidTokenResponse("token endpoint answer is too large")
            return resp.status, bytes(body)

    # -- refresh -------------------------------------------------------------

    async def refresh(self, refresh_token: Secret, *,
                      budget: Callable[[], float | None] | None = None) -> RefreshOutcome:
        """Present ``refresh_token`` once and classify what happened. Never raises
        for the provider's or the network's failures.

        ``budget`` (seconds the caller can still vouch for, e.g. its lease's
        remaining time less a margin; ``None``: unbounded) is checked after any
        queueing, immediately before the request starts. Too little gives a
        ``NOT_SENT`` outcome with error :data:`LEASE_TOO_SHORT`.
        """
        form = self._form(grant_type="refresh_token", refresh_token=refresh_token.reveal())
        try:
            status, raw = await self._post(self.config.token_url, form, budget)
        except _NoBudget as exc:
            return RefreshOutcome(OutcomeKind.NOT_SENT, error=LEASE_TOO_SHORT,
                                  description=f"only {exc.left:.1f}s left (lease, or reuse "
                                  f"window) for a {self.config.exchange_limit:.1f}s request; "
                                  "not sent")
        except _BEFORE_SEND as exc:
            return RefreshOutcome(OutcomeKind.NOT_SENT, error=type(exc).__name__,
                                  description="could not connect to the token endpoint")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return RefreshOutcome(OutcomeKind.INDETERMINATE, error=type(exc).__name__,
                                  description="request sent, no answer received")
        except InvalidTokenResponse as exc:
            return RefreshOutcome(OutcomeKind.INVALID, error="InvalidTokenResponse",
                                  description=str(exc))
        return self._classify(status, raw)

    def _classify(self, status: int, raw: bytes) -> RefreshOutcome:
        if status >= 500:
            return RefreshOutcome(OutcomeKind.INDETERMINATE, error=f"http_{status}",
                                  description="token endpoint answered with a server error")
        if 300 <= status < 400:
            # A redirect is an answer from a server that did not process the request
            # (and the request was not re-sent anywhere): the token is untouched.
            return RefreshOutcome(OutcomeKind.NOT_SENT, error=REDIRECT_REFUSED,
                                  description=f"token endpoint answered {status} (a redirect); "
                                  "not followed: check login_url")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if 200 <= status < 300:
            try:
                grant = parse_grant(body, policy=self.config.instance_policy,
                                    client_secret=self.config.client_secret)
            except InvalidTokenResponse as exc:
                # A 2xx means the presented token may be burnt: keep its successor
                # whenever it can be read, even from an answer we refuse to use.
                return RefreshOutcome(OutcomeKind.INVALID, error="InvalidTokenResponse",
                                      description=str(exc), salvaged=salvage_refresh(body))
            return RefreshOutcome(OutcomeKind.OK, grant=grant)
        error, description = _error_fields(body)
        if error == "invalid_grant":
            if BUSY_MARKER in description.lower():
                return RefreshOutcome(OutcomeKind.BUSY, error=error, description=description)
            return RefreshOutcome(OutcomeKind.REJECTED, error=error, description=description)
        if status == 407 or (400 <= status < 500 and error):
            # Our proxy refused us, or the provider refused the client
            # (invalid_client, unsupported_grant_type...): nothing was redeemed.
            return RefreshOutcome(OutcomeKind.NOT_SENT, error=error, description=description)
        return RefreshOutcome(OutcomeKind.INDETERMINATE, error=f"http_{status}",
                              description="unrecognised token endpoint answer")

    # -- the other calls -----------------------------------------------------

    def authorize_url(self, *, redirect_uri: str, state: str, code_challenge: str,
                      scope: str = "api refresh_token", login_hint: str | None = None) -> str:
        """The URL to send the customer's browser to (web-server flow with PKCE S256):
        the answer comes back to ``redirect_uri`` with ``code`` and ``state``."""
        params = {"response_type": "code", "client_id": self.config.client_id,
                  "redirect_uri": redirect_uri, "state": state, "scope": scope,
                  "code_challenge": code_challenge, "code_challenge_method": "S256"}
        if login_hint:
            params["login_hint"] = login_hint
        return f"{self.config.login_url.rstrip('/')}/services/oauth2/authorize?{urlencode(params)}"

    async def exchange_code(self, code: str, *, redirect_uri: str,
                            code_verifier: str) -> TokenGrant:
        """Turn an authorization code into the first grant (PKCE S256)."""
        form = self._form(grant_type="authorization_code", code=code,
                          redirect_uri=redirect_uri, code_verifier=code_verifier)
        status, body = await self._call(self.config.token_url, form)
        if not 200 <= status < 300:
            raise _oauth_error(status, body)
        grant = parse_grant(body, policy=self.config.instance_policy,
                            client_secret=self.config.client_secret)
        if grant.refresh_token is None:
            raise InvalidTokenResponse(
                "code exchange returned no refresh_token; add the refresh_token scope")
        return dataclasses.replace(grant, token_host=self.config.login_url.rstrip("/"),
                                   client_id=self.config.client_id)

    async def revoke(self, token: Secret) -> None:
        """Revoke a token (a refresh token revokes its whole grant).
        Raises :class:`~sfrtr.OAuthError` on refusal."""
        url = self.config.login_url.rstrip("/") + "/services/oauth2/revoke"
        status, body = await self._call(url, {"token": token.reveal()})
        if status != 200:
            raise _oauth_error(status, body)

    async def introspect(self, token: Secret, *, hint: str = "refresh_token") -> Introspection:
        """Ask whether ``token`` is live (never presents it for redemption).
        Raises :class:`~sfrtr.OAuthError` on refusal."""
        url = self.config.login_url.rstrip("/") + "/services/oauth2/introspect"
        status, body = await self._call(url, self._form(token=token.reveal(),
                                                        token_type_hint=hint))
        if status != 200:
            raise _oauth_error(status, body)
        if not isinstance(body, dict) or not isinstance(body.get("active"), bool):
            raise InvalidTokenResponse("introspection answer has no boolean 'active'")
        exp, iat = body.get("exp"), body.get("iat")
        return Introspection(
            active=body["active"],
            expires_at=float(exp) if isinstance(exp, int | float) else None,
            issued_at=float(iat) if isinstance(iat, int | float) else None,
            token_type=body.get("token_type", "") if isinstance(body.get("token_type"), str)
            else "")

    async def _call(self, url: str, form: dict[str, str]) -> tuple[int, Any]:
        try:
            status, raw = await self._post(url, form)
        except _BEFORE_SEND as exc:
            raise TokenEndpointUnavailable(f"token endpoint request failed ({type(exc).__name__}):"
                                           " nothing was sent") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # After sending: a code exchange may have used the code, a revocation landed.
            raise TokenEndpointUnavailable(f"token endpoint request failed ({type(exc).__name__}):"
                                           " sent, no answer; it may have been processed"
                                           ) from None
        if not raw:
            return status, None
        try:
            return status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            if 200 <= status < 300:
                raise InvalidTokenResponse("token endpoint answer is not JSON") from None
            return status, None


class _Deadline:
    """A token request's deadline, on the loop's timers, for the task making it.

    At ``timeout`` it looks at whether the answer's head has arrived (:meth:`set`):
    if so the body gets ``answer_grace`` more seconds; if not, ``head_grace`` is
    left for a head that may already sit in the socket buffer (a paused process
    wakes with the timer and the answer both ready), and ``answer_grace`` after
    it if it comes. Then the task is cancelled, and :meth:`settle` tells that
    cancellation apart from one the caller asked for. At most
    :attr:`OAuthConfig.exchange_limit` seconds in all.

    Cancelling the task itself (not a task made for the exchange) is safe because
    the timers are disarmed with no await between the exchange's end and
    :meth:`disarm`: a timer can only fire while the task waits inside it.
    """

    __slots__ = ("answered", "before", "config", "fired", "handle", "loop", "overtime", "task")

    def __init__(self, task: asyncio.Task[Any], config: OAuthConfig) -> None:
        self.task = task
        self.config = config
        self.loop = task.get_loop()
        self.answered = False
        self.overtime = False
        self.fired = False
        self.before = task.cancelling()  # requests to cancel the task already pending
        self.handle: asyncio.TimerHandle | None = self.loop.call_later(config.timeout,
                                                                       self._due)

    def set(self) -> None:
        """The answer's head has arrived."""
        if not self.answered:
            self.answered = True
            if self.overtime and not self.fired:
                # In the head's grace: from now on the body's grace.
                self._arm(self.config.answer_grace, self._expire)

    def is_set(self) -> bool:
        return self.answered

    def _arm(self, delay: float, then: Callable[[], None]) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.handle = self.loop.call_later(delay, then)

    def _due(self) -> None:
        self.handle = None
        self.overtime = True
        if self.answered:
            self._arm(self.config.answer_grace, self._expire)
        else:
            self._arm(self.config.head_grace, self._expire)

    def _expire(self) -> None:
        self.handle = None
        self.fired = True
        self.task.cancel()

    def settle(self) -> bool:
        """After a ``CancelledError``: whether it is the deadline's alone (then the
        task's cancellation request is withdrawn, as ``asyncio.timeout`` does)."""
        if not self.fired:
            return False
        self.fired = False
        return self.task.uncancel() <= self.before

    def disarm(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if self.fired:  # fired, but the exchange ended some other way: withdraw it
            self.fired = False
            self.task.uncancel()


_HEADERS = {"Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded"}
_NO_OPTIONS: dict[str, Any] = {}


def _encode(form: dict[str, str]) -> bytes:
    """The form, urlencoded as ``urlencode`` does (and aiohttp would, through its
    FormData machinery, on every token request)."""
    return "&".join([f"{_KEYS.get(k) or quote_plus(k)}={v if _PLAIN(v) else quote_plus(v)}"
                     for k, v in form.items()]).encode("ascii")


#: What ``quote_plus`` leaves as it is (most tokens and ids are only that).
_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch


#: The field names this client sends, which need no quoting.
_KEYS = {k: k for k in ("client_id", "client_secret", "grant_type", "refresh_token", "code",
                        "redirect_uri", "code_verifier", "token", "token_type_hint")}


class _NoBudget(Exception):
    def __init__(self, left: float) -> None:
        super().__init__(f"{left:.1f}s left")
        self.left = left


def salvage_refresh(body: Any) -> Secret | None:
    """The refresh token of a 2xx answer that failed validation, if it can be read."""
    if isinstance(body, dict):
        token = body.get("refresh_token")
        if isinstance(token, str) and 0 < len(token) <= 4096 and token.isprintable():
            return Secret(token)
    return None


def basic_credentials(user: str, password: str) -> str:
    """An HTTP Basic credentials header value (RFC 7617)."""
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Basic {raw}"


def _error_fields(body: Any) -> tuple[str, str]:
    if isinstance(body, dict):
        error, description = body.get("error"), body.get("error_description", "")
        if isinstance(error, str) and isinstance(description, str):
            return error, description
    return "", ""


def _oauth_error(status: int, body: Any) -> OAuthError:
    error, description = _error_fields(body)
    return OAuthError(error or f"http_{status}", description, status)

