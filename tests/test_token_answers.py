"""Bad token-endpoint answers raise a clear error and leave the stored record unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from sfrtr import (
    InstanceUrlPolicy,
    InvalidTokenResponse,
    MemoryStore,
    OAuthClient,
    OAuthConfig,
    Secret,
    Status,
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

    async def handle(self, request: web.Request) -> web.Response:
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


CASES = {
    "missing access_token": lambda b: mutate(b, access_token=...),
    "missing instance_url": lambda b: mutate(b, instance_url=...),
    "issued_at as a number": lambda b: mutate(b, issued_at=1767225600123),
    "issued_at not digits": lambda b: mutate(b, issued_at="yesterday"),
    "refresh_token not a string": lambda b: mutate(b, refresh_token=["x"]),
    "wrong token_type": lambda b: mutate(b, token_type="MAC"),
    "bad signature": lambda b: mutate(b, signature="AAAA" + good_body(b)["signature"][4:]),
    "no signature": lambda b: mutate(b, signature=...),
    "http instance_url elsewhere": lambda b: mutate(b, instance_url="http://evil.example"),
    "instance_url with a path": lambda b: mutate(b, instance_url=b + "/steal"),
    "not JSON": lambda b: b"<html><body>Proxy error</body></html>",
    "truncated JSON": lambda b: mutate(b)[:40],
    "a JSON array": lambda b: b"[1, 2]",
    "too large": lambda b: b'{"pad": "' + b"x" * 70_000 + b'"}',
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_answer_is_a_clear_error_and_changes_nothing(canned, case):
    oauth = OAuthClient(OAuthConfig(client_id="c", client_secret=Secret(SECRET),
                                    login_url=canned.base,
                                    instance_policy=InstanceUrlPolicy.for_emulator()))
    manager = TokenManager(oauth, MemoryStore())
    grant = TokenGrant(access_token=Secret("00D!old-access"),
                       refresh_token=Secret("5Aep!old-refresh"), instance_url=canned.base,
                       identity_url=f"{canned.base}/id/x/y", issued_at=1.0, scope="api")
    before = (await manager.store.put("acme", grant_record(grant, lifetime=7200))).record
    canned.raw = CASES[case](canned.base)
    with pytest.raises(InvalidTokenResponse) as info:
        await manager.refresh("acme", stale="00D!old-access")
    assert "old-" not in str(info.value)
    assert "new-" not in str(info.value)
    after = (await manager.store.read("acme")).record
    assert after == before
    assert after.status is Status.VALID
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
