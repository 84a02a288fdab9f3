"""The aiohttp integration: connect → authorize → callback → query → expiry → query."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import sfrtr.aiohttp as sfrtr_aiohttp
from sfrtr import Secret, Status
from sfrtr.emulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator
from sfrtr.oauth import InstanceUrlPolicy, OAuthConfig

pytestmark = pytest.mark.anyio


async def accounts(request: web.Request) -> web.Response:
    salesforce = await sfrtr_aiohttp.client(request)
    page = await salesforce.query("SELECT Name FROM Account")
    return web.json_response({"count": page.total_size})


def build_app(em: Emulator) -> web.Application:
    app = web.Application()
    sfrtr_aiohttp.setup(
        app,
        oauth_config=OAuthConfig(client_id=DEFAULT_CLIENT_ID,
                                 client_secret=Secret(DEFAULT_CLIENT_SECRET),
                                 login_url=str(em.base_url),
                                 instance_policy=InstanceUrlPolicy.for_emulator()),
        customer_of=lambda request: request.query.get("customer", ""),
        state_key=Secret("a-test-state-key-of-some-length"),
        success_url="/done")
    app.router.add_get("/accounts", accounts)
    return app


@pytest.fixture
async def app_client(emulator: Emulator) -> AsyncIterator[TestClient]:
    client = TestClient(TestServer(build_app(emulator)))
    await client.start_server()
    yield client
    await client.close()


async def authorize(app_client: TestClient, http, customer: str = "acme") -> str:
    """Connect and let the emulator approve; returns the callback path+query."""
    r = await app_client.get(f"/salesforce/connect?customer={customer}&login_hint={customer}",
                             allow_redirects=False)
    assert r.status == 302
    async with http.get(r.headers["Location"], allow_redirects=False) as approved:
        assert approved.status == 302
        callback = urlsplit(approved.headers["Location"])
    assert callback.path == "/salesforce/callback"
    return f"{callback.path}?{callback.query}"


async def test_whole_flow_survives_session_expiry(emulator: Emulator, app_client, http):
    emulator.seed("acme", "Account", [{"Name": "a"}, {"Name": "b"}])
    callback = await authorize(app_client, http)
    r = await app_client.get(callback, allow_redirects=False)
    assert r.status == 302
    assert r.headers["Location"] == "/done"
    manager = app_client.server.app[sfrtr_aiohttp.MANAGER]
    assert await manager.status("acme") is Status.VALID
    r = await app_client.get("/accounts?customer=acme")
    assert (r.status, await r.json()) == (200, {"count": 2})
    emulator.expire_sessions("acme")
    r = await app_client.get("/accounts?customer=acme")
    assert (r.status, await r.json()) == (200, {"count": 2})
    assert emulator.ledger["redemptions"] == 1
    # Replaying the same callback is refused and changes nothing.
    r = await app_client.get(callback, allow_redirects=False)
    assert r.status == 400
    assert "already used" in await r.text()
    # Disconnect revokes and forgets the grant.
    r = await app_client.post("/salesforce/disconnect?customer=acme", allow_redirects=False)
    assert r.status == 303
    assert await manager.status("acme") is None
    assert emulator.ledger["revocations"] == 1


async def test_bad_callbacks_store_nothing(emulator: Emulator, app_client, http):
    manager = app_client.server.app[sfrtr_aiohttp.MANAGER]
    callback = await authorize(app_client, http)
    query = parse_qs(urlsplit(callback).query)
    code, state = query["code"][0], query["state"][0]
    cases = {
        "missing code": f"/salesforce/callback?state={state}",
        "forged state": f"/salesforce/callback?code={code}&state={state[:-2]}xx",
        "garbage state": f"/salesforce/callback?code={code}&state=nonsense",
        "denied": "/salesforce/callback?error=access_denied&error_description=no",
        "bad code": f"/salesforce/callback?code=wrong&state={state}",
    }
    for name, path in cases.items():
        r = await app_client.get(path, allow_redirects=False)
        assert r.status == 400, name
        assert "<h1>" in await r.text()
    assert await manager.status("acme") is None
    assert emulator.ledger["code_exchanges"] == 0


async def test_another_browser_cannot_finish_the_flow(emulator: Emulator, app_client, http):
    callback = await authorize(app_client, http)
    app_client.session.cookie_jar.clear()  # the PKCE cookie stays with the first browser
    r = await app_client.get(callback, allow_redirects=False)
    assert r.status == 400
    assert "did not start" in await r.text()
    assert emulator.ledger["code_exchanges"] == 0


async def test_requests_without_a_customer_are_forbidden(app_client):
    r = await app_client.get("/salesforce/connect", allow_redirects=False)
    assert r.status == 403


async def test_the_example_app_runs(emulator: Emulator, http):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "aiohttp_app.py")
    spec = importlib.util.spec_from_file_location("aiohttp_example", path)
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    emulator.seed("acme", "Account", [{"Name": "Acme"}])
    client = TestClient(TestServer(example.build_app(str(emulator.base_url))))
    await client.start_server()
    try:
        r = await client.get("/accounts?customer=acme", allow_redirects=False)
        assert r.status == 302  # not connected yet: back to the index
        callback = await authorize(client, http)
        await client.get(callback, allow_redirects=False)
        r = await client.get("/accounts?customer=acme")
        assert r.status == 200
        assert "1 accounts" in await r.text()
    finally:
        await client.close()
