"""CSV as Bulk API 2.0 speaks it, a record at a time, in constant memory.

Writing: rows (mappings) become RFC 4180 records with the job's line ending;
``None`` becomes ``#N/A`` (Bulk API's null: it clears the field), booleans
``true``/``false``, dates and datetimes ISO 8601 (datetimes in UTC).

Reading: byte chunks as they arrive become complete records. A record ends at
a newline outside quotes; since ``"`` and ``\\n`` are single bytes in UTF-8 and
a quoted field always holds an even number of ``"``, a record is complete when
the quotes counted since its start are even. No record is ever split, and no
more than one record plus one chunk is held.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

NULL = "#N/A"
LINE_ENDINGS = {"LF": "\n", "CRLF": "\r\n"}


def cell(value: Any) -> str:
    """One value as Bulk API 2.0 expects it in a CSV cell."""
    if value is None:
        return NULL
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("a naive datetime is ambiguous; give it a timezone")
        utc = value.astimezone(dt.UTC)
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str):
        if value == NULL:
            raise ValueError("the text '#N/A' is Bulk API's null; pass None to clear a field")
        return value
    if isinstance(value, int | float):
        return str(value)
    raise TypeError(f"no CSV cell for a {type(value).__name__}")


class RowEncoder:
    """Encodes mappings as CSV records under a fixed header."""

    def __init__(self, fields: Sequence[str], line_ending: str = "LF") -> None:
        if line_ending not in LINE_ENDINGS:
            raise ValueError("line_ending is 'LF' or 'CRLF'")
        if not fields or len(set(fields)) != len(fields):
            raise ValueError("the header needs distinct field names")
        self.fields = list(fields)
        self._known = frozenset(fields)
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, lineterminator=LINE_ENDINGS[line_ending])

    def _render(self, values: Iterable[str]) -> bytes:
        self._buffer.seek(0)
        self._buffer.truncate()
        self._writer.writerow(values)
        return self._buffer.getvalue().encode()

    def header(self) -> bytes:
        """The header record."""
        return self._render(self.fields)

    def row(self, row: Mapping[str, Any]) -> bytes:
        """One record; a missing field is an empty cell (left unchanged on update)."""
        if not self._known.issuperset(row):
            extra = sorted(set(row) - self._known)
            raise ValueError(f"fields not in the header: {', '.join(extra)}")
        return self._render(cell(row[f]) if f in row else "" for f in self.fields)


async def records(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Complete CSV records (each with its line ending) from arbitrary byte chunks."""
    pending: list[bytes] = []
    quotes = 0
    async for chunk in chunks:
        pieces = chunk.split(b"\n")
        for piece in pieces[:-1]:
            pending.append(piece)
            pending.append(b"\n")
            quotes += piece.count(b'"')
            if quotes % 2 == 0:
                yield b"".join(pending)
                pending.clear()
                quotes = 0
        last = pieces[-1]
        if last:
            pending.append(last)
            quotes += last.count(b'"')
    if pending:
        yield b"".join(pending)


async def rows(chunks: AsyncIterable[bytes], *, batch: int = 1000
               ) -> AsyncIterator[dict[str, str]]:
    """Dicts keyed by the header record, from CSV byte chunks (empty cells are ``""``)."""
    header: list[str] | None = None
    pending: list[str] = []
    async for record in records(chunks):
        if header is None:
            header = next(csv.reader([record.decode("utf-8-sig")]), None)
            continue
        pending.append(record.decode())
        if len(pending) >= batch:
            for values in csv.reader(pending):
                if values:
                    yield dict(zip(header, values, strict=False))
            pending.clear()
    for values in csv.reader(pending):
        if values and header is not None:
            yield dict(zip(header, values, strict=False))


__all__ = ["LINE_ENDINGS", "NULL", "RowEncoder", "cell", "records", "rows"]
