"""Bad token-endpoint answers: a clear error, and the presented refresh token is never
presented again (a 2xx means it may be burnt). A readable new refresh token is kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from sfrtr import (
    GrantSuspended,
    InstanceUrlPolicy,
    MemoryStore,
    OAuthClient,
    OAuthConfig,
    RefreshPolicy,
    Secret,
    Status,
    TokenEndpointUnavailable,
    TokenManager,
)
from sfrtr.oauth.grant import TokenGrant, signature
from sfrtr.protocol import grant_record

pytestmark = pytest.mark.anyio

SECRET = "canned-secret"


def good_body(base: str) -> dict[str, Any]:
    identity = f"{base}/id/00D000000000001/005000000000001"
    issued = "1767225600123"
    return {"access_token": "00D!new-access", "refresh_token": "5Aep!new-refresh",
            "instance_url": base, "id": identity, "token_type": "Bearer",
            "issued_at": issued, "scope": "api refresh_token",
            "signature": signature(identity, issued, SECRET)}


class CannedTokenServer:
    """A token endpoint that answers whatever the test sets. Not an emulator:
    it exists to feed the client answers Salesforce should never send."""

    def __init__(self) -> None:
        self.status = 200
        self.raw: bytes = b""
        self.content_type = "application/json"
        self.base = ""
        self.presented: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.presented.append(str(form.get("refresh_token", "")))
        return web.Response(status=self.status, body=self.raw, content_type=self.content_type)


@pytest.fixture
async def canned() -> AsyncIterator[CannedTokenServer]:
    server = CannedTokenServer()
    app = web.Application()
    app.router.add_post("/services/oauth2/token", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.base = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


def mutate(base: str, **changes: Any) -> bytes:
    body = good_body(base)
    for key, value in changes.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    return orjson.dumps(body)


#: 2xx answers we refuse whose new refresh token can still be read: it is kept.
READABLE = {
    "missing access_token": lambda b: mutate(b, access_token=...),
    "missing instance_url": lambda b: mutate(b, instance_url=...),
    "issued_at as a number": lambda b: mutate(b, issued_at=1767225600123),
    "issued_at not digits": lambda b: mutate(b, issued_at="yesterday"),
    "wrong token_type": lambda b: mutate(b, token_type="MAC"),
    "bad signature": lambda b: mutate(b, signature="AAAA" + good_body(b)["signature"][4:]),
    "no signature": lambda b: mutate(b, signature=...),
    "http instance_url elsewhere": lambda b: mutate(b, instance_url="http://evil.example"),
    "instance_url with a path": lambda b: mutate(b, instance_url=b + "/steal"),
}
#: 2xx answers whose refresh token cannot be read: as ambiguous as no answer.
UNREADABLE = {
    "refresh_token not a string": lambda b: mutate(b, refresh_token=["x"]),
    "not JSON": lambda b: b"<html><body>Proxy error</body></html>",
    "truncated JSON": lambda b: mutate(b)[:40],
    "a JSON array": lambda b: b"[1, 2]",
    "too large": lambda b: b'{"pad": "' + b"x" * 70_000 + b'"}',
}


def canned_manager(canned: CannedTokenServer, secret: str = SECRET,
                   **policy: Any) -> TokenManager:
    oauth = OAuthClient(OAuthConfig(client_id="c", client_secret=Secret(secret),
                                    login_url=canned.base, timeout=1.0, connect_timeout=0.5,
                                    instance_policy=InstanceUrlPolicy.for_emulator()))
    return TokenManager(oauth, MemoryStore(), RefreshPolicy(**policy))


async def store_old_grant(manager: TokenManager, base: str):  # type: ignore[no-untyped-def]
    grant = TokenGrant(access_token=Secret("00D!old-access"),
                       refresh_token=Secret("5Aep!old-refresh"), instance_url=base,
                       identity_url=f"{base}/id/x/y", issued_at=1.0, scope="api")
    return (await manager.store.put("acme", grant_record(grant, lifetime=7200))).record


@pytest.mark.parametrize("case", list(READABLE))
async def test_refused_2xx_keeps_its_new_refresh_token_and_suspends(canned, case):
    """Issue 10, item 2: a 2xx answer that fails validation burnt the presented token;
    putting it back meant presenting it again (reuse). Its successor is kept."""
    manager = canned_manager(canned)
    await store_old_grant(manager, canned.base)
    canned.raw = READABLE[case](canned.base)
    with pytest.raises(GrantSuspended) as info:
        await manager.refresh("acme", stale="00D!old-access")
    assert "old-" not in str(info.value)
    assert "new-" not in str(info.value)
    after = (await manager.store.read("acme")).record
    assert after.status is Status.SUSPENDED
    assert after.refresh_token == Secret("5Aep!new-refresh")
    # Until the backoff ends every caller gets the clear error, and nothing is sent.
    with pytest.raises(GrantSuspended):
        await manager.token("acme")
    assert canned.presented == ["5Aep!old-refresh"]
    await manager.aclose()


async def test_suspended_grant_resumes_with_the_kept_token_once_fixed(canned):
    """A client-secret rotation made the signature fail: once the right secret is
    configured, the next refresh presents the kept token (no re-authorization)."""
    canned.raw = mutate(canned.base, signature="AAAA" + good_body(canned.base)["signature"][4:])
    wrong = canned_manager(canned, refused_backoff=0.0)
    await store_old_grant(wrong, canned.base)
    with pytest.raises(GrantSuspended):
        await wrong.refresh("acme", stale="00D!old-access")
    fixed = TokenManager(OAuthClient(OAuthConfig(
        client_id="c", client_secret=Secret(SECRET), login_url=canned.base,
        instance_policy=InstanceUrlPolicy.for_emulator())), wrong.store)
    canned.raw = mutate(canned.base, refresh_token="5Aep!newer-refresh")
    assert await fixed.token("acme") == "00D!new-access"
    assert canned.presented == ["5Aep!old-refresh", "5Aep!new-refresh"]
    assert (await fixed.store.read("acme")).record.status is Status.VALID
    await wrong.aclose()
    await fixed.aclose()


@pytest.mark.parametrize("case", list(UNREADABLE))
async def test_unreadable_2xx_is_ambiguous_and_never_presented_again(canned, case):
    manager = canned_manager(canned)
    before = await store_old_grant(manager, canned.base)
    canned.raw = UNREADABLE[case](canned.base)
    with pytest.raises(TokenEndpointUnavailable) as info:
        await manager.refresh("acme", stale="00D!old-access")
    assert "old-" not in str(info.value)
    after = (await manager.store.read("acme")).record
    assert after.status is Status.INDETERMINATE
    assert after.refresh_token == before.refresh_token
    # The next caller waits for recovery; it never presents the token blindly.
    with pytest.raises(TimeoutError):  # waiting out the grace before introspecting
        await asyncio.wait_for(manager.token("acme"), 0.5)
    assert canned.presented == ["5Aep!old-refresh"]
    await manager.aclose()


async def test_the_good_answer_passes(canned):
    oauth = OAuthClient(OAuthConfig(client_id="c", client_secret=Secret(SECRET),
                                    login_url=canned.base,
                                    instance_policy=InstanceUrlPolicy.for_emulator()))
    canned.raw = mutate(canned.base)
    outcome = await oauth.refresh(Secret("5Aep!old-refresh"))
    assert outcome.kind.value == "ok"
    assert outcome.grant is not None
    assert outcome.grant.refresh_token == Secret("5Aep!new-refresh")
    assert outcome.grant.issued_at == 1767225600.123
    await oauth.aclose()


@pytest.mark.parametrize(("status", "body", "kind"), [
    (400, {"error": "invalid_grant", "error_description": "expired access/refresh token"},
     "rejected"),
    (400, {"error": "invalid_grant",
           "error_description": "Token request is already being processed"}, "busy"),
    (400, {"error": "invalid_client", "error_description": "invalid client credentials"},
     "not_sent"),
    (500, {"error": "server_error"}, "indeterminate"),
    (503, None, "indeterminate"),
    (418, None, "indeterminate"),
])
async def test_error_answers_are_classified(canned, status, body, kind):
    oauth = OAuthClient(OAuthConfig(client_id="c", client_secret=Secret(SECRET),
                                    login_url=canned.base))
    canned.status = status
    canned.raw = orjson.dumps(body) if body is not None else b"oops"
    outcome = await oauth.refresh(Secret("rt"))
    assert outcome.kind.value == kind
    await oauth.aclose()
