"""Bulk API 2.0: ingest and query jobs, streamed in constant memory.

Ingest (``client.bulk.insert/update/upsert/delete/hard_delete``): the data (a
CSV file, CSV bytes, or rows as an (async) iterable of mappings) is spooled to
a temporary file one record at a time. Salesforce takes one upload per job of
at most 150 MB once base64-encoded, so when the spool would pass
``max_upload_base64`` the job is closed and a new one started: one job per
upload, each with the header. Then every job is waited for (polling with
backoff, ``on_progress`` called with each job's state), and the successful,
failed and unprocessed records stream back as rows.

Query (``client.bulk.query``): a query job, waited for, then its result pages
fetched with ``Sforce-Locator`` (``maxRecords`` per page), as rows or
straight to a CSV file.

Retries follow the client's rules: job creation, upload, close and abort are
not retried (a lost answer leaves their effect unknown; Salesforce refuses a
second upload to a job), status reads, result downloads and deletes are.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import aiohttp
import anyio

from sfrtr.salesforce import bulk_csv
from sfrtr.salesforce.client import Client, field_name, sobject_name
from sfrtr.salesforce.errors import InvalidResponse, SalesforceError

#: Salesforce's limit for one upload, measured base64-encoded.
MAX_UPLOAD_BASE64 = 150 * 1024 * 1024
_READ_SIZE = 1024 * 1024
TERMINAL = frozenset({"JobComplete", "Failed", "Aborted"})

Operation = Literal["insert", "update", "upsert", "delete", "hardDelete"]
Data = str | os.PathLike[str] | bytes | AsyncIterable[Mapping[str, Any]] | \
    Iterable[Mapping[str, Any]]
Progress = Callable[["JobInfo"], Awaitable[None] | None]


class BulkJobFailed(SalesforceError):
    """A job ended ``Failed`` or ``Aborted``; ``job`` is its last state."""

    def __init__(self, job: JobInfo) -> None:
        super().__init__(200, "BULK_JOB_" + job.state.upper(),
                         f"job {job.id} {job.state}: {job.error_message or 'no message'}")
        self.job = job
        self.result: IngestResult | None = None
        """From an ingest: every job of the call, finished, so the rows of the
        jobs that completed (and the unprocessed ones) can still be read."""


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A job's state as Salesforce last reported it."""

    id: str
    state: str
    operation: str
    object: str = ""
    records_processed: int = 0
    records_failed: int = 0
    error_message: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any) -> JobInfo:
        """Parse a job-info answer (``InvalidResponse`` if it is not one)."""
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) or \
                not isinstance(body.get("state"), str):
            raise InvalidResponse(200, "INVALID_RESPONSE", "not a Bulk API 2.0 job")
        try:
            processed = int(body.get("numberRecordsProcessed") or 0)
            failed = int(body.get("numberRecordsFailed") or 0)
        except (TypeError, ValueError):
            raise InvalidResponse(200, "INVALID_RESPONSE", "job record counts are not "
                                                           "numbers") from None
        message = body.get("errorMessage")
        return cls(body["id"], body["state"], str(body.get("operation", "")),
                   str(body.get("object", "")), processed, failed,
                   message if isinstance(message, str) and message else None, body)

    @property
    def done(self) -> bool:
        """Whether the job reached a final state."""
        return self.state in TERMINAL


@dataclass
class WaitPolicy:
    """How :meth:`Bulk.wait` polls: ``first`` seconds, doubling up to ``cap``."""

    first: float = 0.5
    cap: float = 10.0
    timeout: float = 24 * 3600.0


class _Spool:
    """One upload's CSV on disk: the header, then records until the size limit."""

    def __init__(self, header: bytes) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self.file.write(header)
        self.size = len(header)
        self.records = 0

    def fits(self, record: bytes, limit: int) -> bool:
        return _base64_size(self.size + len(record)) <= limit

    def add(self, record: bytes) -> None:
        self.file.write(record)
        self.size += len(record)
        self.records += 1

    def body(self) -> Callable[[], AsyncIterable[bytes]]:
        self.file.flush()

        async def chunks() -> AsyncIterator[bytes]:
            self.file.seek(0)
            while piece := self.file.read(_READ_SIZE):
                yield piece
        return chunks

    def close(self) -> None:
        self.file.close()


def _base64_size(raw: int) -> int:
    return (raw + 2) // 3 * 4


@dataclass
class IngestResult:
    """The jobs one ingest call created, and their results as rows."""

    bulk: Bulk
    jobs: list[JobInfo]

    @property
    def records_processed(self) -> int:
        """Records Salesforce processed, across jobs (successes and failures)."""
        return sum(j.records_processed for j in self.jobs)

    @property
    def records_failed(self) -> int:
        """Records that failed, across jobs."""
        return sum(j.records_failed for j in self.jobs)

    async def _each(self, kind: str) -> AsyncIterator[dict[str, str]]:
        for job in self.jobs:
            async for row in self.bulk.results(job.id, kind):
                yield row

    def successful(self) -> AsyncIterator[dict[str, str]]:
        """Saved records: ``sf__Id``, ``sf__Created`` and the columns sent."""
        return self._each("successfulResults")

    def failed(self) -> AsyncIterator[dict[str, str]]:
        """Refused records: ``sf__Id``, ``sf__Error`` and the columns sent."""
        return self._each("failedResults")

    def unprocessed(self) -> AsyncIterator[dict[str, str]]:
        """Records never attempted (the job failed or was aborted first)."""
        return self._each("unprocessedrecords")


@dataclass
class QueryJob:
    """A finished query job; read its results with :meth:`rows` or :meth:`to_file`."""

    bulk: Bulk
    job: JobInfo

    async def pages(self, max_records: int | None = None
                    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Each result page as a stream of CSV bytes (each page has its header)."""
        locator: str | None = None
        while True:
            params: dict[str, str] = {}
            if locator:
                params["locator"] = locator
            if max_records:
                params["maxRecords"] = str(max_records)
            async with self.bulk.client.stream(
                    "GET", f"jobs/query/{self.job.id}/results", params=params,
                    headers={"Accept": "text/csv"}) as resp:
                yield _body(resp)
                following = resp.headers.get("Sforce-Locator", "null")
            if not following or following == "null":
                return
            locator = following

    async def rows(self, max_records: int | None = None) -> AsyncIterator[dict[str, str]]:
        """Every result record as a dict of strings (null is ``""``), page after page."""
        async for page in self.pages(max_records):
            async for row in bulk_csv.rows(page):
                yield row

    async def to_file(self, path: str | os.PathLike[str],
                      max_records: int | None = None) -> int:
        """Write the results as one CSV file (one header); returns the record count."""
        count = 0
        buffer: list[bytes] = []
        size = 0
        async with await anyio.open_file(path, "wb") as out:
            first = True
            async for page in self.pages(max_records):
                header_done = False
                async for record in bulk_csv.records(page):
                    if not header_done:
                        header_done = True
                        if not first:
                            continue  # one header for the whole file
                        first = False
                    else:
                        count += 1
                    buffer.append(record)
                    size += len(record)
                    if size >= _READ_SIZE:
                        await out.write(b"".join(buffer))
                        buffer.clear()
                        size = 0
            await out.write(b"".join(buffer))
        return count


async def _body(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for piece in resp.content.iter_chunked(_READ_SIZE):
        yield piece


class Bulk:
    """``client.bulk``: Bulk API 2.0 jobs of one org."""

    def __init__(self, client: Client) -> None:
        self.client = client

    # -- high level -----------------------------------------------------------

    async def insert(self, sobject: str, data: Data, **options: Any) -> IngestResult:
        """Insert records (see :meth:`ingest` for ``data`` and options)."""
        return await self.ingest(sobject, "insert", data, **options)

    async def update(self, sobject: str, data: Data, **options: Any) -> IngestResult:
        """Update records; each carries its ``Id``."""
        return await self.ingest(sobject, "update", data, **options)

    async def upsert(self, sobject: str, external_id_field: str, data: Data,
                     **options: Any) -> IngestResult:
        """Insert or update by ``external_id_field``."""
        return await self.ingest(sobject, "upsert", data, external_id_field=external_id_field,
                                 **options)

    async def delete(self, sobject: str, data: Data, **options: Any) -> IngestResult:
        """Delete records (an ``Id`` column) to the recycle bin."""
        return await self.ingest(sobject, "delete", data, **options)

    async def hard_delete(self, sobject: str, data: Data, **options: Any) -> IngestResult:
        """Delete records for good (needs the "Bulk API Hard Delete" permission)."""
        return await self.ingest(sobject, "hardDelete", data, **options)

    async def ingest(self, sobject: str, operation: Operation, data: Data, *,
                     external_id_field: str | None = None, line_ending: str = "LF",
                     fields: list[str] | None = None,
                     max_upload_base64: int = MAX_UPLOAD_BASE64, wait: bool = True,
                     poll: WaitPolicy | None = None,
                     on_progress: Progress | None = None) -> IngestResult:
        """Load ``data`` with one or more jobs; wait for them unless ``wait=False``.

        ``data``: a path to a CSV file (its header names the fields, its line
        ending must be ``line_ending``), CSV ``bytes``, or an (async) iterable
        of mappings (the header is ``fields``, else the first row's keys).
        Each job's upload stays within ``max_upload_base64`` (Salesforce: 150 MB).
        """
        if operation == "upsert" and not external_id_field:
            raise ValueError("upsert needs external_id_field")
        if line_ending not in bulk_csv.LINE_ENDINGS:
            raise ValueError("line_ending is 'LF' or 'CRLF'")
        jobs: list[JobInfo] = []
        async for spool in self._spools(data, line_ending, fields, max_upload_base64):
            try:
                job = await self.create_ingest_job(sobject, operation,
                                                   external_id_field=external_id_field,
                                                   line_ending=line_ending)
                try:
                    await self.upload(job.id, spool.body(), spool.size)
                except BaseException:
                    await self._abort_quietly(job.id)
                    raise
                jobs.append(await self.close(job.id))
            finally:
                spool.close()
        if not wait:
            return IngestResult(self, jobs)
        finished: list[JobInfo] = []
        failure: BulkJobFailed | None = None
        for job in jobs:
            try:
                finished.append(await self.wait(job.id, poll=poll, on_progress=on_progress))
            except BulkJobFailed as exc:  # the other jobs still run: wait for them too
                finished.append(exc.job)
                failure = failure or exc
        result = IngestResult(self, finished)
        if failure is not None:
            failure.result = result
            raise failure
        return result

    async def query(self, soql: str, *, include_deleted: bool = False,
                    poll: WaitPolicy | None = None,
                    on_progress: Progress | None = None) -> QueryJob:
        """Run a query job (``queryAll`` with ``include_deleted``) and wait for it."""
        body = (await self.client.request("POST", "jobs/query", json={
            "operation": "queryAll" if include_deleted else "query", "query": soql})).body
        job = JobInfo.from_json(body)
        return QueryJob(self, await self.wait(job.id, query=True, poll=poll,
                                              on_progress=on_progress))

    # -- one job at a time --------------------------------------------------------

    async def create_ingest_job(self, sobject: str, operation: Operation, *,
                                external_id_field: str | None = None,
                                line_ending: str = "LF") -> JobInfo:
        """Open an ingest job (state ``Open``). Not retried."""
        spec: dict[str, Any] = {"object": sobject_name(sobject), "operation": operation,
                                "contentType": "CSV", "lineEnding": line_ending,
                                "columnDelimiter": "COMMA"}
        if external_id_field:
            spec["externalIdFieldName"] = field_name(external_id_field)
        return JobInfo.from_json((await self.client.request("POST", "jobs/ingest",
                                                            json=spec)).body)

    async def upload(self, job_id: str, data: bytes | Callable[[], AsyncIterable[bytes]],
                     size: int | None = None) -> None:
        """Upload the job's CSV (once per job). Not retried (see the module doc)."""
        if size is None and isinstance(data, bytes):
            size = len(data)
        # A stated length: Salesforce is not asked to take a chunked upload.
        headers = {"Content-Length": str(size)} if size is not None else {}
        await self.client.request("PUT", f"jobs/ingest/{_job(job_id)}/batches", data=data,
                                  content_type="text/csv", headers=headers,
                                  idempotent=False)

    async def close(self, job_id: str) -> JobInfo:
        """Mark the upload complete: Salesforce starts processing."""
        return await self._set_state(job_id, "UploadComplete", query=False)

    async def abort(self, job_id: str, *, query: bool = False) -> JobInfo:
        """Abort a job; records not yet processed stay unprocessed."""
        return await self._set_state(job_id, "Aborted", query=query)

    async def delete_job(self, job_id: str, *, query: bool = False) -> None:
        """Delete a finished job and its results."""
        await self.client.request("DELETE", f"{_kind(query)}/{_job(job_id)}")

    async def job(self, job_id: str, *, query: bool = False) -> JobInfo:
        """The job's current state."""
        return JobInfo.from_json((await self.client.request(
            "GET", f"{_kind(query)}/{_job(job_id)}")).body)

    async def wait(self, job_id: str, *, query: bool = False, poll: WaitPolicy | None = None,
                   on_progress: Progress | None = None) -> JobInfo:
        """Poll until the job ends; :class:`BulkJobFailed` if it failed or was aborted.

        Polls ``poll.first`` seconds apart at first, doubling up to ``poll.cap``;
        ``on_progress`` (sync or async) sees every state read.
        """
        policy = poll or WaitPolicy()
        deadline = time.monotonic() + policy.timeout
        pause = policy.first
        while True:
            job = await self.job(job_id, query=query)
            if on_progress is not None:
                called = on_progress(job)
                if inspect.isawaitable(called):
                    await called
            if job.done:
                if job.state != "JobComplete":
                    raise BulkJobFailed(job)
                return job
            if time.monotonic() + pause > deadline:
                raise TimeoutError(f"bulk job {job_id} still {job.state} after "
                                   f"{policy.timeout:.0f} s")
            await asyncio.sleep(pause)
            pause = min(policy.cap, pause * 2)

    async def results(self, job_id: str, kind: str) -> AsyncIterator[dict[str, str]]:
        """``successfulResults``, ``failedResults`` or ``unprocessedrecords`` as rows."""
        if kind not in ("successfulResults", "failedResults", "unprocessedrecords"):
            raise ValueError(f"unknown result kind {kind!r}")
        async with self.client.stream("GET", f"jobs/ingest/{_job(job_id)}/{kind}",
                                      headers={"Accept": "text/csv"}) as resp:
            async for row in bulk_csv.rows(_body(resp)):
                yield row

    # -- internals ------------------------------------------------------------------

    async def _set_state(self, job_id: str, state: str, *, query: bool) -> JobInfo:
        return JobInfo.from_json((await self.client.request(
            "PATCH", f"{_kind(query)}/{_job(job_id)}", json={"state": state})).body)

    async def _abort_quietly(self, job_id: str) -> None:
        # the upload's own error is the one worth raising
        with contextlib.suppress(SalesforceError, aiohttp.ClientError, TimeoutError):
            await self.abort(job_id)

    async def _spools(self, data: Data, line_ending: str, fields: list[str] | None,
                      limit: int) -> AsyncIterator[_Spool]:
        header, records = await _header_and_records(data, line_ending, fields)
        if _base64_size(len(header)) >= limit:
            raise ValueError("max_upload_base64 is smaller than the header")
        spool = _Spool(header)
        try:
            async for record in records:
                if not spool.fits(record, limit):
                    if spool.records == 0:
                        raise ValueError("a single record is larger than max_upload_base64")
                    yield spool
                    spool = _Spool(header)
                spool.add(record)
                if spool.records % 2000 == 0:
                    await asyncio.sleep(0)  # encoding a long input must not freeze the loop
            if spool.records:
                yield spool
        finally:
            spool.close()


async def _header_and_records(data: Data, line_ending: str, fields: list[str] | None
                              ) -> tuple[bytes, AsyncIterator[bytes]]:
    if isinstance(data, str | os.PathLike | bytes):
        source = _file_chunks(data) if not isinstance(data, bytes) else _one(data)
        records = bulk_csv.records(source)
        header = await anext(records, b"")
        if not header.strip():
            raise ValueError("the CSV has no header")
        if line_ending == "LF" and header.endswith(b"\r\n"):
            raise ValueError("the CSV's lines end in CRLF: pass line_ending='CRLF'")
        return header, records
    rows = _aiter(data)
    first = await anext(rows, None)
    if first is None:
        raise ValueError("no rows to load")
    encoder = bulk_csv.RowEncoder(fields or list(first), line_ending)

    async def encoded() -> AsyncIterator[bytes]:
        assert first is not None
        yield encoder.row(first)
        async for row in rows:
            yield encoder.row(row)
    return encoder.header(), encoded()


async def _aiter(data: AsyncIterable[Mapping[str, Any]] | Iterable[Mapping[str, Any]]
                 ) -> AsyncIterator[Mapping[str, Any]]:
    if isinstance(data, AsyncIterable):
        async for row in data:
            yield row
    else:
        for i, row in enumerate(data):
            if i % 1000 == 999:
                await asyncio.sleep(0)  # a long list must not freeze the loop
            yield row


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _file_chunks(path: str | os.PathLike[str]) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        while piece := await f.read(_READ_SIZE):
            yield piece


def _kind(query: bool) -> str:
    return "jobs/query" if query else "jobs/ingest"


def _job(job_id: str) -> str:
    if not job_id.isalnum():
        raise ValueError(f"invalid job id {job_id!r}")
    return job_id


__all__ = ["MAX_UPLOAD_BASE64", "Bulk", "BulkJobFailed", "IngestResult", "JobInfo",
           "QueryJob", "WaitPolicy"]
