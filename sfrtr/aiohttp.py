"""Embed sfrtr in an aiohttp application.

``setup(app, ...)`` creates the token manager (and its HTTP session and
store) with the app's lifecycle and adds the OAuth web-server flow as
routes::

    GET  {prefix}/connect      redirect to Salesforce (state + PKCE S256)
    GET  {prefix}/callback     validate state, exchange the code, store the grant
    POST {prefix}/disconnect   revoke and delete the grant

In a handler, ``await sfrtr.aiohttp.client(request)`` is the customer's
:class:`~sfrtr.Client`. The app says which customer a request is for with
``customer_of(request)``; replay protection of ``state`` is per process.
"""

from __future__ import annotations

import html
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from sfrtr.errors import InvalidTokenResponse, OAuthError, SfrtrError
from sfrtr.manager import TokenManager
from sfrtr.oauth import pkce
from sfrtr.oauth.client import OAuthClient, OAuthConfig
from sfrtr.oauth_state import InvalidState, StateSigner
from sfrtr.policy import RefreshPolicy
from sfrtr.salesforce import Client
from sfrtr.secret import Secret
from sfrtr.store.base import TokenStore
from sfrtr.store.memory import MemoryStore

log = logging.getLogger("sfrtr.aiohttp")

CustomerOf = Callable[[web.Request], str | Awaitable[str]]
PKCE_COOKIE = "sfrtr_pkce"


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
    success_url: str
    scope: str
    manager: TokenManager | None = None


INTEGRATION: web.AppKey[Integration] = web.AppKey("sfrtr_integration", Integration)
MANAGER: web.AppKey[TokenManager] = web.AppKey("sfrtr_manager", TokenManager)


def setup(app: web.Application, *, oauth_config: OAuthConfig, customer_of: CustomerOf,
          state_key: Secret, store_factory: Callable[[], TokenStore] = MemoryStore,
          policy: RefreshPolicy | None = None, prefix: str = "/salesforce",
          redirect_uri: str | None = None, success_url: str = "/",
          scope: str = "api refresh_token") -> Integration:
    """Wire sfrtr into ``app``. ``redirect_uri`` defaults to this app's callback URL
    as seen by the request (set it explicitly behind a proxy)."""
    integration = Integration(oauth_config, store_factory, policy or RefreshPolicy(),
                              customer_of, StateSigner(state_key), prefix.rstrip("/"),
                              redirect_uri, success_url, scope)
    app[INTEGRATION] = integration
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_get(f"{integration.prefix}/connect", _connect)
    app.router.add_get(f"{integration.prefix}/callback", _callback)
    app.router.add_post(f"{integration.prefix}/disconnect", _disconnect)
    return integration


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    integration = app[INTEGRATION]
    manager = TokenManager(OAuthClient(integration.oauth_config), integration.store_factory(),
                           integration.policy)
    integration.manager = manager
    app[MANAGER] = manager
    yield
    await manager.aclose()


def manager(request: web.Request) -> TokenManager:
    return request.app[MANAGER]


async def client(request: web.Request, customer: str | None = None) -> Client:
    """The Salesforce client for ``customer``, by default the request's own
    (``customer_of(request)``; 403 if it names none)."""
    name = customer if customer is not None else await customer_for(request)
    return Client(name, request.app[MANAGER])


async def customer_for(request: web.Request) -> str:
    result = request.app[INTEGRATION].customer_of(request)
    customer = await result if inspect.isawaitable(result) else result
    if not isinstance(customer, str) or not customer:
        raise web.HTTPForbidden(text="no customer for this request")
    return customer


def _redirect_uri(request: web.Request) -> str:
    integration = request.app[INTEGRATION]
    if integration.redirect_uri:
        return integration.redirect_uri
    return str(request.url.with_path(f"{integration.prefix}/callback").with_query(None))


def _page(status: int, title: str, detail: str) -> web.Response:
    body = (f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(detail)}</p>")
    return web.Response(status=status, text=body, content_type="text/html")


async def _connect(request: web.Request) -> web.StreamResponse:
    integration = request.app[INTEGRATION]
    customer = await customer_for(request)
    redirect_uri = _redirect_uri(request)
    state, parsed = integration.signer.sign(customer, redirect_uri)
    verifier = pkce.make_verifier()
    oauth = request.app[MANAGER].oauth
    location = oauth.authorize_url(redirect_uri=redirect_uri, state=state,
                                   code_challenge=pkce.challenge(verifier),
                                   scope=integration.scope,
                                   login_hint=request.query.get("login_hint"))
    response = web.Response(status=302, headers={"Location": location})
    # The verifier stays with the browser that started the flow, bound to this
    # state's nonce; it never travels through Salesforce.
    cookie = f"{parsed.nonce}.{verifier}.{integration.signer.mac(parsed.nonce + verifier)}"
    response.set_cookie(PKCE_COOKIE, cookie, max_age=int(integration.signer.ttl),
                        httponly=True, samesite="Lax", secure=request.secure,
                        path=f"{integration.prefix}/callback")
    return response


async def _callback(request: web.Request) -> web.StreamResponse:
    integration = request.app[INTEGRATION]
    q = request.query
    if "error" in q:
        return _page(400, "Salesforce did not authorize the app",
                     f"{q.get('error')}: {q.get('error_description', '')}")
    code, state_text = q.get("code"), q.get("state")
    if not code or not state_text:
        return _page(400, "Incomplete callback", "the code or the state is missing")
    try:
        state = integration.signer.verify(state_text, _redirect_uri(request))
    except InvalidState as exc:
        return _page(400, "Invalid authorization state", str(exc))
    nonce, _, rest = request.cookies.get(PKCE_COOKIE, "").partition(".")
    verifier, _, mac = rest.partition(".")
    if nonce != state.nonce or not verifier or \
            mac != integration.signer.mac(nonce + verifier):
        return _page(400, "Invalid authorization state",
                     "this browser did not start this authorization")
    manager_ = request.app[MANAGER]
    try:
        grant = await manager_.oauth.exchange_code(code, redirect_uri=state.redirect_uri,
                                                   code_verifier=verifier)
    except (OAuthError, InvalidTokenResponse) as exc:
        return _page(400, "Salesforce refused the authorization", str(exc))
    except SfrtrError as exc:
        return _page(502, "Salesforce could not be reached", str(exc))
    await manager_.connect(state.customer, grant)
    log.info("customer %s connected through the OAuth flow", state.customer)
    response = web.Response(status=302, headers={"Location": integration.success_url})
    response.del_cookie(PKCE_COOKIE, path=f"{integration.prefix}/callback")
    return response


async def _disconnect(request: web.Request) -> web.StreamResponse:
    customer = await customer_for(request)
    await request.app[MANAGER].disconnect(customer)
    raise web.HTTPSeeOther(request.app[INTEGRATION].success_url)
