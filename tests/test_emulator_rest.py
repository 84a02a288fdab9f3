"""The emulator's REST API: queries, paging, sObjects, composite, errors, limits."""

from __future__ import annotations

import pytest

from sfrtr.emulator import Emulator
from tests.emulator_calls import api_call, api_get

pytestmark = pytest.mark.anyio

V = "/services/data/v67.0"


@pytest.fixture
def token(emulator: Emulator) -> str:
    return emulator.grant("acme")["access_token"]


async def test_versions_need_no_auth_and_carry_no_limit_header(emulator: Emulator, http):
    async with http.get(f"{emulator.base_url}/services/data/") as r:
        assert r.status == 200
        assert "Sforce-Limit-Info" not in r.headers
        versions = await r.json()
    assert versions[-1] == {"label": "Summer '26", "url": "/services/data/v67.0",
                            "version": "67.0"}
    assert versions[0]["version"] == "31.0"


async def test_paging_5000_records_yields_each_once_in_order(emulator: Emulator, http, token):
    ids = emulator.seed("acme", "Account", [{"Name": f"acct-{i:05d}"} for i in range(5000)])
    status, page, headers = await api_get(
        http, emulator, token, f"{V}/query", params={"q": "SELECT Id, Name FROM Account"},
        headers={"Sforce-Query-Options": "batchSize=1000"})
    assert status == 200
    assert headers["Sforce-Limit-Info"].startswith("api-usage=")
    seen = [r["Id"] for r in page["records"]]
    pages = 1
    while not page["done"]:
        assert page["totalSize"] == 5000
        status, page, _ = await api_get(http, emulator, token, page["nextRecordsUrl"])
        assert status == 200
        seen.extend(r["Id"] for r in page["records"])
        pages += 1
    assert "nextRecordsUrl" not in page
    assert pages == 5
    assert seen == ids
    assert page["records"][-1]["attributes"] == {
        "type": "Account", "url": f"{V}/sobjects/Account/{ids[-1]}"}


async def test_batch_size_is_clamped_to_salesforce_bounds(emulator: Emulator, http, token):
    emulator.seed("acme", "Account", [{"Name": str(i)} for i in range(450)])
    _, page, _ = await api_get(http, emulator, token, f"{V}/query",
                               params={"q": "SELECT Id FROM Account"},
                               headers={"Sforce-Query-Options": "batchSize=10"})
    assert len(page["records"]) == 200


async def test_where_order_limit_and_query_all(emulator: Emulator, http, token):
    ids = emulator.seed("acme", "Account", [
        {"Name": "b", "Industry": "Tech"}, {"Name": "a", "Industry": "Tech"},
        {"Name": "c", "Industry": "Retail"}])
    q = "SELECT Name FROM Account WHERE Industry = 'Tech' ORDER BY Name DESC LIMIT 5"
    _, page, _ = await api_get(http, emulator, token, f"{V}/query", params={"q": q})
    assert [r["Name"] for r in page["records"]] == ["b", "a"]
    assert set(page["records"][0]) == {"attributes", "Name"}
    status, _ = await api_call(http, emulator, token, "DELETE", f"{V}/sobjects/Account/{ids[0]}")
    assert status == 204
    _, live, _ = await api_get(http, emulator, token, f"{V}/query", params={"q": q})
    _, everything, _ = await api_get(http, emulator, token, f"{V}/queryAll", params={"q": q})
    assert [r["Name"] for r in live["records"]] == ["a"]
    assert [r["Name"] for r in everything["records"]] == ["b", "a"]


@pytest.mark.parametrize(("soql", "code"), [
    ("SELEKT Id FROM Account", "MALFORMED_QUERY"),
    ("SELECT Id FROM Account WHERE Name LIKE 'a%'", "MALFORMED_QUERY"),
    ("SELECT Id FROM Account GROUP BY Name", "MALFORMED_QUERY"),
    ("SELECT Nope FROM Account", "INVALID_FIELD"),
    ("SELECT Id FROM Nope__c", "INVALID_TYPE"),
])
async def test_bad_queries_get_salesforce_errors(emulator: Emulator, http, token, soql, code):
    status, body, _ = await api_get(http, emulator, token, f"{V}/query", params={"q": soql})
    assert status == 400
    assert body[0]["errorCode"] == code
    assert body[0]["message"]


async def test_bad_query_locator(emulator: Emulator, http, token):
    status, body, _ = await api_get(http, emulator, token, f"{V}/query/01gnope-2000")
    assert (status, body[0]["errorCode"]) == (400, "INVALID_QUERY_LOCATOR")


async def test_crud_round_trip(emulator: Emulator, http, token):
    status, created = await api_call(http, emulator, token, "POST", f"{V}/sobjects/Account",
                                     {"Name": "Acme", "Industry": "Tech"})
    assert status == 201
    assert created["success"] is True
    assert len(created["id"]) == 18
    rid = created["id"]
    status, got, _ = await api_get(http, emulator, token, f"{V}/sobjects/Account/{rid}",
                                   params={"fields": "Name"})
    assert (status, got["Name"], set(got)) == (200, "Acme", {"attributes", "Name"})
    assert await api_call(http, emulator, token, "PATCH", f"{V}/sobjects/Account/{rid}",
                          {"Name": "Acme 2"}) == (204, None)
    _, got, _ = await api_get(http, emulator, token, f"{V}/sobjects/Account/{rid}")
    assert got["Name"] == "Acme 2"
    assert got["Industry"] == "Tech"
    assert await api_call(http, emulator, token, "DELETE", f"{V}/sobjects/Account/{rid}") == (
        204, None)
    status, body, _ = await api_get(http, emulator, token, f"{V}/sobjects/Account/{rid}")
    assert (status, body[0]["errorCode"]) == (404, "NOT_FOUND")


async def test_create_errors(emulator: Emulator, http, token):
    status, body = await api_call(http, emulator, token, "POST", f"{V}/sobjects/Account",
                                  {"Id": "001x", "Name": "n"})
    assert (status, body[0]["errorCode"]) == (400, "INVALID_FIELD")
    status, body = await api_call(http, emulator, token, "POST", f"{V}/sobjects/Account",
                                  {"Bogus__c": 1})
    assert (status, body[0]["errorCode"], body[0]["fields"]) == (400, "INVALID_FIELD",
                                                                 ["Bogus__c"])
    status, body = await api_call(http, emulator, token, "POST", f"{V}/sobjects/Account",
                                  ["not", "an", "object"])
    assert (status, body[0]["errorCode"]) == (400, "JSON_PARSER_ERROR")
    async with http.post(f"{emulator.base_url}{V}/sobjects/Account", data=b"{not json",
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert (await r.json())[0]["errorCode"] == "JSON_PARSER_ERROR"


async def test_upsert_reports_created_then_updated(emulator: Emulator, http, token):
    path = f"{V}/sobjects/Account/External_Id__c/ext-1"
    status, body = await api_call(http, emulator, token, "PATCH", path, {"Name": "one"})
    assert status == 201
    assert body["created"] is True
    status, again = await api_call(http, emulator, token, "PATCH", path, {"Name": "two"})
    assert status == 200
    assert again == {"id": body["id"], "success": True, "errors": [],
                                       "created": False}
    _, got, _ = await api_get(http, emulator, token, path)
    assert got["Name"] == "two"
    status, _ = await api_call(http, emulator, token, "PATCH",
                               "/services/data/v45.0/sobjects/Account/External_Id__c/ext-1",
                               {"Name": "three"})
    assert status == 204


async def test_describe_describe_global_and_limits(emulator: Emulator, http, token):
    _, desc, _ = await api_get(http, emulator, token, f"{V}/sobjects/Account/describe")
    assert desc["name"] == "Account"
    assert desc["keyPrefix"] == "001"
    assert "Name" in [f["name"] for f in desc["fields"]]
    _, glob, _ = await api_get(http, emulator, token, f"{V}/sobjects")
    assert {"Account", "Contact"} <= {s["name"] for s in glob["sobjects"]}
    _, limits, headers = await api_get(http, emulator, token, f"{V}/limits")
    used, total = headers["Sforce-Limit-Info"].removeprefix("api-usage=").split("/")
    assert limits["DailyApiRequests"] == {"Max": int(total), "Remaining": int(total) - int(used)}


async def test_composite_references_and_all_or_none_rollback(emulator: Emulator, http, token):
    ok = {"allOrNone": True, "compositeRequest": [
        {"method": "POST", "url": f"{V}/sobjects/Account", "referenceId": "acct",
         "body": {"Name": "Parent"}},
        {"method": "POST", "url": f"{V}/sobjects/Contact", "referenceId": "ct",
         "body": {"LastName": "Kid", "AccountId": "@{acct.id}"}},
        {"method": "GET", "url": f"{V}/sobjects/Contact/@{{ct.id}}", "referenceId": "read"},
    ]}
    status, body = await api_call(http, emulator, token, "POST", f"{V}/composite", ok)
    assert status == 200
    results = body["compositeResponse"]
    assert [r["httpStatusCode"] for r in results] == [201, 201, 200]
    assert results[2]["body"]["AccountId"] == results[0]["body"]["id"]

    bad = {"allOrNone": True, "compositeRequest": [
        {"method": "POST", "url": f"{V}/sobjects/Account", "referenceId": "a1",
         "body": {"Name": "Rolled back"}},
        {"method": "POST", "url": f"{V}/sobjects/Account", "referenceId": "a2",
         "body": {"Nope__c": "x"}},
    ]}
    status, body = await api_call(http, emulator, token, "POST", f"{V}/composite", bad)
    results = body["compositeResponse"]
    assert [r["httpStatusCode"] for r in results] == [400, 400]
    assert results[0]["body"][0]["errorCode"] == "PROCESSING_HALTED"
    assert results[1]["body"][0]["errorCode"] == "INVALID_FIELD"
    _, page, _ = await api_get(http, emulator, token, f"{V}/query",
                               params={"q": "SELECT Name FROM Account"})
    assert [r["Name"] for r in page["records"]] == ["Parent"]

    partial = {**bad, "allOrNone": False}
    _, body = await api_call(http, emulator, token, "POST", f"{V}/composite", partial)
    assert [r["httpStatusCode"] for r in body["compositeResponse"]] == [201, 400]


async def test_invalid_session_and_request_limit(http):
    em = Emulator(api_limit=2)
    async with em.serve():
        token = em.grant("acme")["access_token"]
        status, body, _ = await api_get(http, em, "bogus", f"{V}/limits")
        assert status == 401
        assert body == [{"message": "Session expired or invalid",
                         "errorCode": "INVALID_SESSION_ID"}]
        for _ in range(2):
            assert (await api_get(http, em, token, f"{V}/limits"))[0] == 200
        status, body, headers = await api_get(http, em, token, f"{V}/limits")
        assert (status, body[0]["errorCode"]) == (403, "REQUEST_LIMIT_EXCEEDED")
        assert headers["Sforce-Limit-Info"] == "api-usage=2/2"
        assert em.ledger["api_served"] == 2
        assert em.ledger["api_refused"] == 2


async def test_retired_and_unknown_versions(emulator: Emulator, http, token):
    assert (await api_get(http, emulator, token, "/services/data/v30.0/limits"))[0] == 410
    assert (await api_get(http, emulator, token, "/services/data/v99.0/limits"))[0] == 404
    assert (await api_get(http, emulator, token, "/services/data/banana/limits"))[0] == 404
