"""The aiohttp integration: connect → authorize → callback → query → expiry → query,
and what the web flow refuses (forged, replayed, cross-site), over real sockets
against the emulator."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import sfrtr.aiohttp as sfrtr_aiohttp
from sfrtr import Secret, SqliteStore, Status
from sfrtr.emulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator
from sfrtr.oauth import InstanceUrlPolicy, OAuthConfig

pytestmark = pytest.mark.anyio


async def accounts(request: web.Request) -> web.Response:
    salesforce = await sfrtr_aiohttp.client(request)
    page = await salesforce.query("SELECT Name FROM Account")
    return web.json_response({"count": page.total_size})


async def form(request: web.Request) -> web.Response:
    """The app's page with a disconnect form: hands out the CSRF token."""
    return web.json_response({"token": await sfrtr_aiohttp.csrf_token(request)})


def build_app(em: Emulator, **options: Any) -> web.Application:
    app = web.Application()
    settings: dict[str, Any] = {"success_url": "/done", **options}
    sfrtr_aiohttp.setup(
        app,
        oauth_config=OAuthConfig(client_id=DEFAULT_CLIENT_ID,
                                 client_secret=Secret(DEFAULT_CLIENT_SECRET),
                                 login_url=str(em.base_url), timeout=1.0,
                                 connect_timeout=0.5,
                                 instance_policy=InstanceUrlPolicy.for_emulator()),
        customer_of=lambda request: request.query.get("customer", ""),
        state_key=Secret("a-test-state-key-of-some-length"), **settings)
    app.router.add_get("/accounts", accounts)
    app.router.add_get("/form", form)
    return app


@pytest.fixture
async def app_client(emulator: Emulator) -> AsyncIterator[TestClient]:
    client = TestClient(TestServer(build_app(emulator)))
    await client.start_server()
    yield client
    await client.close()


async def serve(app: web.Application) -> TestClient:
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


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


async def csrf(app_client: TestClient, customer: str = "acme") -> str:
    r = await app_client.get(f"/form?customer={customer}")
    token: str = (await r.json())["token"]
    return token


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
    # Replaying the same callback is refused and changes nothing (its PKCE cookie is
    # gone; test_a_callback_replayed_to_another_worker_is_refused keeps it).
    r = await app_client.get(callback, allow_redirects=False)
    assert r.status == 400
    assert "Invalid authorization state" in await r.text()
    # Disconnect (same site, with the form's CSRF token) revokes and forgets the grant.
    r = await app_client.post("/salesforce/disconnect?customer=acme", allow_redirects=False,
                              data={"csrf_token": await csrf(app_client)},
                              headers={"Origin": str(app_client.make_url("/").origin())})
    assert r.status == 303
    assert r.headers["Location"] == "/done"
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
    cookie = app_client.session.cookie_jar.filter_cookies(app_client.make_url(callback))
    pkce = cookie[sfrtr_aiohttp.PKCE_COOKIE].value
    app_client.session.cookie_jar.clear()  # the PKCE cookie stays with the first browser
    r = await app_client.get(callback, allow_redirects=False)
    assert r.status == 400
    assert "did not start" in await r.text()
    # A cookie whose MAC was altered (same nonce and verifier) is refused too.
    nonce, verifier, mac = pkce.split(".")
    forged = f"{nonce}.{verifier}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}"
    r = await app_client.get(callback, allow_redirects=False,
                             headers={"Cookie": f"{sfrtr_aiohttp.PKCE_COOKIE}={forged}"})
    assert r.status == 400
    assert "did not start" in await r.text()
    assert emulator.ledger["code_exchanges"] == 0


async def test_requests_without_a_customer_are_forbidden(app_client):
    r = await app_client.get("/salesforce/connect", allow_redirects=False)
    assert r.status == 403


@pytest.mark.parametrize(("fault", "detail"), [
    ({"error_rate": 1.0, "error_status": 503}, "answered 503"),
    ({"error_rate": 1.0, "error_status": 500}, "answered 500"),
    ({"reset_before": 1}, "could not be reached"),
    ({"drip_delay": 0.6}, "could not be reached"),  # past the 1 s request limit
])
async def test_token_endpoint_outages_say_try_again(emulator: Emulator, app_client, http,
                                                    fault, detail):
    manager = app_client.server.app[sfrtr_aiohttp.MANAGER]
    callback = await authorize(app_client, http)
    emulator.faults.set("token", **fault)
    r = await app_client.get(callback, allow_redirects=False)
    text = await r.text()
    emulator.faults.clear()
    assert r.status in (502, 503), text
    assert "try again" in text
    assert detail in text
    assert "refused" not in text
    assert await manager.status("acme") is None
    # Trying again (a new flow) works once the endpoint is back.
    r = await app_client.get(await authorize(app_client, http), allow_redirects=False)
    assert r.status == 302
    assert await manager.status("acme") is Status.VALID


async def test_a_callback_replayed_to_another_worker_is_refused(emulator: Emulator, http,
                                                                tmp_path: Path):
    """Two app processes behind one load balancer share a SQLite store: the state's
    nonce is claimed there, so the second worker refuses the replay."""
    shared = dict(store_factory=lambda: SqliteStore(tmp_path / "tokens.db"),
                  redirect_uri="http://127.0.0.1:9/salesforce/callback")
    first, second = (await serve(build_app(emulator, **shared)),
                     await serve(build_app(emulator, **shared)))
    try:
        r = await first.get("/salesforce/connect?customer=acme&login_hint=acme",
                            allow_redirects=False)
        cookie = r.cookies[sfrtr_aiohttp.PKCE_COOKIE].value
        async with http.get(r.headers["Location"], allow_redirects=False) as approved:
            query = urlsplit(approved.headers["Location"]).query
        headers = {"Cookie": f"{sfrtr_aiohttp.PKCE_COOKIE}={cookie}"}
        r = await first.get(f"/salesforce/callback?{query}", headers=headers,
                            allow_redirects=False)
        assert r.status == 302
        r = await second.get(f"/salesforce/callback?{query}", headers=headers,
                             allow_redirects=False)
        assert r.status == 400
        assert "already used" in await r.text()
        assert emulator.ledger["code_exchanges"] == 1
    finally:
        await first.close()
        await second.close()


async def test_cross_site_disconnects_are_refused(emulator: Emulator, app_client, http):
    manager = app_client.server.app[sfrtr_aiohttp.MANAGER]
    await app_client.get(await authorize(app_client, http), allow_redirects=False)
    token = await csrf(app_client)
    own = str(app_client.make_url("/").origin())
    path = "/salesforce/disconnect?customer=acme"
    refused = {
        "no token": ({"Origin": own}, {}),
        "another origin": ({"Origin": "http://evil.example"}, {"csrf_token": token}),
        "opaque origin": ({"Origin": "null"}, {"csrf_token": token}),
        "another referer": ({"Referer": "http://evil.example/page"}, {"csrf_token": token}),
        "forged token": ({"Origin": own}, {"csrf_token": token[:-2] + "xx"}),
        "another customer's token": ({"Origin": own},
                                     {"csrf_token": await csrf(app_client, "globex")}),
    }
    for name, (headers, data) in refused.items():
        r = await app_client.post(path, headers=headers, data=data, allow_redirects=False)
        assert r.status == 403, name
        assert "refused" in await r.text(), name
    # The token of another browser (another CSRF cookie) is refused as well.
    other = TestClient(app_client.server)
    try:
        r = await other.post(path, headers={"Origin": own}, data={"csrf_token": token},
                             allow_redirects=False)
        assert r.status == 403
    finally:
        await other.session.close()
    assert await manager.status("acme") is Status.VALID
    assert emulator.ledger["revocations"] == 0
    # Same site by its Referer, token in a header: accepted.
    r = await app_client.post(path, headers={"Referer": f"{own}/settings",
                                             "X-CSRF-Token": token}, allow_redirects=False)
    assert r.status == 303
    assert await manager.status("acme") is None


def _set_cookie(response: Any, name: str) -> str:
    headers: list[str] = response.headers.getall("Set-Cookie", [])
    return next(h for h in headers if h.startswith(name + "="))


async def test_secure_cookies_default_on_except_plain_http_loopback(emulator: Emulator):
    cases = [({}, False),  # the test server: http://127.0.0.1
             ({"redirect_uri": "https://app.example.com/salesforce/callback"}, True),
             ({"redirect_uri": "http://app.example.com/salesforce/callback"}, True),
             ({"secure_cookies": True}, True),
             ({"redirect_uri": "https://app.example.com/salesforce/callback",
               "secure_cookies": False}, False)]
    for options, secure in cases:
        client = await serve(build_app(emulator, **options))
        try:
            r = await client.get("/salesforce/connect?customer=acme", allow_redirects=False)
            pkce = _set_cookie(r, sfrtr_aiohttp.PKCE_COOKIE)
            assert ("Secure" in pkce) is secure, (options, pkce)
            assert "HttpOnly" in pkce
            r = await client.get("/form?customer=acme")
            token_cookie = _set_cookie(r, sfrtr_aiohttp.CSRF_COOKIE)
            assert ("Secure" in token_cookie) is secure, (options, token_cookie)
            assert "SameSite=Strict" in token_cookie
        finally:
            await client.close()


async def test_the_app_renders_its_own_error_pages(emulator: Emulator, http):
    seen: list[tuple[str, int, str]] = []

    async def error_page(kind: str, status: int, message: str) -> web.Response:
        seen.append((kind, status, message))
        return web.Response(status=status, text=f"custom {kind}")

    client = await serve(build_app(emulator, error_page=error_page))
    try:
        r = await client.get("/salesforce/callback?code=x&state=forged")
        assert (r.status, await r.text()) == (400, "custom invalid_state")
        callback = await authorize(client, http)
        emulator.faults.set("token", error_rate=1.0, error_status=503)
        r = await client.get(callback)
        emulator.faults.clear()
        assert (r.status, await r.text()) == (503, "custom unavailable")
        r = await client.post("/salesforce/disconnect?customer=acme",
                              headers={"Origin": "http://evil.example"})
        assert (r.status, await r.text()) == (403, "custom cross_site")
    finally:
        await client.close()
    assert [kind for kind, _, _ in seen] == ["invalid_state", "unavailable", "cross_site"]
    assert all(kind in sfrtr_aiohttp.ERROR_KINDS for kind, _, _ in seen)
    assert seen[1][2] == "Salesforce answered 503; please try again"


async def test_on_connect_gets_the_org_after_the_grant_is_stored(emulator: Emulator, http):
    connected: list[tuple[sfrtr_aiohttp.Connected, Status | None]] = []
    client: TestClient | None = None

    async def on_connect(info: sfrtr_aiohttp.Connected) -> None:
        assert client is not None
        stored = await client.server.app[sfrtr_aiohttp.MANAGER].status(info.customer)
        connected.append((info, stored))

    client = await serve(build_app(emulator, on_connect=on_connect,
                                   success_url=lambda customer: f"/hello/{customer}"))
    try:
        r = await client.get(await authorize(client, http, "globex"), allow_redirects=False)
        assert r.headers["Location"] == "/hello/globex"
    finally:
        await client.close()
    (info, stored), = connected
    org = emulator.world.orgs["globex"] if hasattr(emulator.world, "orgs") else None
    assert stored is Status.VALID
    assert info.customer == "globex"
    assert re.fullmatch(r"00D\w+", info.org_id), info
    assert re.fullmatch(r"005\w+", info.user_id), info
    assert info.instance_url.startswith("http")
    if org is not None:
        assert info.org_id == org.org_id


async def test_a_failing_on_connect_hook_shows_an_error_but_keeps_the_grant(
        emulator: Emulator, http):
    def on_connect(info: sfrtr_aiohttp.Connected) -> None:
        raise RuntimeError("the app's database is down")

    client = await serve(build_app(emulator, on_connect=on_connect))
    try:
        r = await client.get(await authorize(client, http), allow_redirects=False)
        assert r.status == 500
        assert "try again" in await r.text()
        assert await client.server.app[sfrtr_aiohttp.MANAGER].status("acme") is Status.VALID
    finally:
        await client.close()


def load_example() -> Any:
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "aiohttp_app.py")
    spec = importlib.util.spec_from_file_location("aiohttp_example", path)
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


async def test_the_example_app_runs(emulator: Emulator, http):
    example = load_example()
    emulator.seed("globex", "Account", [{"Name": "Globex"}])
    client = TestClient(TestServer(example.build_app(str(emulator.base_url))))
    await client.start_server()
    try:
        r = await client.get("/accounts?customer=globex", allow_redirects=False)
        assert r.status == 302  # not connected yet: back to the index
        assert r.headers["Location"] == "/?customer=globex"
        callback = await authorize(client, http, "globex")
        r = await client.get(callback, allow_redirects=False)
        assert r.headers["Location"] == "/accounts?customer=globex"  # follows the customer
        r = await client.get("/accounts?customer=globex")
        assert r.status == 200
        assert "1 accounts" in await r.text()
        # The index page's disconnect form works (same site, its own CSRF token).
        page = await (await client.get("/?customer=globex")).text()
        token = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert token is not None
        r = await client.post("/salesforce/disconnect?customer=globex",
                              data={"csrf_token": token.group(1)},
                              headers={"Origin": str(client.make_url("/").origin())},
                              allow_redirects=False)
        assert (r.status, r.headers["Location"]) == (303, "/?customer=globex")
        assert await client.server.app[sfrtr_aiohttp.MANAGER].status("globex") is None
    finally:
        await client.close()


async def test_every_mac_is_compared_in_constant_time(emulator: Emulator, app_client, http,
                                                      monkeypatch: pytest.MonkeyPatch):
    """The PKCE cookie's MAC and the CSRF token go through hmac.compare_digest (a spy
    records what it compared; the comparisons still run). The emulator, in this
    process too, makes comparisons of its own: only ours are looked for."""
    import hmac as hmac_module

    from sfrtr import oauth_state

    real = hmac_module.compare_digest
    compared: list[bytes] = []

    def spy(a: bytes | str, b: bytes | str) -> bool:
        compared.extend(x.encode() if isinstance(x, str) else bytes(x) for x in (a, b))
        return real(a, b)  # type: ignore[type-var]

    monkeypatch.setattr(oauth_state.hmac, "compare_digest", spy)
    callback = await authorize(app_client, http)
    jar = app_client.session.cookie_jar.filter_cookies(app_client.make_url(callback))
    pkce_mac = jar[sfrtr_aiohttp.PKCE_COOKIE].value.rsplit(".", 1)[1]
    assert (await app_client.get(callback, allow_redirects=False)).status == 302
    assert pkce_mac.encode() in compared
    token = await csrf(app_client)
    r = await app_client.post("/salesforce/disconnect?customer=acme", allow_redirects=False,
                              data={"csrf_token": token})
    assert r.status == 303
    assert token.encode() in compared


async def test_a_customer_authorizes_at_the_login_host_the_app_chooses(emulator: Emulator, http):
    """A sandbox switch: the flow starts at another login host (a second emulator here),
    the code is exchanged there, and the grant is refreshed there; a host outside the
    policy is refused before the browser goes anywhere."""
    sandbox = Emulator()
    async with sandbox.serve():
        sandbox.seed("acme", "Account", [{"Name": "a"}])
        client = await serve(build_app(emulator, login_host=lambda request: {
            "sandbox": str(sandbox.base_url), "evil": "https://evil.example",
        }.get(request.query.get("host", ""))))
        try:
            r = await client.get("/salesforce/connect?customer=acme&host=evil",
                                 allow_redirects=False)
            assert r.status == 400
            assert "login host is not allowed" in await r.text()
            r = await client.get("/salesforce/connect?customer=acme&login_hint=acme&host=sandbox",
                                 allow_redirects=False)
            assert r.status == 302
            assert r.headers["Location"].startswith(str(sandbox.base_url))
            async with http.get(r.headers["Location"], allow_redirects=False) as approved:
                callback = urlsplit(approved.headers["Location"])
            r = await client.get(f"{callback.path}?{callback.query}", allow_redirects=False)
            assert r.status == 302
            manager = client.server.app[sfrtr_aiohttp.MANAGER]
            state = await manager.store.read("acme")
            assert state is not None
            assert state.record.token_host == str(sandbox.base_url)
            sandbox.expire_sessions("acme")
            r = await client.get("/accounts?customer=acme")
            assert (r.status, await r.json()) == (200, {"count": 1})
            assert sandbox.ledger["redemptions"] == 1
            assert emulator.ledger["redemptions"] == 0
            assert emulator.ledger["code_exchanges"] == 0
        finally:
            await client.close()


async def test_the_example_tells_the_admin_once_when_a_grant_dies(
        emulator: Emulator, http, caplog: pytest.LogCaptureFixture):
    example = load_example()
    emulator.seed("globex", "Account", [{"Name": "Globex"}])
    client = TestClient(TestServer(example.build_app(str(emulator.base_url))))
    await client.start_server()
    try:
        callback = await authorize(client, http, "globex")
        await client.get(callback, allow_redirects=False)
        # The customer's admin revokes the app in Salesforce; the session expires.
        for family in emulator.world.families.values():
            emulator.world.revoke_family(family)
        emulator.expire_sessions("globex")
        with caplog.at_level(logging.INFO, logger="example.admin"):
            for _ in range(3):  # three requests find out; the admin hears it once
                r = await client.get("/accounts?customer=globex")
                assert r.status == 409
                assert "globex must connect again" in await r.text()
            await client.server.app[sfrtr_aiohttp.MANAGER].hooks.drain()
        told = [r for r in caplog.records if r.name == "example.admin"]
        assert len(told) == 1
        assert "globex must re-authorize" in told[0].getMessage()
    finally:
        await client.close()


async def test_grants_of_an_app_being_moved_from_keep_refreshing_through_apps(
        emulator: Emulator, http, tmp_path: Path):
    """A customer connected through an old connected app: the web app now connects new
    customers through its primary app and names the old one in ``apps=``, so that
    grant keeps working (its refreshes go to the app that issued it)."""
    from sfrtr import OAuthClient, RefreshPolicy, TokenManager
    from tests.test_grant_hosts import code_grant

    emulator.add_app("old-app", "old-secret")
    old = OAuthConfig(client_id="old-app", client_secret=Secret("old-secret"),
                      login_url=str(emulator.base_url), timeout=1.0, connect_timeout=0.5,
                      instance_policy=InstanceUrlPolicy.for_emulator())
    path = tmp_path / "grants.db"
    seeding = TokenManager(OAuthClient(old), SqliteStore(path), RefreshPolicy())
    try:
        await seeding.connect("legacy", await code_grant(seeding.oauth, "legacy"))
    finally:
        await seeding.aclose()
    client = await serve(build_app(emulator, store_factory=lambda: SqliteStore(path),
                                   apps=[old]))
    try:
        r = await client.get("/accounts?customer=legacy")
        assert r.status == 200, await r.text()
        emulator.expire_sessions()
        r = await client.get("/accounts?customer=legacy")
        assert r.status == 200, await r.text()
        assert emulator.ledger["redemptions"] == 1
        assert emulator.ledger["reuse"] == 0
        state = await client.server.app[sfrtr_aiohttp.MANAGER].store.read("legacy")
        assert state is not None
        assert state.record.client_id == "old-app"
        assert state.record.generation == 1
    finally:
        await client.close()
