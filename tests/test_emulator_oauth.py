"""The emulator's token endpoint punishes reuse exactly as Salesforce does."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from sfrtr.emulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator
from sfrtr.emulator.state import sign
from tests.emulator_calls import api_get, basic_auth, post_token, refresh

pytestmark = pytest.mark.anyio

EXPIRED = {"error": "invalid_grant", "error_description": "expired access/refresh token"}


async def test_refresh_rotates_and_has_salesforce_shape(emulator: Emulator, http):
    grant = emulator.grant("acme")
    status, body = await refresh(http, emulator, grant["refresh_token"])
    assert status == 200
    assert body["refresh_token"] != grant["refresh_token"]
    assert body["access_token"] != grant["access_token"]
    assert "expires_in" not in body
    assert body["token_type"] == "Bearer"
    assert len(body["issued_at"]) == 13
    assert body["issued_at"].isdigit()
    assert body["instance_url"] == emulator.base_url
    assert body["signature"] == sign(body["id"], body["issued_at"], DEFAULT_CLIENT_SECRET)
    assert set(body) == {"access_token", "refresh_token", "signature", "scope", "instance_url",
                         "id", "token_type", "issued_at"}
    assert emulator.ledger["redemptions"] == 1


async def test_reuse_revokes_the_whole_family(emulator: Emulator, http):
    grant = emulator.grant("acme")
    _, first = await refresh(http, emulator, grant["refresh_token"])
    status, body = await refresh(http, emulator, grant["refresh_token"])  # reuse
    assert (status, body) == (400, EXPIRED)
    # The newest refresh token and its access token die with the family.
    assert await refresh(http, emulator, first["refresh_token"]) == (400, EXPIRED)
    status, errors, _ = await api_get(http, emulator, first["access_token"],
                                      "/services/data/v67.0/limits")
    assert status == 401
    assert errors[0]["errorCode"] == "INVALID_SESSION_ID"
    assert emulator.ledger["reuse"] == 1
    assert emulator.ledger["revocations"] == 1
    assert emulator.family_revoked("acme")


async def test_concurrent_refresh_is_refused_without_revocation(emulator: Emulator, http):
    emulator.faults.set("token", latency=0.2)
    grant = emulator.grant("acme")
    (s1, b1), (s2, b2) = await asyncio.gather(
        refresh(http, emulator, grant["refresh_token"]),
        refresh(http, emulator, grant["refresh_token"]))
    statuses = sorted([s1, s2])
    assert statuses == [200, 400]
    loser = b1 if s1 == 400 else b2
    winner = b1 if s1 == 200 else b2
    assert loser == {"error": "invalid_grant",
                     "error_description": "token request is already being processed"}
    assert emulator.ledger["concurrent_rejections"] == 1
    assert emulator.ledger["revocations"] == 0
    emulator.faults.clear()
    status, _ = await refresh(http, emulator, winner["refresh_token"])
    assert status == 200


async def test_reuse_window_accepts_recent_replay(emulator: Emulator, http):
    emulator.add_app("leeway", "leeway-secret", reuse_window=5.0)
    grant = emulator.grant("acme", client_id="leeway")
    creds = {"client_id": "leeway", "client_secret": "leeway-secret"}
    _, first = await post_token(http, emulator, grant_type="refresh_token",
                                refresh_token=grant["refresh_token"], **creds)
    status, replay = await post_token(http, emulator, grant_type="refresh_token",
                                      refresh_token=grant["refresh_token"], **creds)
    assert status == 200
    assert replay["refresh_token"] == first["refresh_token"]
    assert emulator.ledger["reuse_in_window"] == 1
    assert emulator.ledger["revocations"] == 0


async def test_reuse_window_expires(emulator: Emulator, http):
    emulator.add_app("leeway", "leeway-secret", reuse_window=0.1)
    grant = emulator.grant("acme", client_id="leeway")
    creds = {"client_id": "leeway", "client_secret": "leeway-secret"}
    await post_token(http, emulator, grant_type="refresh_token",
                     refresh_token=grant["refresh_token"], **creds)
    await asyncio.sleep(0.2)
    status, body = await post_token(http, emulator, grant_type="refresh_token",
                                    refresh_token=grant["refresh_token"], **creds)
    assert (status, body) == (400, EXPIRED)
    assert emulator.ledger["reuse"] == 1


async def test_rotation_off_keeps_the_refresh_token(emulator: Emulator, http):
    emulator.add_app("static", "static-secret", rotation=False)
    grant = emulator.grant("acme", client_id="static")
    creds = {"client_id": "static", "client_secret": "static-secret"}
    for _ in range(2):
        status, body = await post_token(http, emulator, grant_type="refresh_token",
                                        refresh_token=grant["refresh_token"], **creds)
        assert status == 200
        assert "refresh_token" not in body
    assert emulator.ledger["reuse"] == 0


async def test_basic_auth_and_client_errors(emulator: Emulator, http):
    grant = emulator.grant("acme")
    url = f"{emulator.base_url}/services/oauth2/token"
    async with http.post(url, headers=basic_auth(), data={"grant_type": "refresh_token",
                                                "refresh_token": grant["refresh_token"]}) as r:
        assert r.status == 200
    assert await post_token(http, emulator, grant_type="refresh_token", refresh_token="x",
                            client_id="nope") == (
        400, {"error": "invalid_client_id", "error_description": "client identifier invalid"})
    assert await post_token(http, emulator, grant_type="refresh_token", refresh_token="x",
                            client_secret="wrong") == (
        400, {"error": "invalid_client", "error_description": "invalid client credentials"})
    assert await post_token(http, emulator, grant_type="password") == (
        400, {"error": "unsupported_grant_type", "error_description": "grant type not supported"})
    assert await refresh(http, emulator, "never-issued") == (400, EXPIRED)
    assert emulator.ledger["rejected_refreshes"] == 1


@pytest.mark.parametrize(("body", "content_type"), [
    (b'{"grant_type": "refresh_token"}', "application/json"),
    (b"\xff\xfe\x00garbage", "text/plain"),
])
async def test_wrong_content_type_is_a_clear_400(emulator: Emulator, http, body, content_type):
    async with http.post(f"{emulator.base_url}/services/oauth2/token", data=body,
                         headers={"Content-Type": content_type}) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "invalid_request"


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


async def _authorize(http, em: Emulator, challenge: str | None, state: str = "st-1",
                     redirect_uri: str = "https://app.example/callback") -> dict[str, str]:
    params = {"response_type": "code", "client_id": DEFAULT_CLIENT_ID,
              "redirect_uri": redirect_uri, "state": state, "login_hint": "acme"}
    if challenge:
        params.update(code_challenge=challenge, code_challenge_method="S256")
    async with http.get(f"{em.base_url}/services/oauth2/authorize", params=params,
                        allow_redirects=False) as r:
        assert r.status == 302
        location = urlsplit(r.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == redirect_uri
    return {k: v[0] for k, v in parse_qs(location.query).items()}


async def test_authorization_code_with_pkce(emulator: Emulator, http):
    verifier, challenge = _pkce()
    query = await _authorize(http, emulator, challenge, state="opaque-123")
    assert query["state"] == "opaque-123"
    status, body = await post_token(http, emulator, grant_type="authorization_code",
                                    code=query["code"], code_verifier=verifier,
                                    redirect_uri="https://app.example/callback")
    assert status == 200
    assert body["refresh_token"]
    # One-time code.
    status, body = await post_token(http, emulator, grant_type="authorization_code",
                                    code=query["code"], code_verifier=verifier,
                                    redirect_uri="https://app.example/callback")
    assert (status, body["error"]) == (400, "invalid_grant")
    assert emulator.ledger["code_exchanges"] == 1


async def test_pkce_verifier_and_redirect_must_match(emulator: Emulator, http):
    verifier, challenge = _pkce()
    query = await _authorize(http, emulator, challenge)
    status, body = await post_token(http, emulator, grant_type="authorization_code",
                                    code=query["code"], code_verifier=verifier + "x",
                                    redirect_uri="https://app.example/callback")
    assert (status, body) == (400, {"error": "invalid_grant",
                                    "error_description": "invalid code verifier"})
    query = await _authorize(http, emulator, challenge)
    status, body = await post_token(http, emulator, grant_type="authorization_code",
                                    code=query["code"], code_verifier=verifier,
                                    redirect_uri="https://evil.example/callback")
    assert (status, body["error"]) == (400, "invalid_grant")
    query = await _authorize(http, emulator, challenge)
    status, body = await post_token(http, emulator, grant_type="authorization_code",
                                    code=query["code"],
                                    redirect_uri="https://app.example/callback")
    assert (status, body["error_description"]) == (400, "invalid code verifier")


async def test_registered_redirect_uris_are_enforced(emulator: Emulator, http):
    emulator.add_app("strict", "strict-secret", redirect_uris=("https://ok.example/cb",))
    params = {"response_type": "code", "client_id": "strict", "login_hint": "acme",
              "redirect_uri": "https://evil.example/cb"}
    async with http.get(f"{emulator.base_url}/services/oauth2/authorize", params=params,
                        allow_redirects=False) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "redirect_uri_mismatch"


async def _introspect(http, em: Emulator, token: str) -> dict:
    async with http.post(f"{em.base_url}/services/oauth2/introspect",
                         headers=basic_auth(),
                         data={"token": token}) as r:
        assert r.status == 200
        return await r.json()


async def test_introspect_access_and_refresh_tokens(emulator: Emulator, http):
    grant = emulator.grant("acme")
    info = await _introspect(http, emulator, grant["access_token"])
    assert info["active"] is True
    assert info["token_type"] == "access_token"
    assert isinstance(info["exp"], int)
    assert isinstance(info["iat"], int)
    assert info["exp"] - info["iat"] == pytest.approx(7200, abs=2)
    assert (await _introspect(http, emulator, grant["refresh_token"]))["active"] is True
    emulator.expire_sessions("acme")
    assert await _introspect(http, emulator, grant["access_token"]) == {"active": False}
    assert await _introspect(http, emulator, "unknown") == {"active": False}
    _, fresh = await refresh(http, emulator, grant["refresh_token"])
    assert await _introspect(http, emulator, grant["refresh_token"]) == {"active": False}
    # Introspection is not a redemption: the rotated-out token did not count as reuse.
    assert emulator.ledger["reuse"] == 0
    assert (await _introspect(http, emulator, fresh["refresh_token"]))["active"] is True


async def test_revoke_refresh_token_revokes_family(emulator: Emulator, http):
    grant = emulator.grant("acme")
    async with http.post(f"{emulator.base_url}/services/oauth2/revoke",
                         data={"token": grant["refresh_token"]}) as r:
        assert r.status == 200
        assert await r.read() == b""
    status, _, _ = await api_get(http, emulator, grant["access_token"],
                                 "/services/data/v67.0/limits")
    assert status == 401
    assert await refresh(http, emulator, grant["refresh_token"]) == (400, EXPIRED)
    assert emulator.ledger["revocations"] == 1
    async with http.post(f"{emulator.base_url}/services/oauth2/revoke",
                         data={"token": "nonsense"}) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "invalid_token"


async def test_revoke_access_token_only_kills_that_token(emulator: Emulator, http):
    grant = emulator.grant("acme")
    async with http.get(f"{emulator.base_url}/services/oauth2/revoke",
                        params={"token": grant["access_token"]}) as r:
        assert r.status == 200
    status, _body = await refresh(http, emulator, grant["refresh_token"])
    assert status == 200
    assert emulator.ledger["revocations"] == 0


async def test_sessions_expire_after_inactivity():
    em = Emulator(session_timeout=0.3)
    async with em.serve(), aiohttp.ClientSession() as http:
        grant = em.grant("acme")
        for _ in range(3):  # use keeps it alive
            await asyncio.sleep(0.15)
            status, _, _ = await api_get(http, em, grant["access_token"],
                                         "/services/data/v67.0/limits")
            assert status == 200
        await asyncio.sleep(0.4)
        status, _, _ = await api_get(http, em, grant["access_token"],
                                     "/services/data/v67.0/limits")
        assert status == 401


async def test_admin_expire_over_http(emulator: Emulator, http):
    a, b = emulator.grant("a"), emulator.grant("b")
    async with http.post(f"{emulator.base_url}/_emulator/expire",
                         json={"customer": "a"}) as r:
        assert (await r.json()) == {"expired": 1}
    assert (await api_get(http, emulator, a["access_token"], "/services/data/v67.0/limits"))[0] \
        == 401
    assert (await api_get(http, emulator, b["access_token"], "/services/data/v67.0/limits"))[0] \
        == 200
    async with http.post(f"{emulator.base_url}/_emulator/expire") as r:
        assert (await r.json()) == {"expired": 1}
