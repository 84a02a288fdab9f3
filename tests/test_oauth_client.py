"""The OAuth client against the emulator: code exchange, revoke, introspect, proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from sfrtr import OAuthClient, OAuthError, Secret
from sfrtr.emulator import Emulator
from sfrtr.oauth import pkce
from sfrtr.oauth.client import basic_credentials
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio

CALLBACK = "https://app.example/callback"


async def test_authorization_code_flow_with_pkce(emulator: Emulator, http):
    oauth = emulator_oauth(emulator)
    verifier = pkce.make_verifier()
    url = oauth.authorize_url(redirect_uri=CALLBACK, state="s1",
                              code_challenge=pkce.challenge(verifier), login_hint="acme")
    async with http.get(url, allow_redirects=False) as r:
        query = parse_qs(urlsplit(r.headers["Location"]).query)
    assert query["state"] == ["s1"]
    grant = await oauth.exchange_code(query["code"][0], redirect_uri=CALLBACK,
                                      code_verifier=verifier)
    assert grant.refresh_token is not None
    assert grant.instance_url == emulator.base_url
    with pytest.raises(OAuthError) as info:  # one-time code
        await oauth.exchange_code(query["code"][0], redirect_uri=CALLBACK,
                                  code_verifier=verifier)
    assert info.value.error == "invalid_grant"
    await oauth.aclose()


async def test_revoke_and_introspect(emulator: Emulator):
    oauth = emulator_oauth(emulator)
    grant = emulator_grant(emulator, "acme")
    assert grant.refresh_token is not None
    info = await oauth.introspect(grant.access_token, hint="access_token")
    assert info.active
    assert info.expires_at is not None
    assert info.expires_at > info.issued_at  # type: ignore[operator]
    await oauth.revoke(grant.refresh_token)
    assert not (await oauth.introspect(grant.refresh_token)).active
    assert emulator.ledger["revocations"] == 1
    with pytest.raises(OAuthError) as err:
        await oauth.revoke(Secret("never-issued"))
    assert err.value.error == "invalid_token"
    await oauth.aclose()


class ForwardProxy:
    """A minimal HTTP forward proxy that demands credentials, for the proxy test."""

    def __init__(self, user: str, password: str) -> None:
        self.expected = basic_credentials(user, password)
        self.forwarded: list[str] = []
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Proxy-Authorization") != self.expected:
            return web.Response(status=407)
        assert self.session is not None
        target = str(request.url)
        self.forwarded.append(target)
        headers = {"Content-Type": request.headers.get("Content-Type", "")}
        async with self.session.request(request.method, target, data=await request.read(),
                                        headers=headers) as upstream:
            return web.Response(status=upstream.status, body=await upstream.read(),
                                content_type=upstream.content_type)


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[ForwardProxy, str]]:
    fp = ForwardProxy("egress", "hunter2")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fp.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as session:
        fp.session = session
        yield fp, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_refresh_goes_through_an_authenticated_proxy(emulator: Emulator, proxy):
    fp, proxy_url = proxy
    oauth = emulator_oauth(emulator, proxy=proxy_url,
                           proxy_auth=("egress", Secret("hunter2")))
    grant = emulator_grant(emulator, "acme")
    assert grant.refresh_token is not None
    outcome = await oauth.refresh(grant.refresh_token)
    assert outcome.kind.value == "ok", outcome
    assert fp.forwarded == [f"{emulator.base_url}/services/oauth2/token"]
    await oauth.aclose()


async def test_wrong_proxy_credentials_do_not_redeem(emulator: Emulator, proxy):
    fp, proxy_url = proxy
    oauth = emulator_oauth(emulator, proxy=proxy_url, proxy_auth=("egress", Secret("nope")))
    grant = emulator_grant(emulator, "acme")
    assert grant.refresh_token is not None
    outcome = await oauth.refresh(grant.refresh_token)
    assert outcome.kind.value == "not_sent"  # a 407 never reached the token endpoint
    assert fp.forwarded == []
    assert emulator.ledger["redemptions"] == 0
    await oauth.aclose()


async def test_async_with_closes_only_the_session_it_made(emulator: Emulator):
    async with emulator_oauth(emulator) as oauth:
        grant = emulator_grant(emulator, "acme")
        assert (await oauth.introspect(grant.access_token, hint="access_token")).active
        own = oauth.session
    assert own.closed
    async with aiohttp.ClientSession() as given:
        async with OAuthClient(emulator_oauth(emulator).config, given) as oauth:
            assert oauth.session is given
        assert not given.closed  # the caller's to close


async def test_a_truncated_answer_is_sfrtrs_error_not_aiohttps():
    """An answer cut short (a ClientPayloadError inside aiohttp) never escapes as an
    aiohttp exception: the calls that raise raise TokenEndpointUnavailable, a refresh
    is INDETERMINATE (the request was sent)."""
    import asyncio

    from sfrtr import OAuthConfig, OutcomeKind, TokenEndpointUnavailable

    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"access")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut_short, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with OAuthClient(OAuthConfig(client_id="app", client_secret=Secret("s"),
                                           login_url=f"http://127.0.0.1:{port}")) as oauth:
            for call in (oauth.exchange_code("c", redirect_uri=CALLBACK, code_verifier="v"),
                         oauth.revoke(Secret("t")), oauth.introspect(Secret("t"))):
                with pytest.raises(TokenEndpointUnavailable,
                                   match=r"\(ClientPayloadError\): sent, no answer; it may "
                                         "have been processed"):
                    await call
            outcome = await oauth.refresh(Secret("r"))
            assert outcome.kind is OutcomeKind.INDETERMINATE
            assert outcome.error == "ClientPayloadError"
    finally:
        server.close()
        await server.wait_closed()
    # Nobody listens there now: nothing can have been sent.
    async with OAuthClient(OAuthConfig(client_id="app", client_secret=Secret("s"),
                                       login_url=f"http://127.0.0.1:{port}")) as oauth:
        with pytest.raises(TokenEndpointUnavailable, match="nothing was sent"):
            await oauth.revoke(Secret("t"))
