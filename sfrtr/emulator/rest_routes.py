"""The REST half of the emulator: one authenticated entry, one dispatcher.

Every data call under ``/services/data/vNN.0/`` goes through :func:`data_api`
(faults, bearer auth, API limits, the ``Sforce-Limit-Info`` header) and then
:func:`dispatch`, which composite subrequests reuse, so a subrequest behaves
exactly like the same call made alone.
"""

from __future__ import annotations

import asyncio
import copy
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson
from aiohttp import web

from sfrtr.emulator import collections_api
from sfrtr.emulator.records import OrgData, RecordError
from sfrtr.emulator.soql import SoqlError, parse
from sfrtr.emulator.state import Org
from sfrtr.emulator.wire import api_error, drop_connection, finish, json_response

if TYPE_CHECKING:
    from sfrtr.emulator.server import Emulator

OLDEST_VERSION = 31
RETIRED_BELOW = 31
LATEST_VERSION = 67
RELEASES = {63: "Spring '25", 64: "Summer '25", 65: "Winter '26", 66: "Spring '26",
            67: "Summer '26"}
DEFAULT_BATCH, MIN_BATCH, MAX_BATCH = 2000, 200, 2000
MAX_COMPOSITE = 25
_VERSION = re.compile(r"^v(\d+)\.0$")
_BATCH = re.compile(r"batchSize\s*=\s*(\d+)", re.IGNORECASE)
_REFERENCE = re.compile(r"@\{([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\}")


def _emulator(request: web.Request) -> Emulator:
    from sfrtr.emulator.server import EMULATOR_KEY

    return request.app[EMULATOR_KEY]


def _label(version: int) -> str:
    return RELEASES.get(version, f"v{version}.0")


async def versions(request: web.Request) -> web.Response:
    """``GET /services/data/``: no authentication, no limit header."""
    return json_response([
        {"label": _label(v), "url": f"/services/data/v{v}.0", "version": f"{v}.0"}
        for v in range(OLDEST_VERSION, LATEST_VERSION + 1)
    ])


@dataclass
class Answer:
    status: int
    body: Any = None


@dataclass
class Cursor:
    rows: list[dict[str, Any]]
    batch: int
    all_rows: bool


class Cursors:
    """Open query locators, oldest evicted first once there are too many."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._open: OrderedDict[str, Cursor] = OrderedDict()

    def open(self, cursor: Cursor) -> str:
        locator = "01g" + secrets.token_hex(8)
        self._open[locator] = cursor
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)
        return locator

    def get(self, locator: str) -> Cursor | None:
        return self._open.get(locator)

    def close(self, locator: str) -> None:
        self._open.pop(locator, None)


def _page(em: Emulator, version: str, cursor: Cursor, locator: str | None,
          offset: int) -> dict[str, Any]:
    end = offset + cursor.batch
    body: dict[str, Any] = {"totalSize": len(cursor.rows), "done": end >= len(cursor.rows),
                            "records": cursor.rows[offset:end]}
    if not body["done"]:
        if locator is None:
            locator = em.cursors.open(cursor)
        body["nextRecordsUrl"] = f"/services/data/v{version}/query/{locator}-{end}"
    elif locator is not None:
        em.cursors.close(locator)
    return body


def _batch_size(options: str | None) -> int:
    if not options:
        return DEFAULT_BATCH
    m = _BATCH.search(options)
    if m is None:
        return DEFAULT_BATCH
    return max(MIN_BATCH, min(MAX_BATCH, int(m.group(1))))


def _query(em: Emulator, org: Org, version: str, params: dict[str, str], *,
           all_rows: bool, batch: int) -> Answer:
    text = params.get("q")
    if text is None:
        return Answer(400, [{"message": "missing q parameter", "errorCode": "MALFORMED_QUERY"}])
    try:
        parsed = parse(text)
    except SoqlError as exc:
        return Answer(400, [{"message": str(exc), "errorCode": "MALFORMED_QUERY"}])
    rows = org.data.select(parsed, include_deleted=all_rows)
    return Answer(200, _page(em, version, Cursor(rows, batch, all_rows), None, 0))


def _query_more(em: Emulator, version: str, locator_and_offset: str) -> Answer:
    locator, _, offset = locator_and_offset.rpartition("-")
    cursor = em.cursors.get(locator)
    if cursor is None or not offset.isdigit() or int(offset) >= len(cursor.rows):
        return Answer(400, [{"message": "invalid query locator",
                             "errorCode": "INVALID_QUERY_LOCATOR"}])
    return Answer(200, _page(em, version, cursor, locator, int(offset)))


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime())


def _sobjects(org: OrgData, method: str, parts: list[str], params: dict[str, str],
              body: Any, version: str) -> Answer:
    if not parts:
        if method != "GET":
            raise RecordError(405, "METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed.")
        return Answer(200, org.describe_global())
    type_name = parts[0]
    if len(parts) == 1:
        if method == "POST":
            record_id = org.insert(type_name, _object_body(body), stamp=_stamp())
            return Answer(201, {"id": record_id, "success": True, "errors": []})
        if method == "GET":
            s = org.sobject(type_name)
            return Answer(200, {"objectDescribe": {"name": s.name, "keyPrefix": s.key_prefix},
                                "recentItems": []})
    elif len(parts) == 2 and parts[1] == "describe" and method == "GET":
        return Answer(200, org.describe(type_name))
    elif len(parts) == 2:
        record_id = parts[1]
        if method == "GET":
            fields = [f for f in params.get("fields", "").split(",") if f] or None
            return Answer(200, org.get(type_name, record_id, fields))
        if method == "PATCH":
            org.update(type_name, record_id, _object_body(body), stamp=_stamp())
            return Answer(204)
        if method == "DELETE":
            org.delete(type_name, record_id)
            return Answer(204)
    elif len(parts) == 3:
        return _by_external_id(org, method, type_name, parts[1], parts[2], params, body,
                               version)
    raise RecordError(404, "NOT_FOUND", "The requested resource does not exist")


def _by_external_id(org: OrgData, method: str, type_name: str, field_name: str, value: str,
                    params: dict[str, str], body: Any, version: str) -> Answer:
    sobject = org.sobject(type_name)
    field_name = sobject.field_name(field_name)
    matches = org.find_by(type_name, field_name, value)
    if len(matches) > 1:
        return Answer(300, [org.shaped(sobject, r, ["Id"])["attributes"]["url"]
                            for r in matches])
    if method == "GET":
        if not matches:
            raise RecordError(404, "NOT_FOUND", "The requested resource does not exist")
        fields = [f for f in params.get("fields", "").split(",") if f] or None
        return Answer(200, org.get(type_name, matches[0]["Id"], fields))
    if method != "PATCH":
        raise RecordError(405, "METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed.")
    values = _object_body(body)
    if any(k.lower() == field_name.lower() for k in values):
        raise RecordError(400, "INVALID_FIELD",
                          f"The external id field {field_name} should not be in the body.",
                          [field_name])
    if matches:
        record_id = matches[0]["Id"]
        org.update(type_name, record_id, values, stamp=_stamp())
        if float(version) < 46:
            return Answer(204)
        return Answer(200, {"id": record_id, "success": True, "errors": [], "created": False})
    if params.get("updateOnly") == "true":
        raise RecordError(404, "NOT_FOUND", "The requested resource does not exist")
    record_id = org.insert(type_name, {**values, field_name: value}, stamp=_stamp())
    return Answer(201, {"id": record_id, "success": True, "errors": [], "created": True})


def _object_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RecordError(400, "JSON_PARSER_ERROR", "The request body must be a JSON object.")
    return body


def _limits(org: Org) -> dict[str, Any]:
    return {
        "DailyApiRequests": {"Max": org.api_limit, "Remaining": org.api_limit - org.api_used},
        "DataStorageMB": {"Max": 5, "Remaining": 5},
        "ConcurrentAsyncGetReportInstances": {"Max": 200, "Remaining": 200},
    }


def _resources(version: str, org: Org) -> dict[str, str]:
    base = f"/services/data/v{version}"
    return {name: f"{base}/{name}" for name in
            ("sobjects", "query", "queryAll", "limits", "composite", "search")}


def dispatch(em: Emulator, org: Org, method: str, version: str, tail: str,
             params: dict[str, str], body: Any, batch: int = DEFAULT_BATCH) -> Answer:
    """Answer one data call. ``tail`` is the path after ``/services/data/vNN.0/``."""
    parts = [p for p in tail.split("/") if p]
    try:
        if not parts:
            return Answer(200, _resources(version, org))
        head, rest = parts[0], parts[1:]
        if head in ("query", "queryAll") and method == "GET":
            if rest:
                return _query_more(em, version, rest[0])
            return _query(em, org, version, params, all_rows=head == "queryAll", batch=batch)
        if head == "sobjects":
            return _sobjects(org.data, method, rest, params, body, version)
        if head == "search" and method == "GET" and not rest:
            return _search(org, params.get("q", ""))
        if head == "limits" and method == "GET" and not rest:
            return Answer(200, _limits(org))
        if head == "composite" and method == "POST" and not rest:
            return _composite(em, org, version, body)
        if head == "composite" and rest[:1] == ["sobjects"]:
            return Answer(*collections_api.answer(org.data, method, rest[1:], params, body))
        if head == "composite" and method == "POST" and rest == ["graph"]:
            return _graph(em, org, version, body)
        if head == "composite" and method == "POST" and len(rest) == 2 and rest[0] == "tree":
            return _tree(org.data, rest[1], body)
    except RecordError as exc:
        item: dict[str, Any] = {"message": exc.message, "errorCode": exc.code}
        if exc.fields:
            item["fields"] = exc.fields
        return Answer(exc.status, [item])
    return Answer(404, [{"message": "The requested resource does not exist",
                         "errorCode": "NOT_FOUND"}])


_SOSL = re.compile(r"^\s*FIND\s*\{([^}]+)\}\s*(?:IN\s+ALL\s+FIELDS\s*)?RETURNING\s+"
                   r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:\(([^)]*)\))?\s*$", re.IGNORECASE)


def _search(org: Org, sosl: str) -> Answer:
    """A SOSL subset: ``FIND {text} [IN ALL FIELDS] RETURNING Object[(fields)]``."""
    m = _SOSL.match(sosl)
    if m is None:
        return Answer(400, [{"message": "unsupported or malformed search",
                             "errorCode": "MALFORMED_SEARCH"}])
    needle, type_name, field_list = m.group(1).strip().lower(), m.group(2), m.group(3)
    sobject = org.data.sobject(type_name)
    names = [sobject.field_name(f.strip()) for f in field_list.split(",")] if field_list \
        else ["Id"]
    hits = [org.data.shaped(sobject, row, names) for row in sobject.rows.values()
            if not row["IsDeleted"] and any(isinstance(v, str) and needle in v.lower()
                                            for v in row.values())]
    return Answer(200, {"searchRecords": hits})


def _substitute(value: Any, results: dict[str, Any]) -> Any:
    if isinstance(value, str):
        def one(m: re.Match[str]) -> str:
            ref, field_name = m.group(1), m.group(2)
            found = results.get(ref)
            if not isinstance(found, dict) or field_name not in found:
                raise KeyError(f"{ref}.{field_name}")
            return str(found[field_name])
        return _REFERENCE.sub(one, value)
    if isinstance(value, dict):
        return {k: _substitute(v, results) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, results) for v in value]
    return value


HALTED = [{"errorCode": "PROCESSING_HALTED",
           "message": "The transaction was rolled back since another operation in the same "
                      "transaction failed."}]


def _composite(em: Emulator, org: Org, version: str, body: Any, *,
               limit: int = MAX_COMPOSITE) -> Answer:
    if not isinstance(body, dict) or not isinstance(body.get("compositeRequest"), list):
        raise RecordError(400, "JSON_PARSER_ERROR", "compositeRequest must be a list")
    subrequests: list[Any] = body["compositeRequest"]
    all_or_none = bool(body.get("allOrNone", False))
    if not 1 <= len(subrequests) <= limit:
        raise RecordError(400, "INVALID_BATCH_REQUEST",
                          f"a composite request has 1 to {limit} subrequests")
    snapshot = copy.deepcopy(org.data.types) if all_or_none else None
    results: dict[str, Any] = {}
    responses: list[dict[str, Any]] = []
    failed = False
    for sub in subrequests:
        if not isinstance(sub, dict) or not isinstance(sub.get("url"), str) or \
                not isinstance(sub.get("method"), str) or \
                not isinstance(sub.get("referenceId"), str):
            raise RecordError(400, "INVALID_BATCH_REQUEST",
                              "each subrequest needs method, url and referenceId")
        ref = sub["referenceId"]
        if failed and all_or_none:
            responses.append({"body": HALTED, "httpHeaders": {}, "httpStatusCode": 400,
                              "referenceId": ref})
            continue
        try:
            url = _substitute(sub["url"], results)
            sub_body = _substitute(sub.get("body"), results)
        except KeyError as exc:
            answer = Answer(400, [{"errorCode": "PROCESSING_HALTED",
                                   "message": f"Invalid reference specified. No value for "
                                              f"{exc.args[0]} found in {ref}."}])
        else:
            answer = _subrequest(em, org, version, sub["method"].upper(), url, sub_body)
        if answer.status >= 400:
            failed = True
        else:
            results[ref] = answer.body
        responses.append({"body": answer.body, "httpHeaders": {},
                          "httpStatusCode": answer.status, "referenceId": ref})
    if failed and all_or_none:
        assert snapshot is not None
        org.data.types = snapshot
        for item in responses:
            if item["httpStatusCode"] < 400:
                item.update(body=HALTED, httpStatusCode=400)
    return Answer(200, {"compositeResponse": responses})


def _graph(em: Emulator, org: Org, version: str, body: Any) -> Answer:
    """Composite graph: each graph is an all-or-none composite request of its own."""
    if not isinstance(body, dict) or not isinstance(body.get("graphs"), list):
        raise RecordError(400, "JSON_PARSER_ERROR", "graphs must be a list")
    out = []
    for graph in body["graphs"]:
        if not isinstance(graph, dict) or not isinstance(graph.get("graphId"), str):
            raise RecordError(400, "INVALID_BATCH_REQUEST", "each graph needs a graphId")
        answer = _composite(em, org, version, {"allOrNone": True,
                                               "compositeRequest": graph.get("compositeRequest")},
                            limit=500)
        responses = answer.body["compositeResponse"]
        out.append({"graphId": graph["graphId"], "graphResponse": {"compositeResponse":
                                                                  responses},
                    "isSuccessful": all(r["httpStatusCode"] < 400 for r in responses)})
    return Answer(200, {"graphs": out})


def _tree(org: OrgData, type_name: str, body: Any) -> Answer:
    """Composite tree: records and their children, inserted all or none."""
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        raise RecordError(400, "JSON_PARSER_ERROR", "records must be a list")
    results: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    stamp = _stamp()
    org.begin()

    def insert(record: Any, expected: str, parent: tuple[str, str] | None) -> None:
        attributes = record.get("attributes") if isinstance(record, dict) else None
        if not isinstance(attributes, dict) or not isinstance(attributes.get("referenceId"),
                                                              str):
            raise RecordError(400, "INVALID_INPUT", "each record needs attributes.referenceId")
        ref = attributes["referenceId"]
        name = attributes.get("type", expected)
        values: dict[str, Any] = {}
        children: list[Any] = []
        for key, value in record.items():
            if key == "attributes":
                continue
            if isinstance(value, dict) and isinstance(value.get("records"), list):
                children += value["records"]
            else:
                values[key] = value
        if parent is not None:
            link = org.sobject(name).field_name(f"{parent[0]}Id")
            values[link] = parent[1]
        try:
            record_id = org.insert(name, values, stamp=stamp)
        except RecordError as exc:
            failed.append({"referenceId": ref, "errors": [
                {"statusCode": exc.code, "message": exc.message, "fields": exc.fields}]})
            return
        results.append({"referenceId": ref, "id": record_id})
        for child in children:
            insert(child, name, (org.sobject(name).name, record_id))

    for record in body["records"]:
        insert(record, type_name, None)
    if failed:
        org.rollback()
        return Answer(400, {"hasErrors": True, "results": failed})
    org.commit()
    return Answer(201, {"hasErrors": False, "results": results})


def _subrequest(em: Emulator, org: Org, version: str, method: str, url: str,
                body: Any) -> Answer:
    split = urlsplit(url)
    prefix = f"/services/data/v{version}/"
    if not split.path.startswith(prefix):
        return Answer(400, [{"errorCode": "INVALID_BATCH_REQUEST",
                             "message": f"subrequest url must start with {prefix}"}])
    params = {k: v[-1] for k, v in parse_qs(split.query).items()}
    return dispatch(em, org, method, version, split.path[len(prefix):], params, body)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "oauth") and value.strip():
        return value.strip()
    return None


@dataclass
class Caller:
    """An admitted data call: whose org, which API version, which grant."""

    em: Emulator
    org: Org
    family_id: str
    version: str


async def admit(request: web.Request) -> Caller | web.StreamResponse:
    """Faults, version, bearer auth and the API limit, as for every data call.

    Returns the caller, or the answer that refuses the call. Counts the call
    against the org's daily limit (as Salesforce does for REST and Bulk API 2.0).
    """
    em = _emulator(request)
    faults = em.faults["api"]
    if faults.take_reset():
        em.ledger.count("api_refused")
        return drop_connection(request)
    if faults.draw_error(em.rng):
        em.ledger.count("api_refused")
        return api_error(faults.error_status, "SERVER_UNAVAILABLE", "injected fault")
    m = _VERSION.match(request.match_info["version"])
    if m is None:
        return api_error(404, "NOT_FOUND", "The requested resource does not exist")
    number = int(m.group(1))
    if number < RETIRED_BELOW:
        return api_error(410, "GONE", "This version of the API has been retired.")
    if number > LATEST_VERSION:
        return api_error(404, "NOT_FOUND", "The requested resource does not exist")
    token_value = _bearer(request)
    access = em.world.access_index.get(token_value or "")
    now = time.time()
    if access is None or not em.world.access_alive(access, now):
        em.ledger.count("api_refused")
        return api_error(401, "INVALID_SESSION_ID", "Session expired or invalid")
    access.last_used = now  # the inactivity timeout slides with use
    org = access.family.org
    if org.api_used >= org.api_limit:
        em.ledger.count("api_refused", access.family.family_id)
        return api_error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.",
                         headers=limit_header(org))
    org.api_used += 1
    if delay := faults.delay(em.rng):
        await asyncio.sleep(delay)
    return Caller(em, org, access.family.family_id, f"{number}.0")


async def data_api(request: web.Request) -> web.StreamResponse:
    """Entry for every authenticated call under ``/services/data/vNN.0/``."""
    caller = await admit(request)
    if not isinstance(caller, Caller):
        return caller
    em, org, version = caller.em, caller.org, caller.version
    faults = em.faults["api"]
    body: Any = None
    if request.can_read_body:
        raw = await request.read()
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                em.ledger.count("api_refused", caller.family_id)
                return api_error(400, "JSON_PARSER_ERROR", "The request body is not valid JSON.",
                                 headers=limit_header(org))
    method = request.method
    if method == "POST" and request.query.get("_HttpMethod") == "PATCH":
        method = "PATCH"
    answer = dispatch(em, org, method, version, request.match_info["tail"],
                      dict(request.query), body,
                      _batch_size(request.headers.get("Sforce-Query-Options")))
    em.ledger.count("api_served" if answer.status < 400 else "api_refused", caller.family_id)
    headers = limit_header(org)
    if answer.body is None:
        response = web.Response(status=answer.status, headers=headers)
    else:
        response = json_response(answer.body, answer.status, headers)
    return await finish(request, response, faults)


def limit_header(org: Org) -> dict[str, str]:
    return {"Sforce-Limit-Info": f"api-usage={org.api_used}/{org.api_limit}"}
