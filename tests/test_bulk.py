"""Bulk API 2.0 over real sockets against the emulator: ingest, results, query, failures."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sfrtr import Client, MalformedQuery, RetryPolicy, SalesforceError
from sfrtr.emulator import Emulator
from sfrtr.salesforce.bulk import BulkJobFailed, JobInfo, WaitPolicy
from tests.conftest import emulator_grant

pytestmark = pytest.mark.anyio

FAST = WaitPolicy(first=0.01, cap=0.05, timeout=30)

TRICKY = [
    "plain",
    'with "quotes", and commas',
    "line\nbreak",
    "crlf\r\ninside",
    "trailing backslash \\",
    "unicode é 中文 🎉",
    " leading and trailing spaces ",
    "#N/A as part of a text",
]


@pytest.fixture
async def client(emulator: Emulator, manager) -> Client:
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    return Client("acme", manager, retry=RetryPolicy(base=0.01))


async def _rows(n: int, prefix: str = "r") -> AsyncIterator[dict[str, Any]]:
    for i in range(n):
        yield {"Name": f"{prefix}{i:05d}", "External_Id__c": f"{prefix}-{i}"}


async def test_insert_from_async_rows_with_tricky_values(client: Client):
    rows = [{"Name": text, "Industry": None if i % 2 else "Tech",
             "AccountNumber": str(i)} for i, text in enumerate(TRICKY)]

    async def source() -> AsyncIterator[dict[str, Any]]:
        for row in rows:
            yield row

    result = await client.bulk.insert("Account", source(), poll=FAST)
    assert len(result.jobs) == 1
    assert result.records_processed == len(rows)
    assert result.records_failed == 0
    saved = [r async for r in result.successful()]
    assert [r["Name"] for r in saved] == TRICKY
    assert all(r["sf__Created"] == "true" for r in saved)
    for row, out in zip(rows, saved, strict=True):
        record = await client.get("Account", out["sf__Id"])
        assert record["Name"] == row["Name"]
        assert record["Industry"] == row["Industry"]  # None went as #N/A: a real null
    assert [r async for r in result.failed()] == []
    assert [r async for r in result.unprocessed()] == []


async def test_values_are_rendered_for_bulk(client: Client, emulator: Emulator):
    emulator.ensure_customer("acme").data.define("Event__c", ["When__c", "Day__c", "Flag__c",
                                                             "N__c"])
    result = await client.bulk.insert("Event__c", [
        {"When__c": dt.datetime(2024, 5, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
         "Day__c": dt.date(2024, 2, 29), "Flag__c": True, "N__c": 1.5}], poll=FAST)
    [saved] = [r async for r in result.successful()]
    got = await client.get("Event__c", saved["sf__Id"])
    assert (got["When__c"], got["Day__c"], got["Flag__c"], got["N__c"]) == \
        ("2024-05-01T12:00:00.000Z", "2024-02-29", "true", "1.5")
    with pytest.raises(ValueError, match="null"):  # it would be loaded as null, silently
        await client.bulk.insert("Account", [{"Name": "#N/A"}])
    with pytest.raises(ValueError, match="not in the header"):
        await client.bulk.insert("Account", [{"Name": "a"}, {"Name": "b", "Other": 1}])


async def test_uploads_are_split_within_the_size_limit(client: Client, emulator: Emulator):
    limit = 2000
    emulator.bulk.max_upload_base64 = limit  # the emulator refuses anything larger
    result = await client.bulk.insert("Account", _rows(300), max_upload_base64=limit,
                                      poll=FAST)
    assert len(result.jobs) >= 3
    assert result.records_processed == 300
    names = [r["Name"] async for r in result.successful()]
    assert names == [f"r{i:05d}" for i in range(300)]  # input order across jobs
    jobs = emulator.bulk.ingest
    assert all(job.state == "JobComplete" for job in jobs.values())
    assert sum(job.processed for job in jobs.values()) == 300
    assert (await client.query("SELECT Id FROM Account")).total_size == 300
    with pytest.raises(ValueError, match="larger than"):
        await client.bulk.insert("Account", [{"Name": "x" * 2000}], max_upload_base64=limit)


async def test_an_oversized_upload_is_refused_and_its_job_aborted(client: Client,
                                                                 emulator: Emulator):
    emulator.bulk.max_upload_base64 = 1000
    with pytest.raises(SalesforceError, match="exceeds"):
        await client.bulk.insert("Account", _rows(100), poll=FAST)
    [job] = emulator.bulk.ingest.values()
    assert job.state == "Aborted"


async def test_failed_rows_come_back_with_their_errors(client: Client, emulator: Emulator):
    ids = emulator.seed("acme", "Account", [{"Name": "a"}, {"Name": "b"}])
    await client.delete("Account", ids[1])
    data = (f"Id,Name\n{ids[0]},renamed\n{ids[1]},gone\n001000000000000ZZZ,nobody\n"
            ).encode()
    result = await client.bulk.update("Account", data, poll=FAST)
    assert (result.records_processed, result.records_failed) == (3, 2)
    ok = [r async for r in result.successful()]
    assert [(r["sf__Id"], r["sf__Created"], r["Name"]) for r in ok] == \
        [(ids[0], "false", "renamed")]
    failed = [r async for r in result.failed()]
    assert [r["Name"] for r in failed] == ["gone", "nobody"]
    assert all(r["sf__Error"].startswith("NOT_FOUND:") for r in failed)
    assert (await client.get("Account", ids[0]))["Name"] == "renamed"


async def test_upsert_delete_and_hard_delete(client: Client, emulator: Emulator):
    first = await client.bulk.upsert("Account", "External_Id__c", _rows(5), poll=FAST)
    assert [r["sf__Created"] async for r in first.successful()] == ["true"] * 5
    again = await client.bulk.upsert("Account", "External_Id__c",
                                     [{"External_Id__c": "r-0", "Name": "zero"},
                                      {"External_Id__c": "new", "Name": "new"}], poll=FAST)
    assert [r["sf__Created"] async for r in again.successful()] == ["false", "true"]
    ids = [r["sf__Id"] async for r in first.successful()]
    await client.bulk.delete("Account", [{"Id": i} for i in ids[:2]], poll=FAST)
    await client.bulk.hard_delete("Account", [{"Id": ids[2]}], poll=FAST)
    rows = emulator.world.orgs["acme"].data.sobject("Account").rows
    assert rows[ids[0]]["IsDeleted"]
    assert ids[2] not in rows
    everything = await client.query_all("SELECT Id FROM Account")
    assert everything.total_size == 5  # 6 upserted, one hard-deleted
    with pytest.raises(ValueError, match="external_id_field"):
        await client.bulk.ingest("Account", "upsert", _rows(1))


async def test_csv_file_with_crlf_and_a_mismatched_line_ending(client: Client,
                                                               tmp_path: Path):
    path = tmp_path / "accounts.csv"
    path.write_bytes(b'Name,Industry\r\n"multi\r\nline",Tech\r\nplain,#N/A\r\n')
    result = await client.bulk.insert("Account", path, line_ending="CRLF", poll=FAST)
    assert [r["Name"] async for r in result.successful()] == ["multi\r\nline", "plain"]
    with pytest.raises(ValueError, match="CRLF"):
        await client.bulk.insert("Account", path, poll=FAST)
    # the same mistake made by hand reaches the server, which fails the whole job
    job = await client.bulk.create_ingest_job("Account", "insert", line_ending="LF")
    await client.bulk.upload(job.id, path.read_bytes())
    await client.bulk.close(job.id)
    with pytest.raises(BulkJobFailed, match="LineEnding") as info:
        await client.bulk.wait(job.id, poll=FAST)
    assert info.value.job.state == "Failed"
    unprocessed = [r async for r in client.bulk.results(job.id, "unprocessedrecords")]
    assert [r["Name"] for r in unprocessed] == ["multi\r\nline", "plain"]


async def test_unknown_column_fails_the_job_and_leaves_rows_unprocessed(client: Client):
    with pytest.raises(BulkJobFailed, match="Bogus__c") as info:
        await client.bulk.insert("Account", [{"Name": "a", "Bogus__c": "x"}], poll=FAST)
    assert info.value.job.records_processed == 0
    assert info.value.result is not None
    assert [r async for r in info.value.result.unprocessed()] == [{"Name": "a",
                                                                   "Bogus__c": "x"}]


async def test_one_failed_job_of_several_keeps_the_others_results(client: Client,
                                                                  emulator: Emulator):
    emulator.ensure_customer("acme")
    rows = [{"Name": f"n{i:03d}", "Industry": "x"} for i in range(60)]
    job_sizes: list[int] = []
    real_create = client.bulk.create_ingest_job

    async def second_job_with_a_bad_line_ending(*args, **kwargs):  # one job misconfigured
        job_sizes.append(len(job_sizes))
        if len(job_sizes) == 2:
            kwargs["line_ending"] = "CRLF"
        return await real_create(*args, **kwargs)

    client.bulk.create_ingest_job = second_job_with_a_bad_line_ending  # type: ignore[method-assign]
    with pytest.raises(BulkJobFailed, match="LineEnding") as info:
        await client.bulk.insert("Account", rows, max_upload_base64=200, poll=FAST)
    result = info.value.result
    assert result is not None
    assert len(result.jobs) >= 3
    assert [j.state for j in result.jobs].count("Failed") == 1
    saved = [r["Name"] async for r in result.successful()]
    left = [r["Name"] async for r in result.unprocessed()]
    assert sorted(saved + left) == [r["Name"] for r in rows]
    assert left  # the failed job's rows, readable for a retry


async def test_progress_backoff_and_abort_mid_job(client: Client, emulator: Emulator):
    emulator.bulk.slice_rows = 20
    emulator.bulk.slice_pause = 0.05
    seen: list[JobInfo] = []
    result = await client.bulk.insert("Account", _rows(400), wait=False)
    [job] = result.jobs
    assert job.state == "UploadComplete"

    async def watch(info: JobInfo) -> None:
        seen.append(info)
        if info.records_processed >= 100 and info.state == "InProgress":
            await client.bulk.abort(info.id)

    with pytest.raises(BulkJobFailed, match="Aborted"):
        await client.bulk.wait(job.id, poll=WaitPolicy(first=0.01, cap=0.04),
                               on_progress=watch)
    counts = [s.records_processed for s in seen]
    assert counts == sorted(counts)
    assert len(seen) >= 3
    done = [r async for r in client.bulk.results(job.id, "successfulResults")]
    left = [r async for r in client.bulk.results(job.id, "unprocessedrecords")]
    assert 100 <= len(done) < 400
    assert len(done) + len(left) == 400
    assert [r["Name"] for r in done + left] == [f"r{i:05d}" for i in range(400)]


async def test_a_second_upload_makes_the_job_unclosable(client: Client):
    job = await client.bulk.create_ingest_job("Account", "insert")
    await client.bulk.upload(job.id, b"Name\na\n")
    await client.bulk.upload(job.id, b"Name\nb\n")
    with pytest.raises(SalesforceError, match="multiple contents"):
        await client.bulk.close(job.id)
    await client.bulk.abort(job.id)
    await client.bulk.delete_job(job.id)
    with pytest.raises(SalesforceError):
        await client.bulk.job(job.id)


async def test_query_pages_with_locators_rows_and_file(client: Client, emulator: Emulator,
                                                       tmp_path: Path):
    ids = emulator.seed("acme", "Account", [{"Name": f"n{i:04d}", "Industry": 'a"b,c'}
                                            for i in range(2500)])
    await client.delete("Account", ids[0])
    job = await client.bulk.query("SELECT Id, Name, Industry, External_Id__c FROM Account",
                                  poll=FAST)
    assert job.job.state == "JobComplete"
    before = emulator.world.orgs["acme"].api_used
    rows = [r async for r in job.rows(max_records=1000)]
    assert emulator.world.orgs["acme"].api_used - before == 3  # three pages
    assert [r["Id"] for r in rows] == ids[1:]
    assert rows[0] == {"Id": ids[1], "Name": "n0001", "Industry": 'a"b,c',
                       "External_Id__c": ""}
    count = await job.to_file(tmp_path / "out.csv", max_records=700)
    lines = (tmp_path / "out.csv").read_bytes().splitlines()
    assert count == 2499
    assert len(lines) == 2500
    assert lines[0] == b'"Id","Name","Industry","External_Id__c"'
    everything = await client.bulk.query("SELECT Id FROM Account", include_deleted=True,
                                         poll=FAST)
    assert [r["Id"] async for r in everything.rows()] == ids
    with pytest.raises(MalformedQuery):
        await client.bulk.query("SELEKT Id FROM Account", poll=FAST)


async def test_session_expiring_between_result_pages_goes_unnoticed(client: Client,
                                                                    emulator: Emulator):
    emulator.seed("acme", "Account", [{"Name": f"n{i}"} for i in range(300)])
    job = await client.bulk.query("SELECT Name FROM Account", poll=FAST)
    seen = 0
    async for _ in job.rows(max_records=100):
        seen += 1
        if seen == 150:
            emulator.expire_sessions("acme")
    assert seen == 300
    assert emulator.ledger["redemptions"] == 1
    assert emulator.ledger["reuse"] == 0


async def test_the_loop_keeps_running_while_a_long_input_is_encoded(client: Client):
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    result = await client.bulk.insert("Account", [{"Name": f"x{i}"} for i in range(20_000)],
                                      poll=FAST)
    stop.set()
    await task
    assert result.records_processed == 20_000
    assert ticks > 10


async def test_the_emulators_result_pages_on_the_wire(emulator: Emulator, client: Client,
                                                      http):
    from tests.emulator_calls import api_get

    emulator.seed("acme", "Account", [{"Name": f"n{i}"} for i in range(5)])
    job = await client.bulk.query("SELECT Name FROM Account", poll=FAST)
    token = (await client.manager.credentials("acme")).access_token
    path = f"/services/data/v67.0/jobs/query/{job.job.id}/results"
    headers = {"Authorization": f"Bearer {token}"}
    async with http.get(f"{emulator.base_url}{path}", params={"maxRecords": "3"},
                        headers=headers) as resp:
        first = await resp.read()
        locator = resp.headers["Sforce-Locator"]
        assert resp.headers["Sforce-NumberOfRecords"] == "3"
        assert resp.content_type == "text/csv"
    assert first == b'"Name"\n"n0"\n"n1"\n"n2"\n'
    async with http.get(f"{emulator.base_url}{path}",
                        params={"maxRecords": "3", "locator": locator}, headers=headers) as resp:
        assert await resp.read() == b'"Name"\n"n3"\n"n4"\n'
        assert resp.headers["Sforce-Locator"] == "null"
        assert resp.headers["Sforce-NumberOfRecords"] == "2"
    status, body, _ = await api_get(http, emulator, token,
                                    path.replace("v67.0", "v60.0"))
    assert status == 409  # results only with the API version that made the job
    assert body[0]["errorCode"] == "INVALIDJOB"


async def test_an_upload_refused_for_an_expired_session_is_sent_again_whole(
        client: Client, emulator: Emulator):
    from sfrtr.salesforce.bulk import _Spool

    spool = _Spool(b"Name\n")
    for i in range(3000):
        spool.add(f"row {i}\n".encode())
    job = await client.bulk.create_ingest_job("Account", "insert")
    emulator.expire_sessions("acme")
    await client.bulk.upload(job.id, spool.body(), spool.size)
    spool.close()
    assert emulator.ledger["redemptions"] == 1
    assert emulator.bulk.ingest[job.id].uploads == 1  # the 401 took no data
    await client.bulk.close(job.id)
    done = await client.bulk.wait(job.id, poll=FAST)
    assert done.records_processed == 3000


async def test_a_dropped_upload_is_not_retried_and_its_job_is_aborted(client: Client,
                                                                      emulator: Emulator):
    from sfrtr import ServerUnavailable

    real_upload = client.bulk.upload

    async def drop_then_upload(*args, **kwargs):
        emulator.faults.set("api", reset_before=1)  # the upload's connection is dropped
        return await real_upload(*args, **kwargs)

    client.bulk.upload = drop_then_upload  # type: ignore[method-assign]
    refused = emulator.ledger["api_refused"]
    with pytest.raises(ServerUnavailable, match="CONNECTION_ERROR"):
        await client.bulk.insert("Account", [{"Name": "once"}], poll=FAST)
    assert emulator.ledger["api_refused"] == refused + 1  # one attempt, no retry
    [job] = emulator.bulk.ingest.values()
    assert (job.uploads, job.state) == (0, "Aborted")


def test_job_info_refuses_what_is_not_a_job():
    from sfrtr import InvalidResponse

    info = JobInfo.from_json({"id": "750x", "state": "InProgress", "numberRecordsProcessed": 7,
                              "errorMessage": ""})
    assert (info.records_processed, info.error_message, info.done) == (7, None, False)
    for bad in ([], {"id": "750x"}, {"id": 1, "state": "Open"},
                {"id": "750x", "state": "Open", "numberRecordsFailed": "many"}):
        with pytest.raises(InvalidResponse):
            JobInfo.from_json(bad)
