"""The OAuth half of the emulator: authorize, token, introspect, revoke."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import time
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from aiohttp import web

from sfrtr.emulator import server_grants
from sfrtr.emulator.state import ConnectedApp, Family, PendingCode
from sfrtr.emulator.wire import drop_connection, finish, json_response, oauth_error

if TYPE_CHECKING:
    from sfrtr.emulator.server import Emulator

BUSY = "token request is already being processed"
EXPIRED = "expired access/refresh token"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def _emulator(request: web.Request) -> Emulator:
    from sfrtr.emulator.server import EMULATOR_KEY

    return request.app[EMULATOR_KEY]


def base_url(request: web.Request) -> str:
    em = _emulator(request)
    return em.instance_url or f"{request.scheme}://{request.host}"


async def read_form(request: web.Request) -> dict[str, str] | web.Response:
    """The request's form fields, or the error answer for a malformed body."""
    if request.content_type not in FORM_TYPES:
        return oauth_error("invalid_request",
                           "request body must be application/x-www-form-urlencoded")
    try:
        form = await request.post()
    except (ValueError, UnicodeDecodeError):
        return oauth_error("invalid_request", "malformed request body")
    out: dict[str, str] = {}
    for key, value in form.items():
        if not isinstance(value, str):
            return oauth_error("invalid_request", f"parameter {key} must be text")
        out[key] = value
    return out


def _client_credentials(request: web.Request, form: dict[str, str]
                        ) -> tuple[str | None, str | None] | web.Response:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("basic "):
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return oauth_error("invalid_client", "invalid client credentials")
        client_id, sep, secret = decoded.partition(":")
        if not sep:
            return oauth_error("invalid_client", "invalid client credentials")
        return client_id, secret
    return form.get("client_id"), form.get("client_secret")


def authenticate_client(request: web.Request, form: dict[str, str], *, secret_required: bool
                        ) -> ConnectedApp | web.Response:
    creds = _client_credentials(request, form)
    if isinstance(creds, web.Response):
        return creds
    client_id, secret = creds
    app = _emulator(request).world.apps.get(client_id or "")
    if app is None:
        return oauth_error("invalid_client_id", "client identifier invalid")
    if secret is None:
        if secret_required and app.confidential:
            return oauth_error("invalid_client", "invalid client credentials")
    elif not hmac.compare_digest(secret.encode(), app.client_secret.encode()):
        return oauth_error("invalid_client", "invalid client credentials")
    return app


async def authorize(request: web.Request) -> web.StreamResponse:
    """Auto-approving authorize endpoint; ``login_hint`` names the org (customer)."""
    em = _emulator(request)
    q = request.query
    app = em.world.apps.get(q.get("client_id", ""))
    if app is None:
        return oauth_error("invalid_client_id", "client identifier invalid")
    redirect_uri = q.get("redirect_uri", "")
    if not redirect_uri or ((app_uris := em.redirect_uris.get(app.client_id)) and \
            redirect_uri not in app_uris):
        return oauth_error("redirect_uri_mismatch", "redirect_uri must match configuration")
    if q.get("response_type") != "code":
        return oauth_error("unsupported_response_type", "response type not supported")
    method = q.get("code_challenge_method")
    challenge = q.get("code_challenge")
    if challenge is not None and (method or "S256") != "S256":
        return oauth_error("invalid_request", "unsupported code_challenge_method")
    org_name = q.get("login_hint") or em.default_customer
    if not org_name:
        return oauth_error("invalid_request", "login_hint (the customer) is required")
    org = em.ensure_customer(org_name)
    code = PendingCode(
        code=f"aPr{secrets.token_urlsafe(32)}", app=app, org=org, redirect_uri=redirect_uri,
        scope=q.get("scope", "api refresh_token"), challenge=challenge,
        challenge_method="S256" if challenge else None,
        expires_at=time.time() + em.world.code_lifetime)
    em.world.codes[code.code] = code
    params = {"code": code.code}
    if "state" in q:
        params["state"] = q["state"]
    sep = "&" if "?" in redirect_uri else "?"
    raise web.HTTPFound(f"{redirect_uri}{sep}{urlencode(params)}")


async def token(request: web.Request) -> web.StreamResponse:
    em = _emulator(request)
    faults = em.faults["token"]
    if faults.take_reset():
        return drop_connection(request)
    if faults.draw_error(em.rng):
        return oauth_error("server_error", "injected fault", faults.error_status)
    form = await read_form(request)
    if isinstance(form, web.Response):
        return form
    grant_type = form.get("grant_type")
    if grant_type in (server_grants.JWT_GRANT, "client_credentials"):
        if delay := faults.delay(em.rng):
            await asyncio.sleep(delay)
        if grant_type == server_grants.JWT_GRANT:
            return await finish(request, server_grants.jwt_bearer(em, request, form), faults)
        creds = _client_credentials(request, form)
        if isinstance(creds, web.Response):
            return creds
        return await finish(request, server_grants.client_credentials(em, request, form, *creds),
                            faults)
    if grant_type not in ("refresh_token", "authorization_code"):
        return oauth_error("unsupported_grant_type", "grant type not supported")
    app = authenticate_client(request, form, secret_required=grant_type == "authorization_code")
    if isinstance(app, web.Response):
        return app
    if grant_type == "authorization_code":
        return await finish(request, await _exchange_code(request, app, form), faults)
    return await _refresh(request, app, form)


async def _exchange_code(request: web.Request, app: ConnectedApp,
                         form: dict[str, str]) -> web.Response:
    em = _emulator(request)
    pending = em.world.codes.get(form.get("code", ""))
    if pending is None or pending.used or pending.app is not app:
        return oauth_error("invalid_grant", "invalid authorization code")
    if time.time() > pending.expires_at:
        return oauth_error("invalid_grant", "expired authorization code")
    if form.get("redirect_uri") != pending.redirect_uri:
        return oauth_error("invalid_grant", "redirect_uri must match configuration")
    if pending.challenge is not None:
        verifier = form.get("code_verifier")
        if not verifier:
            return oauth_error("invalid_grant", "invalid code verifier")
        digest = hashlib.sha256(verifier.encode()).digest()
        expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        if not hmac.compare_digest(expected, pending.challenge):
            return oauth_error("invalid_grant", "invalid code verifier")
    pending.used = True
    now = time.time()
    family = em.world.new_family(app, pending.org, pending.scope)
    access = em.world.issue_access(family, now)
    refresh = em.world.issue_refresh(family)
    em.ledger.count("code_exchanges", family.family_id)
    return json_response(em.world.token_answer(family, access, refresh, base_url(request)))


def _reject(em: Emulator, family: Family | None, event: str, description: str) -> web.Response:
    em.ledger.count(event, family.family_id if family else None)
    return oauth_error("invalid_grant", description)


async def _refresh(request: web.Request, app: ConnectedApp,
                   form: dict[str, str]) -> web.StreamResponse:
    em = _emulator(request)
    world = em.world
    faults = em.faults["token"]
    presented = form.get("refresh_token", "")
    family = world.refresh_index.get(presented)
    if family is None or family.app is not app:
        return _reject(em, None, "rejected_refreshes", EXPIRED)
    if presented in family.in_flight:
        return _reject(em, family, "concurrent_rejections", em.busy_description)
    if family.revoked:
        return _reject(em, family, "rejected_refreshes", EXPIRED)
    reissue_current = False
    if presented != family.current_refresh:
        rotated = family.rotated_at.get(presented, 0.0)
        if app.reuse_window > 0 and time.time() - rotated <= app.reuse_window:
            # Auth0/Okta-style leeway: answer with the current refresh token
            # instead of treating the replay as theft.
            em.ledger.count("reuse_in_window", family.family_id)
            reissue_current = True
        else:
            em.ledger.count("reuse", family.family_id)
            if world.revoke_family(family):
                em.ledger.count("revocations", family.family_id)
            return oauth_error("invalid_grant", EXPIRED)
    family.in_flight.add(presented)
    try:
        delay = faults.delay(em.rng)
        if delay:
            await asyncio.sleep(delay)
        if family.revoked:  # revoked while we were "processing"
            return _reject(em, family, "rejected_refreshes", EXPIRED)
        now = time.time()
        access = world.issue_access(family, now)
        refresh: str | None = None
        if reissue_current:
            refresh = family.current_refresh
        elif app.rotation:
            refresh = world.issue_refresh(family)
        em.ledger.count("redemptions", family.family_id)
        if faults.take_drop():
            em.ledger.count("dropped_after_rotation", family.family_id)
            return drop_connection(request)
        answer = json_response(world.token_answer(family, access, refresh, base_url(request)))
    finally:
        family.in_flight.discard(presented)
    return await finish(request, answer, faults)


def _lookup_token(em: Emulator, value: str) -> tuple[str, Family] | None:
    access = em.world.access_index.get(value)
    if access is not None:
        return "access_token", access.family
    family = em.world.refresh_index.get(value)
    if family is not None:
        return "refresh_token", family
    return None


async def introspect(request: web.Request) -> web.StreamResponse:
    em = _emulator(request)
    faults = em.faults["introspect"]
    if faults.take_reset():
        return drop_connection(request)
    if faults.draw_error(em.rng):
        return oauth_error("server_error", "injected fault", faults.error_status)
    if delay := faults.delay(em.rng):
        await asyncio.sleep(delay)
    form = await read_form(request)
    if isinstance(form, web.Response):
        return form
    app = authenticate_client(request, form, secret_required=True)
    if isinstance(app, web.Response):
        return app
    value = form.get("token", "")
    now = time.time()
    inactive = json_response({"active": False})
    access = em.world.access_index.get(value)
    if access is not None:
        family = access.family
        if family.app is not app or not em.world.access_alive(access, now):
            return await finish(request, inactive, faults)
        body = {"active": True, "scope": family.scope, "client_id": app.client_id,
                "username": family.org.username,
                "sub": f"{base_url(request)}/id/{family.org.org_id}/{family.org.user_id}",
                "token_type": "access_token",
                "exp": int(access.last_used + em.world.session_timeout),
                "iat": int(access.issued_at), "nbf": int(access.issued_at)}
        return await finish(request, json_response(body), faults)
    owner = em.world.refresh_index.get(value)
    if owner is None or owner.app is not app or owner.revoked or value != owner.current_refresh:
        return await finish(request, inactive, faults)
    body = {"active": True, "scope": owner.scope, "client_id": app.client_id,
            "username": owner.org.username, "token_type": "refresh_token",
            "sub": f"{base_url(request)}/id/{owner.org.org_id}/{owner.org.user_id}"}
    return await finish(request, json_response(body), faults)


async def revoke(request: web.Request) -> web.StreamResponse:
    em = _emulator(request)
    faults = em.faults["revoke"]
    if faults.take_reset():
        return drop_connection(request)
    if faults.draw_error(em.rng):
        return oauth_error("server_error", "injected fault", faults.error_status)
    if request.method == "GET":
        value = request.query.get("token", "")
    else:
        form = await read_form(request)
        if isinstance(form, web.Response):
            return form
        value = form.get("token", "")
    found = _lookup_token(em, value)
    if found is None:
        return oauth_error("invalid_token", "Token was invalid")
    kind, family = found
    if kind == "access_token":
        em.world.access_index[value].killed = True
    elif em.world.revoke_family(family):
        em.ledger.count("revocations", family.family_id)
    return await finish(request, web.Response(status=200), faults)
