"""HTTP for the emulator's Bulk API 2.0: ``/services/data/vNN.0/jobs/...``.

Admitted like every data call (faults, bearer token, API limit), but the
upload is read as a stream, not as JSON, and may be far larger than the
emulator's JSON body limit (up to :attr:`BulkJobs.max_upload_base64`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from sfrtr.emulator.bulk_jobs import DEFAULT_PAGE, IngestJob, QueryJob, new_job_id
from sfrtr.emulator.records import RecordError
from sfrtr.emulator.rest_routes import Caller, admit, limit_header
from sfrtr.emulator.soql import SoqlError, parse
from sfrtr.emulator.wire import api_error, json_response

if TYPE_CHECKING:
    from sfrtr.emulator.bulk_jobs import BulkJobs

OPERATIONS = ("insert", "update", "upsert", "delete", "hardDelete")
_FINAL = ("JobComplete", "Failed", "Aborted")


def _error(caller: Caller, status: int, code: str, message: str) -> web.Response:
    caller.em.ledger.count("api_refused", caller.family_id)
    return api_error(status, code, message, headers=limit_header(caller.org))


def _ok(caller: Caller, body: Any, status: int = 200) -> web.Response:
    caller.em.ledger.count("api_served", caller.family_id)
    headers = limit_header(caller.org)
    if body is None:
        return web.Response(status=status, headers=headers)
    return json_response(body, status, headers)


async def jobs(request: web.Request) -> web.StreamResponse:
    """Entry for ``jobs/ingest[...]`` and ``jobs/query[...]``."""
    caller = await admit(request)
    if not isinstance(caller, Caller):
        return caller
    parts = [p for p in request.match_info["tail"].split("/") if p]
    bulk: BulkJobs = caller.em.bulk
    method = request.method
    if not parts or parts[0] not in ("ingest", "query"):
        return _error(caller, 404, "NOT_FOUND", "The requested resource does not exist")
    kind, rest = parts[0], parts[1:]
    if method == "POST" and not rest:
        body = await _json(request)
        if body is None:
            return _error(caller, 400, "JSON_PARSER_ERROR", "The request body must be JSON.")
        return _create_ingest(caller, body) if kind == "ingest" else _create_query(caller, body)
    if not rest:
        return _error(caller, 405, "METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed.")
    table: dict[str, Any] = bulk.ingest if kind == "ingest" else bulk.query
    job = table.get(rest[0])
    if job is None or job.org is not caller.org:
        return _error(caller, 404, "NOT_FOUND", "The requested resource does not exist")
    if len(rest) == 1:
        if method == "GET":
            return _ok(caller, job.info())
        if method == "PATCH":
            return await _set_state(caller, request, job)
        if method == "DELETE":
            if job.state not in (*_FINAL, "UploadComplete"):
                return _error(caller, 400, "INVALIDJOB", "Job must be closed before deleting")
            del table[job.id]
            return _ok(caller, None, 204)
    elif isinstance(job, IngestJob) and rest[1:] == ["batches"] and method == "PUT":
        return await _upload(caller, request, job)
    elif isinstance(job, IngestJob) and method == "GET" and len(rest) == 2 and \
            rest[1] in ("successfulResults", "failedResults", "unprocessedrecords"):
        if job.state == "Open":
            return _error(caller, 400, "INVALIDJOB", "The job is still open")
        return await _csv(request, caller, bulk.ingest_results(job, rest[1]), {})
    elif isinstance(job, QueryJob) and method == "GET" and rest[1:] == ["results"]:
        return await _results(caller, request, job)
    return _error(caller, 404, "NOT_FOUND", "The requested resource does not exist")


async def _json(request: web.Request) -> dict[str, Any] | None:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def _create_ingest(caller: Caller, body: dict[str, Any]) -> web.Response:
    operation, name = body.get("operation"), body.get("object")
    line_ending = body.get("lineEnding", "LF")
    external_id = body.get("externalIdFieldName")
    if operation not in OPERATIONS or not isinstance(name, str):
        return _error(caller, 400, "INVALIDJOB", "object and a valid operation are required")
    if line_ending not in ("LF", "CRLF") or body.get("contentType", "CSV") != "CSV" or \
            body.get("columnDelimiter", "COMMA") != "COMMA":
        return _error(caller, 400, "INVALIDJOB", "unsupported contentType, lineEnding or "
                                                 "columnDelimiter")
    try:
        sobject = caller.org.data.sobject(name)
        if operation == "upsert":
            if not isinstance(external_id, str):
                return _error(caller, 400, "INVALIDJOB",
                              "External ID was blank for Account. An External ID must be "
                              "specified for upsert.")
            external_id = sobject.field_name(external_id)
    except RecordError as exc:
        return _error(caller, 400, "INVALIDJOB", exc.message)
    job = IngestJob(new_job_id(), caller.org, sobject.name, operation,
                    external_id if operation == "upsert" else None, line_ending,
                    caller.version)
    caller.em.bulk.ingest[job.id] = job
    return _ok(caller, job.info())


def _create_query(caller: Caller, body: dict[str, Any]) -> web.Response:
    operation, text = body.get("operation", "query"), body.get("query")
    if operation not in ("query", "queryAll") or not isinstance(text, str):
        return _error(caller, 400, "INVALIDJOB", "query and operation query|queryAll required")
    line_ending = body.get("lineEnding", "LF")
    if line_ending not in ("LF", "CRLF"):
        return _error(caller, 400, "INVALIDJOB", "lineEnding is LF or CRLF")
    try:
        query = parse(text)
        rows = caller.org.data.select(query, include_deleted=operation == "queryAll")
        sobject = caller.org.data.sobject(query.sobject)
        fields = [sobject.field_name(f) for f in query.fields]
    except SoqlError as exc:
        return _error(caller, 400, "MALFORMED_QUERY", str(exc))
    except RecordError as exc:
        return _error(caller, 400, exc.code, exc.message)
    job = QueryJob(new_job_id(), caller.org, operation, query, text, caller.version,
                   line_ending, rows, fields)
    bulk: BulkJobs = caller.em.bulk
    bulk.query[job.id] = job
    bulk.start(bulk.complete_query(job))
    return _ok(caller, job.info())


async def _set_state(caller: Caller, request: web.Request,
                     job: IngestJob | QueryJob) -> web.Response:
    body = await _json(request)
    state = body.get("state") if body else None
    bulk: BulkJobs = caller.em.bulk
    if state == "Aborted":
        if job.state in _FINAL:
            return _error(caller, 400, "INVALIDJOB", f"Job is already {job.state}")
        bulk.abort(job)
        return _ok(caller, job.info())
    if state == "UploadComplete" and isinstance(job, IngestJob):
        if job.state != "Open":
            return _error(caller, 400, "INVALIDJOB", f"Job is {job.state}, not Open")
        if job.uploads > 1:
            return _error(caller, 400, "INVALIDJOB",
                          f"Found multiple contents for job: <{job.id}>, please 'Close' / "
                          "'Abort' / 'Delete' the current Job then create a new Job and make "
                          "sure you only do 'PUT' once on a given Job.")
        job.state = "UploadComplete"
        bulk.start(bulk.process(job))
        return _ok(caller, job.info())
    return _error(caller, 400, "INVALIDJOB", "state must be UploadComplete or Aborted")


async def _upload(caller: Caller, request: web.Request, job: IngestJob) -> web.Response:
    if job.state != "Open":
        return _error(caller, 400, "INVALIDJOB", f"Job is {job.state}, not Open")
    if request.content_type != "text/csv":
        return _error(caller, 400, "INVALIDCONTENTTYPE", "upload data as text/csv")
    limit: int = caller.em.bulk.max_upload_base64
    data = bytearray()
    async for piece in request.content.iter_chunked(1024 * 1024):
        data += piece
        if (len(data) + 2) // 3 * 4 > limit:
            return _error(caller, 400, "INVALIDJOB",
                          f"the upload exceeds {limit} bytes once base64-encoded")
    job.uploads += 1
    job.data = bytes(data)
    return _ok(caller, None, 201)


async def _results(caller: Caller, request: web.Request, job: QueryJob) -> web.StreamResponse:
    if job.api_version != caller.version:
        return _error(caller, 409, "INVALIDJOB",
                      "results must be fetched with the API version that created the job")
    if job.state != "JobComplete":
        return _error(caller, 400, "INVALIDJOB", f"Job is {job.state}, not JobComplete")
    locator = request.query.get("locator") or None
    raw_max = request.query.get("maxRecords", str(DEFAULT_PAGE))
    if locator is not None and locator not in job.locators:
        return _error(caller, 400, "INVALIDLOCATOR", "invalid locator")
    if not raw_max.isdigit() or int(raw_max) < 1:
        return _error(caller, 400, "INVALIDJOB", "maxRecords must be a positive integer")
    bulk: BulkJobs = caller.em.bulk
    chunks, count, following = bulk.page(job, locator, int(raw_max))
    return await _csv(request, caller, chunks, {"Sforce-Locator": following,
                                                "Sforce-NumberOfRecords": str(count)})


async def _csv(request: web.Request, caller: Caller, chunks: Any,
               headers: dict[str, str]) -> web.StreamResponse:
    caller.em.ledger.count("api_served", caller.family_id)
    response = web.StreamResponse(headers={"Content-Type": "text/csv; charset=UTF-8",
                                           **limit_header(caller.org), **headers})
    await response.prepare(request)
    for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response
