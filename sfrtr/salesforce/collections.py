"""sObject Collections: create, update, upsert, delete and get many records per call.

Salesforce takes at most 200 records per call. Longer lists are cut into
chunks of 200 sent one after another, and the results come back as one list
in input order. ``all_or_none`` holds within a chunk (Salesforce's
transaction is one call): with more than 200 records an earlier chunk can
have been saved when a later one fails, so the results say which.

Retries follow the client's rules: get and delete are idempotent and
retried; create, update and upsert are not (a dropped answer cannot tell
whether the records were saved).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sfrtr.salesforce.client import Client, field_name, sobject_name
from sfrtr.salesforce.errors import InvalidResponse

T = TypeVar("T")

MAX_RECORDS = 200
"""The most records one Collections call takes."""

#: Get by Ids goes in the URL; past this many Ids it is sent as a POST body.
_MAX_IDS_IN_URL = 50


@dataclass(frozen=True, slots=True)
class RecordError:
    """Why one record failed: Salesforce's ``statusCode``, message and fields."""

    status_code: str
    message: str
    fields: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RecordResult:
    """The outcome for one input record, at its input position."""

    id: str | None
    success: bool
    errors: tuple[RecordError, ...] = ()
    created: bool | None = None
    """For upsert: whether the record was inserted (None for other operations)."""


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _chunk_size(chunk_size: int) -> int:
    if not 1 <= chunk_size <= MAX_RECORDS:
        raise ValueError(f"chunk_size is 1 to {MAX_RECORDS}")
    return chunk_size


class Collections:
    """``client.collections``: the sObject Collections resource of one org."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def create(self, sobject: str, records: Sequence[Mapping[str, Any]], *,
                     all_or_none: bool = False, chunk_size: int = MAX_RECORDS
                     ) -> list[RecordResult]:
        """Insert ``records`` of type ``sobject``; one result per record, in order."""
        typed = [_typed(sobject_name(sobject), r) for r in records]
        return await self._write("POST", "composite/sobjects", typed, all_or_none, chunk_size)

    async def update(self, sobject: str, records: Sequence[Mapping[str, Any]], *,
                     all_or_none: bool = False, chunk_size: int = MAX_RECORDS
                     ) -> list[RecordResult]:
        """Update ``records`` (each with its ``Id``); one result per record, in order."""
        name = sobject_name(sobject)
        if any(not r.get("Id") for r in records):
            raise ValueError("every record to update needs its Id")
        typed = [_typed(name, r) for r in records]
        return await self._write("PATCH", "composite/sobjects", typed, all_or_none, chunk_size)

    async def upsert(self, sobject: str, external_id_field: str,
                     records: Sequence[Mapping[str, Any]], *, all_or_none: bool = False,
                     chunk_size: int = MAX_RECORDS) -> list[RecordResult]:
        """Insert or update by ``external_id_field`` (each record carries its value)."""
        name, ext = sobject_name(sobject), field_name(external_id_field)
        typed = [_typed(name, r) for r in records]
        return await self._write("PATCH", f"composite/sobjects/{name}/{ext}", typed,
                                 all_or_none, chunk_size)

    async def delete(self, ids: Sequence[str], *, all_or_none: bool = False,
                     chunk_size: int = MAX_RECORDS) -> list[RecordResult]:
        """Delete records by Id; one result per Id, in order."""
        results: list[RecordResult] = []
        for chunk in _chunks(list(ids), _chunk_size(chunk_size)):
            answer = await self.client.request("DELETE", "composite/sobjects", params={
                "ids": ",".join(chunk), "allOrNone": _flag(all_or_none)})
            results += _results(answer.body, len(chunk))
        return results

    async def get(self, sobject: str, ids: Sequence[str], fields: Sequence[str]
                  ) -> list[dict[str, Any] | None]:
        """The records with these Ids (``None`` where one does not exist), in order."""
        name = sobject_name(sobject)
        names = [field_name(f) for f in fields]
        if not names:
            raise ValueError("name at least one field")
        found: list[dict[str, Any] | None] = []
        for chunk in _chunks(list(ids), MAX_RECORDS):
            if len(chunk) <= _MAX_IDS_IN_URL:
                answer = await self.client.request(
                    "GET", f"composite/sobjects/{name}",
                    params={"ids": ",".join(chunk), "fields": ",".join(names)})
            else:
                # A long Id list would overflow the URL: Salesforce takes it as a
                # POST body. Still a read, but not retried: POST is never retried.
                answer = await self.client.request(
                    "POST", f"composite/sobjects/{name}", json={"ids": chunk, "fields": names})
            body = answer.body
            if not isinstance(body, list) or len(body) != len(chunk) or \
                    not all(r is None or isinstance(r, dict) for r in body):
                raise InvalidResponse(answer.status, "INVALID_RESPONSE",
                                      "expected one record (or null) per Id")
            found += body
        return found

    async def _write(self, method: str, path: str, records: list[dict[str, Any]],
                     all_or_none: bool, chunk_size: int) -> list[RecordResult]:
        results: list[RecordResult] = []
        for chunk in _chunks(records, _chunk_size(chunk_size)):
            answer = await self.client.request(method, path, json={
                "allOrNone": all_or_none, "records": chunk})
            results += _results(answer.body, len(chunk))
        return results


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _typed(sobject: str, record: Mapping[str, Any]) -> dict[str, Any]:
    attributes = dict(record.get("attributes") or {})
    attributes.setdefault("type", sobject)
    return {**record, "attributes": attributes}


def _results(body: Any, expected: int) -> list[RecordResult]:
    if not isinstance(body, list) or len(body) != expected:
        raise InvalidResponse(200, "INVALID_RESPONSE", "expected one result per record")
    out: list[RecordResult] = []
    for item in body:
        if not isinstance(item, dict):
            raise InvalidResponse(200, "INVALID_RESPONSE", "a result is not an object")
        errors = tuple(
            RecordError(str(e.get("statusCode", "")), str(e.get("message", "")),
                        tuple(f for f in e.get("fields") or () if isinstance(f, str)))
            for e in item.get("errors") or () if isinstance(e, dict))
        record_id = item.get("id")
        created = item.get("created")
        out.append(RecordResult(record_id if isinstance(record_id, str) else None,
                                bool(item.get("success")), errors,
                                created if isinstance(created, bool) else None))
    return out


__all__ = ["MAX_RECORDS", "Collections", "RecordError", "RecordResult"]
