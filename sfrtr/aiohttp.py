"""Embed sfrtr in an aiohttp application.

``setup(app, ...)`` creates the token manager (and its HTTP session and
store) with the app's lifecycle and adds the OAuth web-server flow as
routes::

    GET  {prefix}/connect      redirect to Salesforce (state + PKCE S256)
    GET  {prefix}/callback     validate state, exchange the code, store the grant
    POST {prefix}/disconnect   revoke and delete the grant (same-site, CSRF token)

In a handler, ``await sfrtr.aiohttp.client(request)`` is the customer's
:class:`~sfrtr.Client`. The app says which customer a request is for with
``customer_of(request)``.

What the flow defends against (``docs/security.md``):

- a forged or expired ``state`` (HMAC-signed, bound to the redirect URI);
- a callback finished in another browser (the PKCE verifier stays in a cookie of
  the browser that started the flow, under an HMAC bound to the state's nonce);
- a replayed callback, on any worker: the state's nonce is claimed once in the
  shared store (:meth:`~sfrtr.store.base.OnceStore.claim_once`);
- a cross-site ``POST /disconnect``: refused unless its ``Origin`` (or
  ``Referer``) is this site's and it carries the CSRF token of
  :func:`csrf_token`, an HMAC of a ``SameSite=Strict`` cookie and the customer.
"""

from __future__ import annotations

import html
import inspect
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from yarl import URL

from sfrtr.errors import (
    ConfigurationError,
    InvalidTokenResponse,
    OAuthError,
    SfrtrError,
    StoreError,
    TokenEndpointUnavailable,
)
from sfrtr.hooks import Hooks
from sfrtr.manager import TokenManager
from sfrtr.oauth import pkce
from sfrtr.oauth.client import OAuthClient, OAuthConfig
from sfrtr.oauth.grant import TokenGrant
from sfrtr.oauth_state import InvalidState, State, StateSigner
from sfrtr.policy import RefreshPolicy
from sfrtr.salesforce.client import Client
from sfrtr.secret import Secret
from sfrtr.store.base import OnceStore, TokenStore
from sfrtr.store.memory import MemoryStore

log = logging.getLogger(__name__)

CustomerOf = Callable[[web.Request], str | Awaitable[str]]
ErrorPage = Callable[[str, int, str], web.StreamResponse | Awaitable[web.StreamResponse]]
"""``error_page(kind, status, message)``: the app's own page for a failed step.
``kind`` is one of :data:`ERROR_KINDS`; ``message`` carries no secret, but may quote
the error text of Salesforce's answer or of the callback's query: escape it."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SuccessUrl = str | Callable[[str], str]
"""Where the browser goes after connecting: a URL, or ``customer -> URL``."""

PKCE_COOKIE = "sfrtr_pkce"
CSRF_COOKIE = "sfrtr_csrf"
CSRF_FIELD = "csrf_token"
"""The form field (or the ``X-CSRF-Token`` header) that carries the CSRF token."""
ERROR_KINDS = ("denied", "incomplete", "invalid_state", "wrong_browser", "replayed",
               "refused", "unavailable", "bad_answer", "cross_site", "on_connect_failed",
               "bad_host")
_STATE_CLAIM_MARGIN = 60.0  # seconds a used nonce is kept past the state's own expiry


@dataclass(frozen=True, slots=True)
class Connected:
    """What ``on_connect`` receives once a grant is stored."""

    customer: str
    org_id: str
    user_id: str
    instance_url: str

    @classmethod
    def of(cls, customer: str, grant: TokenGrant) -> Connected:
        # The identity URL is https://login.salesforce.com/id/<org id>/<user id>.
        parts = urlsplit(grant.identity_url).path.rstrip("/").split("/")
        org, user = (parts[-2], parts[-1]) if len(parts) >= 3 and parts[-3] == "id" \
            else ("", "")
        return cls(customer, org, user, grant.instance_url)


OnConnect = Callable[[Connected], Awaitable[None] | None]
LoginHost = Callable[[web.Request], str | Awaitable[str | None] | None]
"""The login host a customer's flow starts at: ``https://test.salesforce.com`` for a
sandbox, a My Domain, or ``None`` for the app's own. Checked against the app's
instance-URL policy (https on a Salesforce domain by default) before use."""


@dataclass
class Integration:
    """What ``setup`` wired into the app; reachable as ``app[INTEGRATION]``."""

    oauth_config: OAuthConfig
    store_factory: Callable[[], TokenStore]
    policy: RefreshPolicy
    customer_of: CustomerOf
    signer: StateSigner
    prefix: str
    redirect_uri: str | None
    success_url: SuccessUrl
    scope: str
    secure_cookies: bool | None = None
    error_page: ErrorPage | None = None
    on_connect: OnConnect | None = None
    trusted_origins: frozenset[str] = field(default_factory=frozenset)
    disconnected_url: SuccessUrl | None = None
    login_host: LoginHost | None = None
    hooks: Hooks | None = None
    apps: tuple[OAuthConfig, ...] = ()
    manager: TokenManager | None = None


INTEGRATION: web.AppKey[Integration] = web.AppKey("sfrtr_integration", Integration)
MANAGER: web.AppKey[TokenManager] = web.AppKey("sfrtr_manager", TokenManager)
# A request key (aiohttp >= 3.13 has typed ones; older versions take a string).
_NEW_CSRF: Any = getattr(web, "RequestKey", lambda name, kind: name)("sfrtr_new_csrf", str)


def setup(app: web.Application, *, oauth_config: OAuthConfig, customer_of: CustomerOf,
          state_key: Secret, store_factory: Callable[[], TokenStore] = MemoryStore,
          policy: RefreshPolicy | None = None, prefix: str = "/salesforce",
          redirect_uri: str | None = None, success_url: SuccessUrl = "/",
          scope: str = "api refresh_token", secure_cookies: bool | None = None,
          error_page: ErrorPage | None = None, on_connect: OnConnect | None = None,
          trusted_origins: tuple[str, ...] = (),
          disconnected_url: SuccessUrl | None = None, login_host: LoginHost | None = None,
          hooks: Hooks | None = None, apps: Iterable[OAuthConfig] = ()) -> Integration:
    """Wire sfrtr into ``app``.

    ``redirect_uri`` defaults to this app's callback URL as seen by the request
    (set it explicitly behind a proxy). ``success_url``: where a connected browser
    goes (a URL, or a function of the customer); ``disconnected_url`` likewise
    after a disconnect (default: ``success_url``). ``secure_cookies``: mark the
    flow's cookies ``Secure``; default on, except when the redirect URI is plain
    http on a loopback host (local development). ``error_page(kind, status,
    message)`` renders failed steps (default: a plain page). ``on_connect(info)``
    runs after a grant is stored (:class:`Connected`). ``trusted_origins``:
    origins besides this app's own (and the redirect URI's) allowed to post a
    disconnect (``"https://admin.example.com"``). ``login_host(request)``: the login
    host this customer authorizes at (a sandbox switch, a My Domain; ``None``: the
    app's own), refused with a 400 page unless the policy allows it; the grant
    remembers it. ``hooks``: the manager's :class:`~sfrtr.Hooks`. ``apps``: more
    connected apps whose grants the manager serves beside ``oauth_config``'s (during
    a move from one app to another: new customers connect through ``oauth_config``,
    grants of the old app keep refreshing through it; see ``docs/lifecycle.md``).
    """
    origins = frozenset(_origin(o) for o in trusted_origins)
    integration = Integration(oauth_config, store_factory, policy or RefreshPolicy(),
                              customer_of, StateSigner(state_key), prefix.rstrip("/"),
                              redirect_uri, success_url, scope, secure_cookies, error_page,
                              on_connect, origins, disconnected_url, login_host, hooks,
                              tuple(apps))
    app[INTEGRATION] = integration
    app.cleanup_ctx.append(_lifecycle)
    app.middlewares.append(_set_csrf_cookie)
    app.router.add_get(f"{integration.prefix}/connect", _connect)
    app.router.add_get(f"{integration.prefix}/callback", _callback)
    app.router.add_post(f"{integration.prefix}/disconnect", _disconnect)
    return integration


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    integration = app[INTEGRATION]
    manager = TokenManager(OAuthClient(integration.oauth_config), integration.store_factory(),
                           integration.policy, hooks=integration.hooks,
                           apps=[OAuthClient(config) for config in integration.apps])
    integration.manager = manager
    app[MANAGER] = manager
    yield
    await manager.aclose()


def manager(request: web.Request) -> TokenManager:
    """The app's token manager."""
    return request.app[MANAGER]


async def client(request: web.Request, customer: str | None = None) -> Client:
    """The Salesforce client for ``customer``, by default the request's own
    (``customer_of(request)``; 403 if it names none)."""
    name = customer if customer is not None else await customer_for(request)
    return Client(name, request.app[MANAGER])


async def customer_for(request: web.Request) -> str:
    """The customer ``customer_of`` names for this request (403 if none)."""
    result = request.app[INTEGRATION].customer_of(request)
    customer = await result if inspect.isawaitable(result) else result
    if not isinstance(customer, str) or not customer:
        raise web.HTTPForbidden(text="no customer for this request")
    return customer


async def csrf_token(request: web.Request, customer: str | None = None) -> str:
    """The token a disconnect form must carry (field ``csrf_token``), for this
    browser and ``customer`` (default: the request's). Sets the browser's CSRF
    cookie with the response if it has none yet."""
    integration = request.app[INTEGRATION]
    name = customer if customer is not None else await customer_for(request)
    session = request.cookies.get(CSRF_COOKIE) or request.get(_NEW_CSRF)
    if not session:
        session = secrets.token_urlsafe(24)
        request[_NEW_CSRF] = session
    return integration.signer.mac(f"csrf\0{session}\0{name}")


@web.middleware
async def _set_csrf_cookie(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Send the CSRF cookie that :func:`csrf_token` made for this request, if any."""
    response = await handler(request)
    session = request.get(_NEW_CSRF)
    if session and INTEGRATION in request.app and not response.prepared:
        # Strict: the browser never sends it with a request another site started.
        response.set_cookie(CSRF_COOKIE, session, httponly=True, samesite="Strict",
                            secure=_secure(request), path="/")
    return response


def _redirect_uri(request: web.Request) -> str:
    integration = request.app[INTEGRATION]
    if integration.redirect_uri:
        return integration.redirect_uri
    return str(request.url.with_path(f"{integration.prefix}/callback").with_query(None))


def _loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _secure(request: web.Request) -> bool:
    """Whether the flow's cookies are ``Secure``: the setting, else on unless the
    redirect URI is plain http on loopback. Not ``request.secure``: behind a proxy
    that ends TLS, the request arrives over http while the browser uses https."""
    setting = request.app[INTEGRATION].secure_cookies
    if setting is not None:
        return setting
    uri = URL(_redirect_uri(request))
    return not (uri.scheme == "http" and _loopback(uri.host))


def _origin(url: str) -> str:
    parts = URL(url)
    if not parts.scheme or not parts.host:
        return ""
    return str(parts.origin())


def _url_for(target: SuccessUrl, customer: str) -> str:
    return target(customer) if callable(target) else target


def _page(status: int, title: str, detail: str) -> web.Response:
    body = (f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(detail)}</p>")
    return web.Response(status=status, text=body, content_type="text/html")


_TITLES = {
    "denied": "Salesforce did not authorize the app",
    "incomplete": "Incomplete callback",
    "invalid_state": "Invalid authorization state",
    "wrong_browser": "Invalid authorization state",
    "replayed": "Invalid authorization state",
    "refused": "Salesforce refused the authorization",
    "unavailable": "Salesforce is unavailable: please try again",
    "bad_answer": "Salesforce's answer could not be used: please try again",
    "cross_site": "Request refused",
    "on_connect_failed": "Connected, but the app could not finish: please try again",
    "bad_host": "This Salesforce login host is not allowed",
}


async def _error(request: web.Request, kind: str, status: int,
                 message: str) -> web.StreamResponse:
    render = request.app[INTEGRATION].error_page
    if render is None:
        return _page(status, _TITLES[kind], message)
    result = render(kind, status, message)
    return await result if inspect.isawaitable(result) else result


async def _connect(request: web.Request) -> web.StreamResponse:
    integration = request.app[INTEGRATION]
    customer = await customer_for(request)
    redirect_uri = _redirect_uri(request)
    oauth = request.app[MANAGER].oauth
    if integration.login_host is not None:
        chosen = integration.login_host(request)
        host = await chosen if inspect.isawaitable(chosen) else chosen
        if host:
            try:
                oauth = oauth.for_host(host)
            except ConfigurationError as exc:
                return await _error(request, "bad_host", 400, str(exc))
    host = "" if oauth is request.app[MANAGER].oauth else oauth.config.login_url
    state, parsed = integration.signer.sign(customer, redirect_uri, host)
    verifier = pkce.make_verifier()
    location = oauth.authorize_url(redirect_uri=redirect_uri, state=state,
                                   code_challenge=pkce.challenge(verifier),
                                   scope=integration.scope,
                                   login_hint=request.query.get("login_hint"))
    response = web.Response(status=302, headers={"Location": location})
    # The verifier stays with the browser that started the flow, bound to this
    # state's nonce; it never travels through Salesforce. Lax, not Strict: the
    # callback is a top-level navigation that Salesforce's page starts.
    cookie = f"{parsed.nonce}.{verifier}.{integration.signer.mac(parsed.nonce + verifier)}"
    response.set_cookie(PKCE_COOKIE, cookie, max_age=int(integration.signer.ttl),
                        httponly=True, samesite="Lax", secure=_secure(request),
                        path=f"{integration.prefix}/callback")
    return response


async def _claim(request: web.Request, state: State) -> bool:
    """Claim the state's nonce once for every worker sharing the store (a store
    without ``claim_once`` falls back to this process's memory)."""
    store = request.app[MANAGER].store
    if isinstance(store, OnceStore):
        ttl = max(1.0, state.expires_at - time.time()) + _STATE_CLAIM_MARGIN
        return await store.claim_once(f"oauth-state/{state.nonce}", ttl)
    return request.app[INTEGRATION].signer.claim_locally(state.nonce, state.expires_at)


async def _callback(request: web.Request) -> web.StreamResponse:
    integration = request.app[INTEGRATION]
    q = request.query
    if "error" in q:
        return await _error(request, "denied", 400,
                            f"{q.get('error')}: {q.get('error_description', '')}")
    code, state_text = q.get("code"), q.get("state")
    if not code or not state_text:
        return await _error(request, "incomplete", 400, "the code or the state is missing")
    try:
        state = integration.signer.check(state_text, _redirect_uri(request))
    except InvalidState as exc:
        return await _error(request, "invalid_state", 400, str(exc))
    nonce, _, rest = request.cookies.get(PKCE_COOKIE, "").partition(".")
    verifier, _, mac = rest.partition(".")
    if not verifier or not secrets.compare_digest(nonce.encode(), state.nonce.encode()) or \
            not integration.signer.mac_matches(nonce + verifier, mac):
        return await _error(request, "wrong_browser", 400,
                            "this browser did not start this authorization")
    try:
        first_use = await _claim(request, state)
    except StoreError:
        log.warning("OAuth callback: the store could not record the state's use")
        return await _error(request, "unavailable", 503,
                            "the token store is unavailable; please try again")
    if not first_use:
        return await _error(request, "replayed", 400, "state already used")
    manager_ = request.app[MANAGER]
    try:
        # The host the flow started at (signed into the state), checked again.
        oauth = manager_.oauth.for_host(state.login_host) if state.login_host else \
            manager_.oauth
        grant = await oauth.exchange_code(code, redirect_uri=state.redirect_uri,
                                          code_verifier=verifier)
    except ConfigurationError as exc:
        return await _error(request, "bad_host", 400, str(exc))
    except OAuthError as exc:
        if exc.status >= 500 or exc.status == 429:
            return await _error(request, "unavailable", 503,
                                f"Salesforce answered {exc.status}; please try again")
        return await _error(request, "refused", 400, str(exc))
    except TokenEndpointUnavailable:
        return await _error(request, "unavailable", 503,
                            "Salesforce could not be reached; please try again")
    except InvalidTokenResponse as exc:
        return await _error(request, "bad_answer", 502, f"{exc}; please try again")
    except SfrtrError as exc:
        return await _error(request, "unavailable", 502,
                            f"Salesforce could not be reached ({type(exc).__name__}); "
                            "please try again")
    try:
        await manager_.connect(state.customer, grant)
    except StoreError:
        log.error("customer %s: the grant could not be stored", state.customer)
        return await _error(request, "unavailable", 503,
                            "the token store is unavailable; please try again")
    log.info("customer %s connected through the OAuth flow", state.customer)
    if integration.on_connect is not None:
        try:
            result = integration.on_connect(Connected.of(state.customer, grant))
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("customer %s: the on_connect hook failed", state.customer)
            return await _error(request, "on_connect_failed", 500,
                                "the authorization was stored, but the app could not "
                                "finish setting up; please try again")
    location = _url_for(integration.success_url, state.customer)
    response = web.Response(status=302, headers={"Location": location})
    response.del_cookie(PKCE_COOKIE, path=f"{integration.prefix}/callback")
    return response


def _allowed_origins(request: web.Request) -> set[str]:
    integration = request.app[INTEGRATION]
    allowed = {str(request.url.origin()), _origin(_redirect_uri(request)),
               *integration.trusted_origins}
    allowed.discard("")
    return allowed


def _same_site(request: web.Request) -> bool:
    """The ``Origin`` header if sent (browsers send it with every POST), else the
    ``Referer``'s origin; a request with neither is left to the CSRF token."""
    origin = request.headers.get("Origin")
    if origin is None:
        referer = request.headers.get("Referer")
        if referer is None:
            return True
        origin = _origin(referer)
    return origin in _allowed_origins(request)


async def _disconnect(request: web.Request) -> web.StreamResponse:
    integration = request.app[INTEGRATION]
    customer = await customer_for(request)
    if not _same_site(request):
        log.warning("customer %s: a cross-site disconnect was refused", customer)
        return await _error(request, "cross_site", 403,
                            "this request did not come from this site")
    sent = request.headers.get("X-CSRF-Token")
    if sent is None and request.content_type in ("application/x-www-form-urlencoded",
                                                 "multipart/form-data"):
        form = await request.post()
        value = form.get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    session = request.cookies.get(CSRF_COOKIE)
    if not sent or not session or not integration.signer.mac_matches(
            f"csrf\0{session}\0{customer}", sent):
        log.warning("customer %s: a disconnect without a valid CSRF token was refused",
                    customer)
        return await _error(request, "cross_site", 403,
                            "this request carries no valid CSRF token; reload the page "
                            "and try again")
    await request.app[MANAGER].disconnect(customer)
    raise web.HTTPSeeOther(_url_for(integration.disconnected_url or integration.success_url,
                                    customer))
