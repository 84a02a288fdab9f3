"""The client's API-limit manners, async with, version negotiation, Apex, graph, tree."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from sfrtr import Client, RequestLimitExceeded, RetryPolicy, ServerUnavailable, api_usage
from sfrtr.emulator import Emulator
from sfrtr.salesforce.limits import parse_limit_info, parse_retry_after
from tests.conftest import emulator_grant

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(emulator: Emulator, manager) -> Client:
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    return Client("acme", manager, retry=RetryPolicy(base=0.01))


async def test_limit_exceeded_is_typed_and_then_held_back_without_sending(
        emulator: Emulator, client: Client, manager):
    emulator.world.orgs["acme"].api_limit = 3
    await client.limits()
    await client.limits()
    assert client.limit_info is not None
    assert client.limit_info.remaining == 1
    await client.limits()
    with pytest.raises(RequestLimitExceeded) as info:
        await client.limits()
    assert info.value.limit_info is not None
    assert info.value.limit_info.remaining == 0
    refused = emulator.ledger["api_refused"]
    # 50 coroutines of two clients for the same org: none of them reaches the org
    other = Client("acme", manager)
    results = await asyncio.gather(*(c.query("SELECT Id FROM Account")
                                     for c in [client, other] * 25), return_exceptions=True)
    assert all(isinstance(r, RequestLimitExceeded) for r in results)
    assert "not sent" in str(results[0])
    assert emulator.ledger["api_refused"] == refused
    assert api_usage(manager)["acme"].remaining == 0


async def test_usage_is_shared_per_customer(emulator: Emulator, manager):
    for name in ("a", "b"):
        await manager.connect(name, emulator_grant(emulator, name))
    a1, a2, b = Client("a", manager), Client("a", manager), Client("b", manager)
    await a1.limits()
    await a1.limits()
    await b.limits()
    assert a2.limit_info is not None
    assert a2.limit_info.used == 2
    usage = api_usage(manager)
    assert (usage["a"].used, usage["b"].used) == (2, 1)
    assert usage["a"].remaining == emulator.api_limit - 2


def test_header_parsing():
    info = parse_limit_info("api-usage=14/15000, per-app-api-usage=2/100(appName=x)")
    assert info is not None
    assert (info.used, info.limit, info.remaining) == (14, 15000, 14986)
    assert parse_limit_info("") is None
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None


async def _stub(emulator: Emulator, manager, routes: list[web.RouteDef]) -> tuple[Client,
                                                                                web.AppRunner]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    record = await manager.connect("stub", emulator_grant(emulator, "stub"))
    await manager.store.put("stub", record.replace(instance_url=f"http://127.0.0.1:{port}"))
    return Client("stub", manager, retry=RetryPolicy(base=0.001)), runner


async def test_retry_after_is_honoured_for_reads_and_writes_are_not_retried(
        emulator: Emulator, manager):
    seen: list[tuple[str, float]] = []

    async def busy(request: web.Request) -> web.Response:
        seen.append((request.method, time.monotonic()))
        if len(seen) % 2:
            return web.json_response([{"message": "busy", "errorCode": "SERVER_UNAVAILABLE"}],
                                     status=503, headers={"Retry-After": "1"})
        return web.json_response({"ok": True})

    async def too_long(request: web.Request) -> web.Response:
        seen.append((request.method, time.monotonic()))
        return web.Response(status=429, headers={"Retry-After": "3600"})

    client, runner = await _stub(emulator, manager, [
        web.get("/services/data/v67.0/busy", busy), web.post("/services/data/v67.0/busy", busy),
        web.get("/services/data/v67.0/long", too_long)])
    try:
        assert (await client.request("GET", "busy")).body == {"ok": True}
        assert seen[1][1] - seen[0][1] >= 0.95  # waited as asked, not the 1 ms backoff
        seen.clear()
        with pytest.raises(ServerUnavailable) as info:
            await client.request("POST", "busy", json={})
        assert len(seen) == 1
        assert info.value.retry_after == 1.0
        seen.clear()
        with pytest.raises(ServerUnavailable) as info:
            await client.request("GET", "long")
        assert len(seen) == 1  # an hour-long Retry-After fails at once
        assert info.value.status == 429
    finally:
        await runner.cleanup()


async def test_async_with_version_negotiation_and_apex(emulator: Emulator, manager):
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    async with Client("acme", manager, api_version="auto", max_api_version="64.0") as client:
        await client.limits()
        assert client.api_version == "64.0"
        assert client.base_path == "/services/data/v64.0"
    async with Client("acme", manager, api_version="auto", max_api_version="99.0") as newest:
        await newest.limits()
        assert newest.api_version == "67.0"  # the emulator's newest
    with pytest.raises(ValueError, match="api_version"):
        Client("acme", manager, api_version="latest")
    with pytest.raises(ValueError, match="Apex REST path"):
        await newest.apex("GET", "https://evil.example/x")


async def test_composite_tree_and_graph(emulator: Emulator, manager):
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    client = Client("acme", manager)
    results = await client.composite_tree("Account", [
        {"attributes": {"type": "Account", "referenceId": "acc1"}, "Name": "Tree Co",
         "Contacts": {"records": [
             {"attributes": {"type": "Contact", "referenceId": "c1"}, "LastName": "Leaf"}]}}])
    assert [r["referenceId"] for r in results] == ["acc1", "c1"]
    contact = await client.get("Contact", results[1]["id"])
    assert contact["AccountId"] == results[0]["id"]
    v = client.base_path
    graphs = await client.composite_graph([
        {"graphId": "ok", "compositeRequest": [
            {"method": "POST", "url": f"{v}/sobjects/Account", "referenceId": "a",
             "body": {"Name": "G"}},
            {"method": "POST", "url": f"{v}/sobjects/Contact", "referenceId": "c",
             "body": {"LastName": "x", "AccountId": "@{a.id}"}}]},
        {"graphId": "bad", "compositeRequest": [
            {"method": "POST", "url": f"{v}/sobjects/Account", "referenceId": "a",
             "body": {"Name": "rolled back"}},
            {"method": "POST", "url": f"{v}/sobjects/Account", "referenceId": "b",
             "body": {"Nope__c": 1}}]}])
    assert [(g["graphId"], g["isSuccessful"]) for g in graphs] == [("ok", True), ("bad", False)]
    names = [r["Name"] for r in (await client.query("SELECT Name FROM Account")).records]
    assert sorted(names) == ["G", "Tree Co"]


async def test_one_version_lookup_per_instance_and_apex_rest(emulator: Emulator, manager):
    lookups: list[str] = []
    seen: list[tuple[str, str, object]] = []

    async def versions(request: web.Request) -> web.Response:
        lookups.append(request.headers.get("Authorization", ""))
        await asyncio.sleep(0.05)  # concurrent clients overlap the lookup
        return web.json_response([{"version": v, "url": f"/services/data/v{v}"}
                                  for v in ("58.0", "59.0", "60.0")])

    async def limits(request: web.Request) -> web.Response:
        seen.append(("limits", request.path, None))
        return web.json_response({})

    async def apex(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, await request.json()))
        return web.json_response({"echo": request.match_info["tail"]})

    _, runner = await _stub(emulator, manager, [
        web.get("/services/data/", versions), web.get("/services/data/v59.0/limits", limits),
        web.post("/services/apexrest/{tail:.*}", apex)])
    try:
        clients = [Client("stub", manager, api_version="auto", max_api_version="59.0")
                   for _ in range(20)]
        await asyncio.gather(*(c.limits() for c in clients))
        assert len(lookups) == 1  # twenty clients, one lookup
        assert lookups == [""]  # the version list is asked for without a token
        assert {c.api_version for c in clients} == {"59.0"}
        assert await clients[0].apex("POST", "Orders/v1", json={"n": 1}) == {
            "echo": "Orders/v1"}
        assert seen[-1] == ("POST", "/services/apexrest/Orders/v1", {"n": 1})
        assert len(lookups) == 1
    finally:
        await runner.cleanup()


def test_usage_is_kept_raw_and_parsed_when_read(monkeypatch):
    from sfrtr.salesforce import limits

    parsed: list[str] = []
    real = limits.parse_limit_info

    def counting(header: str | None) -> limits.LimitInfo | None:
        parsed.append(header or "")
        return real(header)

    monkeypatch.setattr(limits, "parse_limit_info", counting)
    usage = limits.ApiUsage()
    for n in range(1, 101):
        usage.note("acme", f"api-usage={n}/15000")
    usage.note("acme", "per-app-api-usage=2/100(appName=x)")  # no api-usage: not kept
    usage.note("acme", None)
    assert parsed == []  # a hundred answers, nothing parsed yet
    info = usage.get("acme")
    assert info is not None
    assert (info.used, info.remaining) == (100, 14900)
    assert usage.get("acme") is info
    assert len(parsed) == 1
    usage.note("acme", "api-usage=101/15000")
    usage.note("other", "api-usage=7/20")
    assert {c: i.used for c, i in usage.snapshot().items()} == {"acme": 101, "other": 7}
    usage.note("acme", "api-usage=x/15000")  # malformed: the last good value stays
    assert usage.get("acme") == limits.LimitInfo(101, 15000)


def test_held_back_ends_when_the_cooldown_does():
    from sfrtr.salesforce.limits import ApiUsage

    usage = ApiUsage()
    assert usage.held_back("acme") is None
    usage.exhausted("acme", time.monotonic() + 30)
    left = usage.held_back("acme")
    assert left is not None
    assert 29 < left <= 30
    usage.exhausted("acme", time.monotonic() - 1)
    assert usage.held_back("acme") is None
    assert usage.exhausted_until("acme") is None  # forgotten once over


def test_the_per_app_budget_is_not_the_orgs():
    assert parse_limit_info("per-app-api-usage=2/100(appName=x)") is None
    info = parse_limit_info("per-app-api-usage=2/100(appName=x), api-usage=14/15000")
    assert info is not None
    assert (info.used, info.limit) == (14, 15000)


async def test_headers_are_built_per_token_and_a_proxy_still_gets_its_credentials(
        emulator: Emulator):
    from sfrtr import MemoryStore, Secret, TokenManager
    from sfrtr.salesforce.client import _Prepared
    from tests.conftest import emulator_oauth

    seen: list[dict[str, str]] = []

    async def proxy(request: web.Request) -> web.Response:
        # a forward proxy sees the absolute URL; this one answers by itself
        seen.append(dict(request.headers))
        return web.json_response({"totalSize": 0, "done": True, "records": []},
                                 headers={"Sforce-Limit-Info": f"api-usage={len(seen)}/100"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    oauth = emulator_oauth(emulator, proxy=f"http://127.0.0.1:{port}",
                           proxy_auth=("egress", Secret("hunter2")))
    manager = TokenManager(oauth, MemoryStore())
    try:
        grant = emulator_grant(emulator, "acme")
        record = await manager.connect("acme", grant)
        # plain http, so the proxy's credentials go on the request itself
        await manager.store.put("acme", record.replace(instance_url="http://acme.example"))
        client = Client("acme", manager)
        await client.query("SELECT Id FROM Account")
        prepared = client._prepared
        assert isinstance(prepared, _Prepared)
        shared = dict(prepared.headers)
        await client.query("SELECT Id FROM Account")
        await client.request("GET", "limits", headers={"Accept": "text/csv", "X-Mine": "1"})
        await client.request("POST", "sobjects/Account", json={"Name": "x"})
        assert client._prepared is prepared  # built once for the token
        assert prepared.headers == shared  # and never changed by a call
        token = grant.access_token.reveal()
        assert token not in repr(prepared)
        assert token not in repr(client)
        for headers in seen:
            assert headers["Authorization"] == f"Bearer {token}"
            assert headers["Proxy-Authorization"].startswith("Basic ")
        assert [h["Accept"] for h in seen] == ["application/json"] * 2 + [
            "text/csv", "application/json"]
        assert seen[2]["X-Mine"] == "1"
        assert seen[3]["Content-Type"] == "application/json"
        assert client.limit_info is not None
        assert client.limit_info.used == 4
    finally:
        await manager.aclose()
        await runner.cleanup()


async def test_a_chunked_query_page_and_a_lowercase_retry_after(emulator: Emulator, manager):
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b'{"totalSize": 1, "done": true, ')
        await resp.write(b'"records": [{"Id": "001"}]}')
        await resp.write_eof()
        return resp

    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"retry-after": "3600"})

    client, runner = await _stub(emulator, manager, [
        web.get("/services/data/v67.0/query", chunked),
        web.get("/services/data/v67.0/busy", busy)])
    try:
        page = await client.query("SELECT Id FROM Account")
        assert page.records == [{"Id": "001"}]
        with pytest.raises(ServerUnavailable) as info:
            await client.request("GET", "busy")
        assert info.value.retry_after == 3600.0
    finally:
        await runner.cleanup()
