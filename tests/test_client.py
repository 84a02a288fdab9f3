"""``sfrtr.Client`` against the emulator: paging, expiry mid-flight, CRUD, errors."""

from __future__ import annotations

import asyncio

import pytest

from sfrtr import (
    Client,
    InvalidField,
    InvalidResponse,
    MalformedQuery,
    NotFound,
    ReauthorizationRequired,
    RequestLimitExceeded,
    RetryPolicy,
    ServerUnavailable,
    SessionRefused,
)
from sfrtr.emulator import Emulator
from tests.conftest import emulator_grant

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(emulator: Emulator, manager) -> Client:
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    return Client("acme", manager, retry=RetryPolicy(base=0.01))


async def test_paging_ten_thousand_records_in_order(emulator: Emulator, client: Client):
    ids = emulator.seed("acme", "Account", [{"Name": f"a{i:05d}"} for i in range(10_000)])
    seen = [r["Id"] async for r in client.iter_query("SELECT Id FROM Account", batch_size=2000)]
    assert seen == ids
    assert client.limit_info is not None
    assert client.limit_info.used == 5  # five pages, one call each


async def test_session_expiring_between_pages_goes_unnoticed(emulator: Emulator,
                                                             client: Client):
    emulator.seed("acme", "Account", [{"Name": f"a{i:05d}"} for i in range(10_000)])
    seen = 0
    pages = client.iter_query("SELECT Id FROM Account", batch_size=2000)
    async for _ in pages:
        seen += 1
        if seen == 4001:  # first record of page 3 is out; page 3 was fetched already
            emulator.expire_sessions("acme")
    assert seen == 10_000
    assert emulator.ledger["redemptions"] == 1
    assert emulator.ledger["reuse"] == 0


async def test_query_query_all_and_more(emulator: Emulator, client: Client):
    ids = emulator.seed("acme", "Account", [{"Name": "x"}, {"Name": "y"}])
    await client.delete("Account", ids[0])
    live = await client.query("SELECT Name FROM Account")
    everything = await client.query_all("SELECT Name FROM Account")
    assert (live.total_size, everything.total_size) == (1, 2)
    assert live.done
    assert live.next_records_url is None


async def test_crud_round_trip(client: Client):
    rid = await client.create("Account", {"Name": "Acme", "Industry": "Tech"})
    assert (await client.get("Account", rid, fields=["Name"]))["Name"] == "Acme"
    await client.update("Account", rid, {"Name": "Acme 2"})
    assert (await client.get("Account", rid))["Name"] == "Acme 2"
    await client.delete("Account", rid)
    with pytest.raises(NotFound):
        await client.get("Account", rid)


async def test_upsert_created_then_updated_and_get_by_external_id(client: Client):
    first = await client.upsert("Account", "External_Id__c", "ext-1", {"Name": "one"})
    again = await client.upsert("Account", "External_Id__c", "ext-1", {"Name": "two"})
    assert first.created
    assert not again.created
    assert again.id == first.id
    got = await client.get_by_external_id("Account", "External_Id__c", "ext-1", ["Name"])
    assert got["Name"] == "two"


async def test_composite_all_or_none_rolls_back(client: Client):
    v = client.base_path
    results = await client.composite([
        {"method": "POST", "url": f"{v}/sobjects/Account", "referenceId": "a",
         "body": {"Name": "kept?"}},
        {"method": "POST", "url": f"{v}/sobjects/Contact", "referenceId": "c",
         "body": {"LastName": "x", "AccountId": "@{a.id}", "Bogus__c": 1}},
    ], all_or_none=True)
    assert [r["httpStatusCode"] for r in results] == [400, 400]
    assert (await client.query("SELECT Id FROM Account")).total_size == 0


async def test_describe_describe_global_limits_search(emulator: Emulator, client: Client):
    assert (await client.describe("Account"))["name"] == "Account"
    assert "Contact" in {s["name"] for s in (await client.describe_global())["sobjects"]}
    limits = await client.limits()
    assert limits["DailyApiRequests"]["Max"] == client.limit_info.limit
    emulator.seed("acme", "Account", [{"Name": "Blue Widget"}, {"Name": "Red"}])
    hits = await client.search("FIND {widget} IN ALL FIELDS RETURNING Account(Name)")
    assert [h["Name"] for h in hits] == ["Blue Widget"]


@pytest.mark.parametrize(("call", "error"), [
    (lambda c: c.query("SELEKT Id FROM Account"), MalformedQuery),
    (lambda c: c.query("SELECT Nope FROM Account"), InvalidField),
    (lambda c: c.get("Account", "001000000000000AAA"), NotFound),
    (lambda c: c.create("Account", {"Nope__c": 1}), InvalidField),
])
async def test_error_codes_map_to_exceptions(client: Client, call, error):
    with pytest.raises(error) as info:
        await call(client)
    assert info.value.status in (400, 404)
    assert info.value.error_code


async def test_request_limit_exceeded(emulator: Emulator, client: Client):
    emulator.world.orgs["acme"].api_limit = 1
    await client.limits()
    with pytest.raises(RequestLimitExceeded):
        await client.limits()


async def test_server_unavailable_is_retried_for_reads_only(emulator: Emulator,
                                                             client: Client):
    emulator.faults.set("api", reset_before=2)  # two dropped connections, then fine
    assert await client.limits()
    emulator.faults.set("api", error_rate=1.0)
    with pytest.raises(ServerUnavailable):
        await client.limits()
    served = emulator.ledger["api_refused"]
    with pytest.raises(ServerUnavailable):
        await client.create("Account", {"Name": "once"})
    assert emulator.ledger["api_refused"] == served + 1  # a POST is never retried


async def test_a_dead_grant_surfaces_as_reauthorization(emulator: Emulator, client: Client):
    await client.limits()
    family = next(iter(emulator.world.families.values()))
    emulator.world.revoke_family(family)  # every token dies, the refresh is refused
    with pytest.raises(ReauthorizationRequired) as info:
        await client.limits()
    assert "Bearer" not in str(info.value)
    assert emulator.ledger["redemptions"] == 0


async def test_paths_must_be_paths(client: Client):
    with pytest.raises(ValueError, match="not a URL"):
        await client.request("GET", "https://evil.example/services/data/")
    with pytest.raises(ValueError, match="invalid sObject name"):
        await client.get("Account; DROP", "x")


async def test_five_hundred_concurrent_queries_across_fifty_customers(emulator: Emulator,
                                                                      manager):
    customers = [f"c{i}" for i in range(50)]
    for c in customers:
        await manager.connect(c, emulator_grant(emulator, c))
        emulator.seed(c, "Account", [{"Name": c}])
    clients = [Client(c, manager) for c in customers]
    emulator.faults.set("token", latency=0.02)
    expiries = 0
    for _ in range(3):
        results = await asyncio.gather(*(clients[i % 50].query("SELECT Name FROM Account")
                                         for i in range(500)))
        assert all(r.records[0]["Name"] == customers[i % 50] for i, r in enumerate(results))
        emulator.expire_sessions()
        expiries += 1
    results = await asyncio.gather(*(clients[i % 50].query("SELECT Name FROM Account")
                                     for i in range(500)))
    assert len(results) == 500
    assert emulator.ledger["redemptions"] == expiries * 50
    assert emulator.ledger["reuse"] == 0


async def test_bad_bodies_and_redirects_are_clear_errors(emulator: Emulator, manager):
    from aiohttp import web

    seen_auth: list[str | None] = []

    async def html(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>Bad gateway</html>",
                            content_type="text/html")

    async def truncated(request: web.Request) -> web.Response:
        return web.Response(status=200, body=b'{"totalSize": 1, "done": tr',
                            content_type="application/json")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.1:9/steal")

    async def always_401(request: web.Request) -> web.Response:
        return web.json_response([{"message": "Session expired or invalid",
                                   "errorCode": "INVALID_SESSION_ID"}], status=401)

    async def wrong_shape(request: web.Request) -> web.Response:
        seen_auth.append(request.headers.get("Authorization"))
        return web.json_response({"records": "nope"})

    app = web.Application()
    app.router.add_get("/services/data/v67.0/html", html)
    app.router.add_get("/services/data/v67.0/truncated", truncated)
    app.router.add_get("/services/data/v67.0/redirect", redirect)
    app.router.add_get("/services/data/v67.0/query", wrong_shape)
    app.router.add_get("/services/data/v67.0/always401", always_401)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    grant = emulator_grant(emulator, "proxyco")
    record = await manager.connect("proxyco", grant)
    await manager.store.put("proxyco", record.replace(instance_url=f"http://127.0.0.1:{port}"))
    client = Client("proxyco", manager)
    try:
        with pytest.raises(InvalidResponse) as info:
            await client.request("GET", "html")
        assert info.value.status == 502
        with pytest.raises(InvalidResponse, match="not JSON"):
            await client.request("GET", "truncated")
        with pytest.raises(InvalidResponse, match="redirect"):
            await client.request("GET", "redirect")
        with pytest.raises(InvalidResponse, match="not a query result"):
            await client.query("SELECT Id FROM Account")
        assert seen_auth == [f"Bearer {grant.access_token.reveal()}"]
        emulator.instance_url = f"http://127.0.0.1:{port}"  # refreshed grants point here too
        # A refreshed session refused again: no refresh cures it (issue 10, item 10).
        with pytest.raises(SessionRefused, match="INVALID_SESSION_ID") as refused:
            await client.request("GET", "always401")
        assert emulator.ledger["redemptions"] == 1  # one refresh, one retry, then the error
        assert grant.access_token.reveal() not in str(refused.value)
        with pytest.raises(SessionRefused):
            await client.request("GET", "always401")
        assert emulator.ledger["redemptions"] == 1  # and no more while the backoff lasts
    finally:
        await runner.cleanup()


async def test_an_answer_cut_off_mid_body_is_a_transport_fault(emulator: Emulator, manager,
                                                                serve_app):
    """The connection drops after the head and part of the body: a read is retried like
    any transport fault, a write is not (it may have been done) and says so with
    :class:`ServerUnavailable`, never a raw aiohttp exception."""
    from aiohttp import web

    calls: list[str] = []

    async def cut_once(request: web.Request) -> web.StreamResponse:
        calls.append(request.method)
        body = b'{"totalSize": 0, "done": true, "records": []}'
        if len(calls) > 1 and request.method == "GET":
            return web.Response(body=body, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json",
                                           "Content-Length": str(len(body))})
        await resp.prepare(request)
        await resp.write(body[:10])
        assert request.transport is not None
        request.transport.close()  # the rest never comes
        return resp

    app = web.Application()
    app.router.add_get("/services/data/v67.0/query", cut_once)
    app.router.add_post("/services/data/v67.0/sobjects/Account", cut_once)
    record = await manager.connect("cutco", emulator_grant(emulator, "cutco"))
    await manager.store.put("cutco", record.replace(instance_url=await serve_app(app)))
    client = Client("cutco", manager, retry=RetryPolicy(base=0.01))
    page = await client.query("SELECT Id FROM Account")
    assert (page.total_size, page.done) == (0, True)
    assert calls == ["GET", "GET"]  # cut once, retried once
    with pytest.raises(ServerUnavailable) as info:
        await client.create("Account", {"Name": "x"})
    assert info.value.error_code == "CONNECTION_ERROR"
    assert calls == ["GET", "GET", "POST"]  # a write is never sent twice
