"""The emulator's sObject Collections: ``/composite/sobjects``.

Create (POST), update (PATCH), upsert (PATCH ``/{type}/{externalIdField}``),
delete (DELETE ``?ids=``) and get (GET ``/{type}?ids=&fields=``, or POST with a
body for long lists), at most 200 records per call. Each record gets its own
result; with ``allOrNone`` a single failure rolls every change of the call
back and the other records report ``ALL_OR_NONE_OPERATION_ROLLED_BACK``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sfrtr.emulator.records import OrgData, RecordError, SObjectType

MAX_RECORDS = 200
ROLLED_BACK = {"statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
               "message": "Record rolled back because not all records were valid and the "
                          "request was using AllOrNone header"}


class CollectionError(RecordError):
    """The whole call is refused (not one record)."""


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime())


def _failure(exc: RecordError) -> dict[str, Any]:
    return {"id": None, "success": False,
            "errors": [{"statusCode": exc.code, "message": exc.message, "fields": exc.fields}]}


def _by_prefix(org: OrgData, record_id: str) -> SObjectType:
    for sobject in org.types.values():
        if record_id.startswith(sobject.key_prefix) and record_id in sobject.rows:
            return sobject
    raise RecordError(404, "ENTITY_IS_DELETED", "entity is deleted")


def _records(body: Any) -> tuple[list[dict[str, Any]], bool]:
    if not isinstance(body, dict) or not isinstance(body.get("records"), list) or \
            not all(isinstance(r, dict) for r in body["records"]):
        raise CollectionError(400, "JSON_PARSER_ERROR", "records must be a list of objects")
    records: list[dict[str, Any]] = body["records"]
    if len(records) > MAX_RECORDS:
        raise CollectionError(400, "EXCEEDED_ID_LIMIT",
                              f"record limit reached. cannot submit more than {MAX_RECORDS} "
                              "records into this call")
    return records, bool(body.get("allOrNone", False))


def _type_of(record: dict[str, Any]) -> str:
    attributes = record.get("attributes")
    name = attributes.get("type") if isinstance(attributes, dict) else None
    if not isinstance(name, str):
        raise RecordError(400, "INVALID_TYPE", "sObject type is required in attributes")
    return name


def _each(org: OrgData, items: list[Any], all_or_none: bool,
          one: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    if all_or_none:
        org.begin()
    results: list[dict[str, Any]] = []
    for item in items:
        try:
            results.append(one(item))
        except RecordError as exc:
            results.append(_failure(exc))
    if all_or_none:
        if all(r["success"] for r in results):
            org.commit()
        else:
            org.rollback()
            results = [r if not r["success"] else
                       {"id": None, "success": False, "errors": [ROLLED_BACK]} for r in results]
    return results


def answer(org: OrgData, method: str, parts: list[str], params: dict[str, str],
           body: Any) -> tuple[int, Any]:
    """Status and body for ``/composite/sobjects/...``; ``parts`` follow ``sobjects``."""
    stamp = _stamp()
    if method == "POST" and not parts:
        records, all_or_none = _records(body)

        def create(record: dict[str, Any]) -> dict[str, Any]:
            values = {k: v for k, v in record.items() if k != "attributes"}
            return {"id": org.insert(_type_of(record), values, stamp=stamp), "success": True,
                    "errors": []}
        return 200, _each(org, records, all_or_none, create)
    if method == "PATCH" and not parts:
        records, all_or_none = _records(body)

        def update(record: dict[str, Any]) -> dict[str, Any]:
            record_id = record.get("Id")
            if not isinstance(record_id, str):
                raise RecordError(400, "MISSING_ARGUMENT", "Id not specified in an update call")
            values = {k: v for k, v in record.items() if k not in ("attributes", "Id")}
            org.update(_type_of(record), record_id, values, stamp=stamp)
            return {"id": record_id, "success": True, "errors": []}
        return 200, _each(org, records, all_or_none, update)
    if method == "PATCH" and len(parts) == 2:
        records, all_or_none = _records(body)
        sobject = org.sobject(parts[0])
        ext = sobject.field_name(parts[1])

        def upsert(record: dict[str, Any]) -> dict[str, Any]:
            key = next((k for k in record if k.lower() == ext.lower()), None)
            if key is None or record[key] in (None, ""):
                raise RecordError(400, "MISSING_ARGUMENT",
                                  f"{ext} not specified", [ext])
            values = {k: v for k, v in record.items() if k != "attributes"}
            found = org.find_by(sobject.name, ext, record[key])
            if len(found) > 1:
                raise RecordError(300, "DUPLICATE_EXTERNAL_ID",
                                  f"{ext}: more than one record found for external id field")
            if found:
                del values[key]
                org.update(sobject.name, found[0]["Id"], values, stamp=stamp)
                return {"id": found[0]["Id"], "success": True, "errors": [], "created": False}
            return {"id": org.insert(sobject.name, values, stamp=stamp), "success": True,
                    "errors": [], "created": True}
        return 200, _each(org, records, all_or_none, upsert)
    if method == "DELETE" and not parts:
        ids = [i for i in params.get("ids", "").split(",") if i]
        if not ids or len(ids) > MAX_RECORDS:
            raise CollectionError(400, "INVALID_FIELD", f"ids: 1 to {MAX_RECORDS} Ids")

        def delete(record_id: str) -> dict[str, Any]:
            org.delete(_by_prefix(org, record_id).name, record_id)
            return {"id": record_id, "success": True, "errors": []}
        return 200, _each(org, ids, params.get("allOrNone") == "true", delete)
    if method in ("GET", "POST") and len(parts) == 1:
        if method == "GET":
            ids = [i for i in params.get("ids", "").split(",") if i]
            fields = [f for f in params.get("fields", "").split(",") if f]
        else:
            if not isinstance(body, dict):
                raise CollectionError(400, "JSON_PARSER_ERROR", "body must be an object")
            ids, fields = body.get("ids") or [], body.get("fields") or []
        if not ids or len(ids) > 2000 or not fields:
            raise CollectionError(400, "INVALID_FIELD", "ids and fields are required")
        sobject = org.sobject(parts[0])
        names = [sobject.field_name(f) for f in fields]
        out: list[dict[str, Any] | None] = []
        for record_id in ids:
            row = sobject.rows.get(record_id)
            out.append(None if row is None or row["IsDeleted"]
                       else org.shaped(sobject, row, names))
        return 200, out
    raise CollectionError(404, "NOT_FOUND", "The requested resource does not exist")
