"""An org's in-memory data: sObject types, their fields, and their rows.

Field names are matched case-insensitively (as Salesforce does) but stored
and returned in the case of their declaration.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from sfrtr.emulator.soql import Query, SoqlError

#: Fields every object has; the emulator fills them itself.
SYSTEM_FIELDS = ("Id", "IsDeleted", "CreatedDate", "LastModifiedDate")

#: Objects every org starts with, and their key prefixes.
DEFAULT_OBJECTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Account": ("001", ("Name", "Industry", "AccountNumber", "External_Id__c")),
    "Contact": ("003", ("FirstName", "LastName", "Email", "AccountId", "External_Id__c")),
    "Opportunity": ("006", ("Name", "StageName", "Amount", "AccountId")),
}

_counter = itertools.count(1)
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _base62(n: int, width: int) -> str:
    out = []
    while n:
        n, r = divmod(n, 62)
        out.append(_BASE62[r])
    return "".join(reversed(out)).rjust(width, "0")


class RecordError(Exception):
    """A REST-level data error: carries Salesforce's status and errorCode."""

    def __init__(self, status: int, code: str, message: str, fields: list[str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or []


@dataclass
class SObjectType:
    name: str
    key_prefix: str
    fields: list[str]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Rows by Id, in insertion order (which is also Id order)."""

    def field_name(self, name: str) -> str:
        """The declared spelling of a field, or :class:`RecordError` INVALID_FIELD."""
        lowered = name.lower()
        for declared in self.fields:
            if declared.lower() == lowered:
                return declared
        raise RecordError(
            400,
            "INVALID_FIELD",
            f"No such column '{name}' on entity '{self.name}'. If you are attempting to use a "
            "custom field, be sure to append the '__c' after the custom field name.",
            [name],
        )


class OrgData:
    """The sObjects of one org."""

    def __init__(self, api_version: str = "67.0") -> None:
        self.api_version = api_version
        self.types: dict[str, SObjectType] = {}
        self._journal: list[tuple[SObjectType, str, dict[str, Any] | None]] | None = None
        for name, (prefix, extra) in DEFAULT_OBJECTS.items():
            self.define(name, extra, key_prefix=prefix)

    def define(self, name: str, fields: tuple[str, ...] | list[str],
               key_prefix: str | None = None) -> SObjectType:
        """Declare (or extend) an object type with the given fields."""
        existing = self.types.get(name.lower())
        if existing is not None:
            for f in fields:
                if f.lower() not in (x.lower() for x in existing.fields):
                    existing.fields.append(f)
            return existing
        prefix = key_prefix or f"a{len(self.types):02d}"
        sobject = SObjectType(name, prefix, [*SYSTEM_FIELDS, *fields])
        self.types[name.lower()] = sobject
        return sobject

    def sobject(self, name: str) -> SObjectType:
        found = self.types.get(name.lower())
        if found is None:
            raise RecordError(404, "NOT_FOUND", "The requested resource does not exist")
        return found

    def _url(self, sobject: SObjectType, record_id: str) -> str:
        return f"/services/data/v{self.api_version}/sobjects/{sobject.name}/{record_id}"

    def _clean(self, sobject: SObjectType, values: dict[str, Any]) -> dict[str, Any]:
        cleaned: dict[str, Any] = {}
        for key, value in values.items():
            if key == "attributes":
                continue
            name = sobject.field_name(key)
            if name in SYSTEM_FIELDS:
                raise RecordError(
                    400, "INVALID_FIELD_FOR_INSERT_UPDATE",
                    f"Unable to create/update fields: {name}. Please check the security settings "
                    "of this field and verify that it is read/write for your profile or "
                    "permission set.", [name])
            if isinstance(value, dict | list):
                raise RecordError(400, "JSON_PARSER_ERROR",
                                  f"Cannot deserialize instance of field {name}")
            cleaned[name] = value
        return cleaned

    def begin(self) -> None:
        """Start recording changes so :meth:`rollback` can undo them (all or none)."""
        self._journal = []

    def commit(self) -> None:
        """Keep the changes made since :meth:`begin`."""
        self._journal = None

    def rollback(self) -> None:
        """Undo every change made since :meth:`begin`, newest first."""
        journal, self._journal = self._journal or [], None
        for sobject, record_id, before in reversed(journal):
            if before is None:
                sobject.rows.pop(record_id, None)
            else:
                sobject.rows[record_id] = before

    def _remember(self, sobject: SObjectType, record_id: str) -> None:
        if self._journal is not None:
            before = sobject.rows.get(record_id)
            self._journal.append((sobject, record_id, dict(before) if before else None))

    def insert(self, type_name: str, values: dict[str, Any], *, stamp: str = "") -> str:
        sobject = self.sobject(type_name)
        if any(k.lower() == "id" for k in values):
            raise RecordError(400, "INVALID_FIELD",
                              "The Id field should not be specified in the sobject data.", ["Id"])
        cleaned = self._clean(sobject, values)
        record_id = sobject.key_prefix + _base62(next(_counter), 15)
        row: dict[str, Any] = {f: None for f in sobject.fields}
        row.update(cleaned)
        row.update(Id=record_id, IsDeleted=False, CreatedDate=stamp, LastModifiedDate=stamp)
        self._remember(sobject, record_id)
        sobject.rows[record_id] = row
        return record_id

    def seed(self, type_name: str, rows: list[dict[str, Any]]) -> list[str]:
        """Insert many rows, declaring any field they use. Returns their Ids."""
        names: list[str] = []
        for row in rows:
            for key in row:
                if key not in names and key.lower() not in ("id", "attributes"):
                    names.append(key)
        self.define(type_name, names)
        return [self.insert(type_name, row) for row in rows]

    def _live_row(self, sobject: SObjectType, record_id: str) -> dict[str, Any]:
        row = sobject.rows.get(record_id)
        if row is None or row["IsDeleted"]:
            raise RecordError(404, "NOT_FOUND", "The requested resource does not exist")
        return row

    def shaped(self, sobject: SObjectType, row: dict[str, Any],
               fields: list[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attributes": {"type": sobject.name, "url": self._url(sobject, row["Id"])}
        }
        for name in fields if fields is not None else sobject.fields:
            out[name] = row[name]
        return out

    def get(self, type_name: str, record_id: str, fields: list[str] | None = None
            ) -> dict[str, Any]:
        sobject = self.sobject(type_name)
        row = self._live_row(sobject, record_id)
        names = [sobject.field_name(f) for f in fields] if fields else None
        return self.shaped(sobject, row, names)

    def update(self, type_name: str, record_id: str, values: dict[str, Any],
               *, stamp: str = "") -> None:
        sobject = self.sobject(type_name)
        row = self._live_row(sobject, record_id)
        cleaned = self._clean(sobject, values)
        self._remember(sobject, record_id)
        row.update(cleaned)
        row["LastModifiedDate"] = stamp

    def delete(self, type_name: str, record_id: str) -> None:
        sobject = self.sobject(type_name)
        row = self._live_row(sobject, record_id)
        self._remember(sobject, record_id)
        row["IsDeleted"] = True

    def find_by(self, type_name: str, field_name: str, value: Any) -> list[dict[str, Any]]:
        sobject = self.sobject(type_name)
        name = sobject.field_name(field_name)
        return [r for r in sobject.rows.values() if not r["IsDeleted"] and r[name] == value]

    def select(self, query: Query, *, include_deleted: bool) -> list[dict[str, Any]]:
        """Run a parsed query; raises :class:`RecordError` for unknown names."""
        sobject = self.types.get(query.sobject.lower())
        if sobject is None:
            raise RecordError(
                400, "INVALID_TYPE",
                f"sObject type '{query.sobject}' is not supported. If you are attempting to use "
                "a custom object, be sure to append the '__c' after the entity name.")
        names = [sobject.field_name(f) for f in query.fields]
        conditions = [(sobject.field_name(c.field), c) for c in query.where]
        rows = [
            r for r in sobject.rows.values()
            if (include_deleted or not r["IsDeleted"])
            and all(c.matches(r[name]) for name, c in conditions)
        ]
        if query.order_by is not None:
            key = sobject.field_name(query.order_by)
            # Salesforce sorts nulls first ascending; a tuple key keeps mixed
            # None/value columns comparable.
            rows.sort(key=lambda r: (r[key] is not None, r[key]), reverse=query.descending)
        if query.limit is not None:
            rows = rows[: query.limit]
        return [self.shaped(sobject, r, names) for r in rows]

    def describe(self, type_name: str) -> dict[str, Any]:
        sobject = self.sobject(type_name)
        base = f"/services/data/v{self.api_version}/sobjects/{sobject.name}"
        return {
            "name": sobject.name,
            "label": sobject.name,
            "keyPrefix": sobject.key_prefix,
            "custom": sobject.name.endswith("__c"),
            "createable": True,
            "updateable": True,
            "queryable": True,
            "fields": [
                {
                    "name": f,
                    "label": f,
                    "type": "id" if f == "Id" else "boolean" if f == "IsDeleted" else "string",
                    "updateable": f not in SYSTEM_FIELDS,
                    "createable": f not in SYSTEM_FIELDS,
                    "externalId": f.endswith("External_Id__c"),
                }
                for f in sobject.fields
            ],
            "urls": {"sobject": base, "describe": f"{base}/describe",
                     "rowTemplate": f"{base}/{{ID}}"},
            "childRelationships": [],
        }

    def describe_global(self) -> dict[str, Any]:
        return {
            "encoding": "UTF-8",
            "maxBatchSize": 200,
            "sobjects": [
                {"name": s.name, "label": s.name, "keyPrefix": s.key_prefix,
                 "custom": s.name.endswith("__c"), "queryable": True,
                 "urls": {"sobject": f"/services/data/v{self.api_version}/sobjects/{s.name}"}}
                for s in self.types.values()
            ],
        }


__all__ = ["SYSTEM_FIELDS", "OrgData", "RecordError", "SObjectType", "SoqlError"]
