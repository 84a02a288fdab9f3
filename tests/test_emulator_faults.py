"""Each injected fault does what it says, on the wire."""

from __future__ import annotations

import time

import aiohttp
import pytest

from sfrtr.emulator import Emulator
from tests.emulator_calls import api_get, refresh

pytestmark = pytest.mark.anyio


async def test_latency_and_jitter_delay_the_answer(emulator: Emulator, http):
    grant = emulator.grant("acme")
    emulator.faults.set("token", latency=0.2, jitter=0.1)
    started = time.monotonic()
    status, _ = await refresh(http, emulator, grant["refresh_token"])
    elapsed = time.monotonic() - started
    assert status == 200
    assert 0.2 <= elapsed < 1.0


async def test_error_rate_answers_before_any_rotation(emulator: Emulator, http):
    grant = emulator.grant("acme")
    emulator.faults.set("token", error_rate=1.0, error_status=500)
    status, body = await refresh(http, emulator, grant["refresh_token"])
    assert status == 500
    assert body["error"] == "server_error"
    assert emulator.ledger["redemptions"] == 0
    emulator.faults.set("token", error_rate=0.0)
    assert (await refresh(http, emulator, grant["refresh_token"]))[0] == 200


async def test_api_error_rate_is_server_unavailable(emulator: Emulator, http):
    token = emulator.grant("acme")["access_token"]
    emulator.faults.set("api", error_rate=1.0)
    status, body, _ = await api_get(http, emulator, token, "/services/data/v67.0/limits")
    assert (status, body[0]["errorCode"]) == (503, "SERVER_UNAVAILABLE")


async def test_reset_before_processing_rotates_nothing(emulator: Emulator, http):
    grant = emulator.grant("acme")
    emulator.faults.set("token", reset_before=1)
    with pytest.raises(aiohttp.ClientError):
        await refresh(http, emulator, grant["refresh_token"])
    assert emulator.ledger["redemptions"] == 0
    status, _ = await refresh(http, emulator, grant["refresh_token"])
    assert status == 200  # the one reset was used up; the token was never burnt


async def test_rotate_then_drop_burns_the_token_silently(emulator: Emulator, http):
    grant = emulator.grant("acme")
    emulator.faults.set("token", drop_after_rotation=1)
    with pytest.raises(aiohttp.ClientError):
        await refresh(http, emulator, grant["refresh_token"])
    assert emulator.ledger["redemptions"] == 1
    assert emulator.ledger["dropped_after_rotation"] == 1
    # The client never saw the new token; presenting the old one again is reuse.
    status, body = await refresh(http, emulator, grant["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    assert emulator.ledger["reuse"] == 1
    assert emulator.family_revoked("acme")


async def test_slow_drip_delivers_the_whole_body_slowly(emulator: Emulator, http):
    grant = emulator.grant("acme")
    emulator.faults.set("token", drip_delay=0.02)
    started = time.monotonic()
    status, body = await refresh(http, emulator, grant["refresh_token"])
    elapsed = time.monotonic() - started
    assert status == 200
    assert body["refresh_token"]
    # The body is several hundred bytes sent 16 at a time.
    assert elapsed >= 0.02 * 10


async def test_slow_drip_trips_a_client_timeout_after_rotation(emulator: Emulator, http):
    grant = emulator.grant("acme")
    emulator.faults.set("token", drip_delay=0.2)
    with pytest.raises(TimeoutError):
        async with http.post(f"{emulator.base_url}/services/oauth2/token",
                             data={"grant_type": "refresh_token",
                                   "refresh_token": grant["refresh_token"],
                                   "client_id": "sfrtr-emulator-client",
                                   "client_secret": "sfrtr-emulator-secret"},
                             timeout=aiohttp.ClientTimeout(total=0.5)) as r:
            await r.read()
    assert emulator.ledger["redemptions"] == 1


async def test_faults_and_ledger_over_admin_http(emulator: Emulator, http):
    base = f"{emulator.base_url}/_emulator"
    async with http.post(f"{base}/faults", json={"token": {"latency": 0.01}}) as r:
        assert r.status == 200
        assert (await r.json())["token"]["latency"] == 0.01
    assert emulator.faults["token"].latency == 0.01
    for bad in ({"token": {"latency": -1}}, {"token": {"nope": 1}}, {"nowhere": {}},
                {"token": {"error_rate": 2}}, {"token": 5}):
        async with http.post(f"{base}/faults", json=bad) as r:
            assert r.status == 400, bad
            assert (await r.json())[0]["errorCode"] == "INVALID_FAULT"
    async with http.post(f"{base}/faults", data=b"{oops") as r:
        assert r.status == 400
    async with http.delete(f"{base}/faults") as r:
        assert (await r.json())["token"]["latency"] == 0
    async with http.post(f"{base}/customers", json={"name": "acme"}) as r:
        assert r.status == 201
        grant = await r.json()
    await refresh(http, emulator, grant["refresh_token"])
    await refresh(http, emulator, grant["refresh_token"])  # reuse
    async with http.get(f"{base}/ledger") as r:
        ledger = await r.json()
    assert ledger["totals"]["redemptions"] == 1
    assert ledger["totals"]["reuse"] == 1
    assert ledger["totals"]["revocations"] == 1
    (family,) = ledger["families"].values()
    assert family["reuse"] == 1
    async with http.post(f"{base}/seed", json={"customer": "acme", "sobject": "Widget__c",
                                               "records": [{"Name": "w"}]}) as r:
        assert r.status == 201
        assert len((await r.json())["ids"]) == 1
    async with http.post(f"{base}/seed", json={"customer": "acme"}) as r:
        assert r.status == 400
    async with http.post(f"{base}/ledger/reset") as r:
        assert (await r.json())["totals"]["reuse"] == 0
