"""The emulator's Bulk API 2.0 jobs: state machines, processing, result CSV.

Ingest: ``Open`` → (one upload) → ``UploadComplete`` → ``InProgress`` →
``JobComplete``; ``Aborted`` from any non-final state, ``Failed`` when the
data as a whole is unusable (a line ending other than the job's, an unknown
column, a missing key column). Rows are processed in slices (``slice_rows``,
``slice_pause`` seconds apart) on the event loop, so a client sees progress
and can abort mid-job. Each row succeeds or fails on its own, like a
single-record call; rows after an abort are unprocessed.

Query: created ``UploadComplete``, run at once, ``JobComplete`` after
``query_delay``; results are pages of at most ``maxRecords`` rows chained by
opaque ``Sforce-Locator`` values.

The parser is Python's ``csv`` module, not the client's streaming reader, so
the emulator checks the client rather than agreeing with it by construction.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sfrtr.emulator.records import RecordError
from sfrtr.emulator.soql import Query
from sfrtr.emulator.state import Org

NULL = "#N/A"
MAX_UPLOAD_BASE64 = 150 * 1024 * 1024
DEFAULT_PAGE = 50_000
_ids = itertools.count(1)


def _stamp(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime(at))


def new_job_id() -> str:
    return f"750{next(_ids):015d}"


@dataclass
class IngestJob:
    id: str
    org: Org
    object: str
    operation: str
    external_id: str | None
    line_ending: str
    api_version: str
    state: str = "Open"
    data: bytes = b""
    uploads: int = 0
    processed: int = 0
    failed: int = 0
    error: str | None = None
    header: list[str] = field(default_factory=list)
    successes: list[tuple[str, bool, list[str]]] = field(default_factory=list)
    failures: list[tuple[str, str, list[str]]] = field(default_factory=list)
    unprocessed: list[list[str]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    reader: Iterator[list[str]] | None = None
    """The rows not yet processed, while the job runs."""

    def info(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id, "operation": self.operation, "object": self.object,
            "createdById": self.org.user_id, "createdDate": _stamp(self.created),
            "systemModstamp": _stamp(), "state": self.state, "concurrencyMode": "Parallel",
            "contentType": "CSV", "apiVersion": float(self.api_version),
            "jobType": "V2Ingest", "lineEnding": self.line_ending, "columnDelimiter": "COMMA",
            "contentUrl": f"services/data/v{self.api_version}/jobs/ingest/{self.id}/batches",
            "numberRecordsProcessed": self.processed, "numberRecordsFailed": self.failed,
            "retries": 0,
            "totalProcessingTime": int(((self.finished or time.time()) - self.started) * 1000)
            if self.started else 0,
        }
        if self.external_id:
            body["externalIdFieldName"] = self.external_id
        if self.error:
            body["errorMessage"] = self.error
        return body


@dataclass
class QueryJob:
    id: str
    org: Org
    operation: str
    query: Query
    text: str
    api_version: str
    line_ending: str
    rows: list[dict[str, Any]]
    fields: list[str]
    """The queried fields as the object declares them (the results' header)."""
    state: str = "UploadComplete"
    locators: dict[str, int] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "operation": self.operation, "object": self.query.sobject,
                "createdById": self.org.user_id, "createdDate": _stamp(self.created),
                "systemModstamp": _stamp(), "state": self.state, "concurrencyMode": "Parallel",
                "contentType": "CSV", "apiVersion": float(self.api_version),
                "jobType": "V2Query", "lineEnding": self.line_ending,
                "columnDelimiter": "COMMA",
                "numberRecordsProcessed": len(self.rows) if self.state == "JobComplete" else 0,
                "retries": 0, "totalProcessingTime": 0}


@dataclass
class BulkJobs:
    """Every Bulk API 2.0 job of the emulator, and how it processes them."""

    max_upload_base64: int = MAX_UPLOAD_BASE64
    slice_rows: int = 5000
    slice_pause: float = 0.0
    query_delay: float = 0.0
    ingest: dict[str, IngestJob] = field(default_factory=dict)
    query: dict[str, QueryJob] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- ingest processing ---------------------------------------------------

    def abort(self, job: IngestJob | QueryJob) -> None:
        """Abort: an ingest job's rows not yet processed become unprocessed at once."""
        job.state = "Aborted"
        if not isinstance(job, IngestJob):
            return
        if job.reader is None and job.data:
            job.reader = csv.reader(io.StringIO(job.data.decode("utf-8-sig"), newline=""))
            job.header = next(job.reader, [])
        if job.reader is not None:
            job.unprocessed.extend(job.reader)

    async def process(self, job: IngestJob) -> None:
        if job.state == "Aborted":
            return
        job.state, job.started = "InProgress", time.time()
        try:
            await self._process(job)
        finally:
            job.finished = time.time()
            job.data = b""  # processed: only the results are kept
            job.reader = None

    def _fail(self, job: IngestJob, message: str, rows: Iterator[list[str]]) -> None:
        job.state, job.error = "Failed", message
        job.unprocessed.extend(rows)

    async def _process(self, job: IngestJob) -> None:
        first_line = job.data.split(b"\n", 1)[0]
        reader = job.reader = csv.reader(io.StringIO(job.data.decode("utf-8-sig"),
                                                     newline=""))
        header = next(reader, None)
        if header is None:
            job.state = "JobComplete"
            return
        job.header = header
        crlf = first_line.endswith(b"\r")
        if crlf != (job.line_ending == "CRLF"):
            self._fail(job, "ClientInputError : LineEnding is invalid on user data. Current "
                       f"LineEnding setting is {job.line_ending}", reader)
            return
        try:
            sobject = job.org.data.sobject(job.object)
            names = [sobject.field_name(h) for h in header]
        except RecordError as exc:
            missing = exc.fields[0] if exc.fields else job.object
            self._fail(job, f"InvalidBatch : Field name not found : {missing}", reader)
            return
        key = {"update": "Id", "delete": "Id", "hardDelete": "Id",
               "upsert": job.external_id}.get(job.operation)
        if key is not None and key.lower() not in (n.lower() for n in names):
            self._fail(job, f"InvalidBatch : Field name not found : {key}", reader)
            return
        stamp = _stamp()
        for values in reader:
            try:
                record_id, created = self._row(job, names, values, stamp)
            except RecordError as exc:
                job.failures.append(("", f"{exc.code}:{exc.message}:"
                                         f"{','.join(exc.fields)} --", values))
                job.failed += 1
            else:
                job.successes.append((record_id, created, values))
            job.processed += 1
            if job.processed % self.slice_rows == 0:
                await asyncio.sleep(self.slice_pause)
                if job.state == "Aborted":
                    return  # abort() moved the rest to unprocessed
        if job.state != "Aborted":
            job.state = "JobComplete"

    def _row(self, job: IngestJob, names: list[str], values: list[str],
             stamp: str) -> tuple[str, bool]:
        if len(values) != len(names):
            raise RecordError(400, "INVALID_FIELD",
                              f"Row has {len(values)} values, the header {len(names)}")
        row: dict[str, Any] = {}
        for name, value in zip(names, values, strict=True):
            if value == "":
                continue  # Bulk API: an empty cell leaves the field as it is
            row[name] = None if value == NULL else value
        data = job.org.data
        if job.operation == "insert":
            return data.insert(job.object, row, stamp=stamp), True
        if job.operation in ("update", "delete", "hardDelete"):
            record_id = row.pop("Id", None)
            if not isinstance(record_id, str):
                raise RecordError(400, "MISSING_ARGUMENT", "Id not specified in an update call")
            if job.operation == "update":
                data.update(job.object, record_id, row, stamp=stamp)
            elif job.operation == "delete":
                data.delete(job.object, record_id)
            else:
                data.delete(job.object, record_id)
                data.sobject(job.object).rows.pop(record_id, None)
            return record_id, False
        assert job.external_id is not None
        ext = data.sobject(job.object).field_name(job.external_id)
        key_value = row.get(ext)
        if not isinstance(key_value, str):
            raise RecordError(400, "MISSING_ARGUMENT", f"{ext} not specified", [ext])
        found = data.find_by(job.object, ext, key_value)
        if len(found) > 1:
            raise RecordError(300, "DUPLICATE_EXTERNAL_ID",
                              f"{ext}: more than one record found for external id field")
        if found:
            del row[ext]
            data.update(job.object, found[0]["Id"], row, stamp=stamp)
            return found[0]["Id"], False
        return data.insert(job.object, row, stamp=stamp), True

    # -- result CSV -------------------------------------------------------------

    @staticmethod
    def csv_chunks(header: list[str], rows: Iterator[list[str]], line_ending: str,
                   per_chunk: int = 5000) -> Iterator[bytes]:
        """Header and rows, every value quoted (as Salesforce writes results)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, quoting=csv.QUOTE_ALL,
                            lineterminator="\r\n" if line_ending == "CRLF" else "\n")
        writer.writerow(header)
        for n, row in enumerate(rows, 1):
            writer.writerow(row)
            if n % per_chunk == 0:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue().encode()

    def ingest_results(self, job: IngestJob, kind: str) -> Iterator[bytes]:
        if kind == "successfulResults":
            return self.csv_chunks(
                ["sf__Id", "sf__Created", *job.header],
                ([i, "true" if c else "false", *v] for i, c, v in job.successes),
                job.line_ending)
        if kind == "failedResults":
            return self.csv_chunks(["sf__Id", "sf__Error", *job.header],
                                   ([i, e, *v] for i, e, v in job.failures), job.line_ending)
        return self.csv_chunks(job.header, iter(job.unprocessed), job.line_ending)

    # -- query -------------------------------------------------------------------

    async def complete_query(self, job: QueryJob) -> None:
        await asyncio.sleep(self.query_delay)
        if job.state == "UploadComplete":
            job.state = "JobComplete"

    def page(self, job: QueryJob, locator: str | None, max_records: int
             ) -> tuple[Iterator[bytes], int, str]:
        """A results page: its CSV chunks, its record count and the next locator."""
        start = job.locators[locator] if locator else 0
        end = min(len(job.rows), start + max_records)
        following = "null"
        if end < len(job.rows):
            following = secrets.token_urlsafe(12).replace("-", "x").replace("_", "y")
            job.locators[following] = end
        fields = job.fields

        def cell(value: Any) -> str:
            if value is None:
                return ""
            if isinstance(value, bool):
                return "true" if value else "false"
            return str(value)
        rows = ([cell(r.get(f)) for f in fields] for r in job.rows[start:end])
        return self.csv_chunks(fields, rows, job.line_ending), end - start, following
