"""sObject Collections over the emulator: chunking, order, allOrNone, every verb."""

from __future__ import annotations

import pytest

from sfrtr import Client, RecordResult, RetryPolicy
from sfrtr.emulator import Emulator
from tests.conftest import emulator_grant

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(emulator: Emulator, manager) -> Client:
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    return Client("acme", manager, retry=RetryPolicy(base=0.01))


async def test_create_450_records_in_three_calls_results_in_input_order(
        emulator: Emulator, client: Client):
    before = emulator.world.orgs["acme"].api_used
    rows = [{"Name": f"n{i:03d}"} for i in range(450)]
    rows[201] = {"Name": "bad", "Bogus__c": 1}  # fails alone: allOrNone is off
    results = await client.collections.create("Account", rows)
    assert emulator.world.orgs["acme"].api_used - before == 3  # 200 + 200 + 50
    assert len(results) == 450
    assert [r.success for r in results].count(False) == 1
    assert not results[201].success
    assert results[201].errors[0].status_code == "INVALID_FIELD"
    assert results[201].errors[0].fields == ("Bogus__c",)
    got = await client.collections.get("Account", [r.id for r in results[:3]], ["Name"])
    assert [g["Name"] for g in got if g] == ["n000", "n001", "n002"]
    # every created Id belongs to the row at the same position
    for i in (0, 199, 200, 202, 449):
        assert (await client.get("Account", results[i].id))["Name"] == f"n{i:03d}"


async def test_all_or_none_rolls_back_the_chunk_and_says_so(emulator: Emulator,
                                                            client: Client):
    results = await client.collections.create(
        "Account", [{"Name": "a"}, {"Name": "b", "Nope__c": 1}, {"Name": "c"}],
        all_or_none=True)
    assert [r.success for r in results] == [False, False, False]
    assert results[0].errors[0].status_code == "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    assert results[1].errors[0].status_code == "INVALID_FIELD"
    assert (await client.query("SELECT Id FROM Account")).total_size == 0


async def test_update_upsert_delete_and_get_with_missing_ids(client: Client):
    created = await client.collections.create("Account", [{"Name": f"x{i}"} for i in range(5)])
    ids = [r.id for r in created]
    updated = await client.collections.update(
        "Account", [{"Id": i, "Industry": "Tech"} for i in ids])
    assert all(r.success for r in updated)
    upserted = await client.collections.upsert(
        "Account", "External_Id__c",
        [{"External_Id__c": "e1", "Name": "one"}, {"External_Id__c": "e2", "Name": "two"}])
    assert [r.created for r in upserted] == [True, True]
    again = await client.collections.upsert(
        "Account", "External_Id__c", [{"External_Id__c": "e1", "Name": "uno"},
                                      {"Name": "no key"}])
    assert again[0] == RecordResult(upserted[0].id, True, (), False)
    assert not again[1].success
    deleted = await client.collections.delete([ids[0], ids[1], "001" + "0" * 15])
    assert [r.success for r in deleted] == [True, True, False]
    got = await client.collections.get("Account", [ids[0], ids[2], upserted[0].id],
                                       ["Name", "Industry"])
    assert got[0] is None
    assert got[1] is not None
    assert got[1]["Industry"] == "Tech"
    assert got[2] is not None
    assert got[2]["Name"] == "uno"


async def test_get_of_many_ids_goes_as_a_body_and_keeps_order(client: Client):
    created = await client.collections.create("Account", [{"Name": f"g{i}"} for i in range(120)])
    ids = [r.id for r in reversed(created)]
    got = await client.collections.get("Account", ids, ["Name"])
    assert [g["Name"] for g in got if g] == [f"g{i}" for i in reversed(range(120))]


async def test_bad_arguments_fail_before_any_call(emulator: Emulator, client: Client):
    before = emulator.world.orgs["acme"].api_used
    with pytest.raises(ValueError, match="chunk_size"):
        await client.collections.create("Account", [{"Name": "x"}], chunk_size=201)
    with pytest.raises(ValueError, match="Id"):
        await client.collections.update("Account", [{"Name": "x"}])
    with pytest.raises(ValueError, match="invalid sObject"):
        await client.collections.create("Account/../x", [{"Name": "x"}])
    assert emulator.world.orgs["acme"].api_used == before


async def test_the_emulator_refuses_more_than_200(client: Client):
    from sfrtr import SalesforceError

    with pytest.raises(SalesforceError) as info:
        await client.request("POST", "composite/sobjects", json={
            "records": [{"attributes": {"type": "Account"}, "Name": "x"}] * 201})
    assert info.value.error_code == "EXCEEDED_ID_LIMIT"
