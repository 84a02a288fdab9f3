"""Server-to-server flows over real sockets: JWT bearer and client credentials, coalesced."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sfrtr import Client, ConfigurationError, OAuthError, Secret, SessionRefused
from sfrtr.emulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator
from sfrtr.salesforce.server_flows import ClientCredentials, JwtBearer, ServerTokenSource
from tests.conftest import emulator_oauth

pytestmark = pytest.mark.anyio


def _key_pair() -> tuple[str, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


@pytest.fixture(scope="module")
def keys() -> tuple[str, bytes]:
    return _key_pair()


@pytest.fixture
async def source(emulator: Emulator):
    oauth = emulator_oauth(emulator)
    async with oauth, ServerTokenSource(oauth) as tokens:
        yield tokens


def _jwt(emulator: Emulator, private: str, user: str = "admin@acme.example") -> JwtBearer:
    return JwtBearer(client_id=DEFAULT_CLIENT_ID, username=user, private_key=Secret(private),
                     login_url=str(emulator.base_url))


async def test_jwt_bearer_one_request_for_a_storm_and_after_expiry(
        emulator: Emulator, source: ServerTokenSource, keys):
    private, public = keys
    emulator.server_grants.allow_jwt(DEFAULT_CLIENT_ID, public)
    emulator.seed("acme", "Account", [{"Name": "jwt"}])
    source.add("acme", _jwt(emulator, private))
    client = Client("acme", source)
    emulator.faults.set("token", latency=0.05)  # so the callers overlap the request
    results = await asyncio.gather(*(client.query("SELECT Name FROM Account")
                                     for _ in range(200)))
    assert all(r.records[0]["Name"] == "jwt" for r in results)
    assert source.token_requests == 1
    assert emulator.server_grants.issued["acme"] == 1
    for _ in range(1000):  # the hot path: no request while the token is fresh
        await source.credentials("acme")
    assert source.token_requests == 1
    emulator.expire_sessions("acme")
    await asyncio.gather(*(client.limits() for _ in range(100)))
    assert source.token_requests == 2  # 100 refused calls, one new token
    assert emulator.ledger["redemptions"] == 0  # no refresh token anywhere
    assert all(f.current_refresh is None for f in emulator.world.families.values())


async def test_jwt_refusals(emulator: Emulator, source: ServerTokenSource, keys):
    private, public = keys
    emulator.ensure_customer("acme")
    source.add("acme", _jwt(emulator, private))
    with pytest.raises(OAuthError, match="invalid_client_id"):  # no certificate on the app
        await source.credentials("acme")
    emulator.server_grants.allow_jwt(DEFAULT_CLIENT_ID, _key_pair()[1])  # another key
    with pytest.raises(OAuthError, match="invalid assertion"):
        await source.credentials("acme")
    emulator.server_grants.allow_jwt(DEFAULT_CLIENT_ID, public)
    source.add("nobody", _jwt(emulator, private, user="nobody@x.example"))
    with pytest.raises(OAuthError, match="approved"):
        await source.credentials("nobody")
    stale = JwtBearer(client_id=DEFAULT_CLIENT_ID, username="admin@acme.example",
                      private_key=Secret(private), login_url=str(emulator.base_url),
                      lifetime=-10)
    source.add("acme", stale)
    with pytest.raises(OAuthError, match="expired"):
        await source.credentials("acme")
    source.add("acme", _jwt(emulator, private))
    assert (await source.credentials("acme")).access_token
    with pytest.raises(ConfigurationError, match="PEM"):
        JwtBearer(client_id="x", username="y", private_key=Secret("not a key")).assertion()
    assert private not in repr(_jwt(emulator, private))


async def test_client_credentials(emulator: Emulator, source: ServerTokenSource):
    emulator.server_grants.allow_client_credentials(DEFAULT_CLIENT_ID, "beta")
    emulator.seed("beta", "Account", [{"Name": "cc"}])
    source.add("beta", ClientCredentials(DEFAULT_CLIENT_ID, Secret(DEFAULT_CLIENT_SECRET),
                                         str(emulator.base_url)))
    client = Client("beta", source)
    assert (await client.query("SELECT Name FROM Account")).records[0]["Name"] == "cc"
    source.add("wrong", ClientCredentials(DEFAULT_CLIENT_ID, Secret("nope"),
                                          str(emulator.base_url)))
    with pytest.raises(OAuthError, match="invalid_client"):
        await source.credentials("wrong")


async def test_a_new_token_refused_again_stops_token_requests(
        emulator: Emulator, source: ServerTokenSource):
    async def always_401(request: web.Request) -> web.Response:
        return web.json_response([{"message": "Session expired or invalid",
                                   "errorCode": "INVALID_SESSION_ID"}], status=401)

    app = web.Application()
    app.router.add_get("/services/data/v67.0/limits", always_401)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    emulator.instance_url = f"http://127.0.0.1:{port}"
    emulator.server_grants.allow_client_credentials(DEFAULT_CLIENT_ID, "beta")
    source.add("beta", ClientCredentials(DEFAULT_CLIENT_ID, Secret(DEFAULT_CLIENT_SECRET),
                                         str(emulator.base_url)))
    client = Client("beta", source)
    try:
        with pytest.raises(SessionRefused):
            await client.limits()
        assert source.token_requests == 2  # the first token, one new one, then stop
        for _ in range(5):
            with pytest.raises(SessionRefused):
                await client.limits()
        assert source.token_requests == 2
    finally:
        await runner.cleanup()
