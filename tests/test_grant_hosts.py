"""Each grant goes back to the login host and connected app that issued it.

Two emulators stand for two login hosts (production and a sandbox); a second
connected app on one of them stands for an app migration. Grants come from the
real code exchange (the web-server flow with PKCE), as an application gets them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import pytest

from sfrtr import (
    ConfigurationError,
    InstanceUrlPolicy,
    MemoryStore,
    OAuthClient,
    RefreshPolicy,
    Secret,
    Status,
    TokenGrant,
    TokenManager,
    TokenRecord,
)
from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import oauth_config
from sfrtr.oauth import pkce

pytestmark = pytest.mark.anyio

CALLBACK = "https://app.example/callback"


@pytest.fixture
async def sandbox() -> AsyncIterator[Emulator]:
    em = Emulator()
    async with em.serve():
        yield em


async def code_grant(oauth: OAuthClient, customer: str) -> TokenGrant:
    """The web-server flow against ``oauth``'s login host (the emulator approves at once)."""
    verifier = pkce.make_verifier()
    url = oauth.authorize_url(redirect_uri=CALLBACK, state="s", login_hint=customer,
                              code_challenge=pkce.challenge(verifier))
    async with oauth.session.get(url, allow_redirects=False) as answer:
        code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    return await oauth.exchange_code(code, redirect_uri=CALLBACK, code_verifier=verifier)


async def test_a_sandbox_grant_is_refreshed_and_revoked_at_the_sandbox(emulator: Emulator,
                                                                       sandbox: Emulator):
    oauth = OAuthClient(oauth_config(str(emulator.base_url)))  # production's login host
    manager = TokenManager(oauth, MemoryStore(), RefreshPolicy())
    try:
        grant = await code_grant(oauth.for_host(str(sandbox.base_url)), "acme")
        assert grant.token_host == str(sandbox.base_url)
        record = await manager.connect("acme", grant)
        assert record.token_host == str(sandbox.base_url)
        stale = await manager.token("acme")
        creds = await manager.refresh("acme", stale=stale)
        assert creds.access_token != stale
        assert sandbox.ledger["redemptions"] == 1
        assert emulator.ledger["redemptions"] == 0
        state = await manager.store.read("acme")
        assert state is not None
        assert state.record.token_host == str(sandbox.base_url)  # kept across the rotation
        assert state.record.generation == 1
        await manager.disconnect("acme")
        assert sandbox.family_revoked("acme")
    finally:
        await manager.aclose()


async def test_grants_of_a_second_app_use_that_apps_credentials(emulator: Emulator):
    emulator.add_app("app-two", "secret-two")
    first = OAuthClient(oauth_config(str(emulator.base_url)))
    second = OAuthClient(oauth_config(str(emulator.base_url), client_id="app-two",
                                      client_secret=Secret("secret-two")))
    manager = TokenManager(first, MemoryStore(), RefreshPolicy(), apps=[second])
    try:
        old = await manager.connect("old-app", await code_grant(first, "old-app"))
        new = await manager.connect("new-app", await code_grant(second, "new-app"))
        assert old.client_id == "sfrtr-emulator-client"
        assert new.client_id == "app-two"
        for customer in ("old-app", "new-app"):
            stale = await manager.token(customer)
            await manager.refresh(customer, stale=stale)
        assert emulator.ledger["redemptions"] == 2
        assert emulator.ledger["reuse"] == 0
        assert await manager.status("new-app") is Status.VALID
    finally:
        await manager.aclose()


async def test_a_grant_of_an_app_the_manager_lacks_is_refused_before_any_lock(
        emulator: Emulator):
    emulator.add_app("app-two", "secret-two")
    second = OAuthClient(oauth_config(str(emulator.base_url), client_id="app-two",
                                      client_secret=Secret("secret-two")))
    store = MemoryStore()
    manager = TokenManager(OAuthClient(oauth_config(str(emulator.base_url))), store,
                           RefreshPolicy())
    try:
        await manager.connect("acme", await code_grant(second, "acme"))
        stale = await manager.token("acme")
        with pytest.raises(ConfigurationError, match="app-two"):
            await manager.refresh("acme", stale=stale)
        state = await store.read("acme")
        assert state is not None
        assert state.record.status is Status.VALID  # nothing marked, nothing locked
        assert not state.locked
        assert emulator.ledger["redemptions"] == 0
    finally:
        await manager.aclose()
        await second.aclose()


async def test_login_hosts_must_pass_the_policy():
    # Salesforce's policy (https on its domains), not the emulator's loopback one.
    oauth = OAuthClient(oauth_config("https://login.salesforce.com",
                                     instance_policy=InstanceUrlPolicy()))
    try:
        assert oauth.for_host("https://test.salesforce.com").config.token_url == \
            "https://test.salesforce.com/services/oauth2/token"
        assert oauth.for_host("https://acme.my.salesforce.com/").config.login_url == \
            "https://acme.my.salesforce.com"
        assert oauth.for_host("https://login.salesforce.com") is oauth
        for bad in ("https://evil.example", "http://test.salesforce.com",
                    "https://test.salesforce.com.evil.example", "https://u:p@test.salesforce.com",
                    "https://test.salesforce.com/path", "not a url"):
            with pytest.raises(ConfigurationError, match="not allowed"):
                oauth.for_host(bad)
    finally:
        await oauth.aclose()


def test_records_written_before_hosts_were_recorded_still_read():
    record = TokenRecord(access_token=Secret("at"), refresh_token=Secret("rt"),
                         instance_url="https://x.my.salesforce.com", issued_at=1.0,
                         expires_at=2.0)
    data = record.to_dict()
    assert "token_host" not in data
    assert "client_id" not in data
    assert TokenRecord.from_dict(data) == record
    hosted = record.replace(token_host="https://test.salesforce.com", client_id="app")
    assert TokenRecord.from_dict(hosted.to_dict()) == hosted
