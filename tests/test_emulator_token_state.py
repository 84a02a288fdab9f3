"""The emulator's admin query for a refresh token's state, over real sockets."""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp
import pytest

from sfrtr.emulator import Emulator, TokenState
from sfrtr.secret import fingerprint
from tests.emulator_calls import refresh

pytestmark = pytest.mark.anyio


async def ask(http: aiohttp.ClientSession, em: Emulator, **body: Any) -> tuple[int, Any]:
    async with http.post(f"{em.base_url}/_emulator/refresh-token-state", json=body) as resp:
        return resp.status, await resp.json()


async def test_live_then_rotated_by_value_and_fingerprint(emulator: Emulator, http):
    grant = emulator.grant("acme")
    first = grant["refresh_token"]
    assert emulator.refresh_token_state(first) is TokenState.LIVE
    assert emulator.refresh_token_state(fingerprint=fingerprint(first)) is TokenState.LIVE
    status, body = await refresh(http, emulator, first)
    assert status == 200
    second = body["refresh_token"]
    assert emulator.refresh_token_state(first) is TokenState.ROTATED
    assert emulator.refresh_token_state(fingerprint=fingerprint(first)) is TokenState.ROTATED
    assert emulator.refresh_token_state(second) is TokenState.LIVE
    assert emulator.refresh_token_state(fingerprint=fingerprint(second)) is TokenState.LIVE
    # Over HTTP, by value and by fingerprint; the answer never echoes a token.
    status, answer = await ask(http, emulator, refresh_token=first)
    assert status == 200
    assert answer == {"state": "rotated", "states": {fingerprint(first): "rotated"}}
    assert first not in str(answer)
    status, answer = await ask(http, emulator, fingerprint=fingerprint(second))
    assert (status, answer["state"]) == (200, "live")


async def test_reuse_revokes_every_token_of_the_family(emulator: Emulator, http):
    grant = emulator.grant("acme")
    first = grant["refresh_token"]
    _, body = await refresh(http, emulator, first)
    second = body["refresh_token"]
    await refresh(http, emulator, first)  # reuse: the family is revoked
    assert emulator.ledger["revocations"] == 1
    status, answer = await ask(http, emulator,
                               fingerprints=[fingerprint(first), fingerprint(second)])
    assert status == 200
    assert answer == {"states": {fingerprint(first): "revoked",
                                 fingerprint(second): "revoked"}}


async def test_revoke_endpoint_and_other_families(emulator: Emulator, http):
    a = emulator.grant("acme")["refresh_token"]
    b = emulator.grant("globex")["refresh_token"]
    async with http.post(f"{emulator.base_url}/services/oauth2/revoke", data={"token": a}) as r:
        assert r.status == 200
    assert emulator.refresh_token_state(a) is TokenState.REVOKED
    assert emulator.refresh_token_state(b) is TokenState.LIVE


async def test_unknown_and_lookup_by_longer_sha256(emulator: Emulator, http):
    grant = emulator.grant("acme")
    token = grant["refresh_token"]
    full = hashlib.sha256(token.encode()).hexdigest()
    assert emulator.refresh_token_state(fingerprint=full) is TokenState.LIVE
    assert emulator.refresh_token_state(fingerprint=f"sha256:{full[:16].upper()}") \
        is TokenState.LIVE
    assert emulator.refresh_token_state("5Aep!never-issued") is TokenState.UNKNOWN
    assert emulator.refresh_token_state(fingerprint="0" * 12) is TokenState.UNKNOWN
    async with http.get(f"{emulator.base_url}/_emulator/refresh-token-state",
                        params=[("fingerprint", fingerprint(token)),
                                ("fingerprint", "ffffffffffff")]) as resp:
        assert resp.status == 200
        assert await resp.json() == {"states": {fingerprint(token): "live",
                                                "ffffffffffff": "unknown"}}


async def test_asking_does_not_change_the_state(emulator: Emulator, http):
    token = emulator.grant("acme")["refresh_token"]
    for _ in range(3):
        assert (await ask(http, emulator, refresh_token=token))[1]["state"] == "live"
    assert emulator.ledger["redemptions"] == 0
    status, _ = await refresh(http, emulator, token)
    assert status == 200
    assert emulator.ledger["reuse"] == 0


async def test_the_index_follows_new_tokens(emulator: Emulator, http):
    token = emulator.grant("acme")["refresh_token"]
    assert emulator.refresh_token_state(fingerprint=fingerprint(token)) is TokenState.LIVE
    for _ in range(3):  # tokens issued after the first query are found too
        _, body = await refresh(http, emulator, token)
        assert emulator.refresh_token_state(fingerprint=fingerprint(token)) \
            is TokenState.ROTATED
        token = body["refresh_token"]
        assert emulator.refresh_token_state(fingerprint=fingerprint(token)) is TokenState.LIVE


@pytest.mark.parametrize("body", [
    {}, {"fingerprint": "xyz"}, {"fingerprint": "abc"}, {"fingerprints": "abcdefabcdef"},
    {"fingerprints": [1]}, {"refresh_token": ""}, {"refresh_token": 5},
])
async def test_bad_queries_are_400(emulator: Emulator, http, body):
    status, answer = await ask(http, emulator, **body)
    assert status == 400
    assert answer[0]["errorCode"] == "INVALID_FIELD"


async def test_python_api_wants_exactly_one_key(emulator: Emulator):
    with pytest.raises(TypeError):
        emulator.refresh_token_state()
    with pytest.raises(TypeError):
        emulator.refresh_token_state("a", fingerprint="abcdefabcdef")
    with pytest.raises(ValueError, match="hex digits"):
        emulator.refresh_token_state(fingerprint="not-hex")
