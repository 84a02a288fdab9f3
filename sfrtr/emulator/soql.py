"""A small SOQL subset: enough to page, filter and sort seeded records.

Grammar (keywords case-insensitive)::

    SELECT field [, field ...] FROM Object
      [WHERE condition [AND condition ...]]
      [ORDER BY field [ASC|DESC]]
      [LIMIT n]

A condition is ``field = literal``, ``field != literal`` or ``field [NOT] IN
(literal, ...)``; a literal is a single-quoted string (with SOQL's escapes:
``\\'``, ``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t``, ``\\b``, ``\\f``), a number, a date or
datetime (kept as its text), ``true``, ``false`` or ``null``. Anything else
raises :class:`SoqlError`, which the REST layer answers as
``400 MALFORMED_QUERY``, as Salesforce does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^'\\]|\\.)*')
      | (?P<date>\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2}))?)
      | (?P<number>-?\d+(?:\.\d+)?)
      | (?P<op>!=|=|,|\(|\))
      | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
    )""",
    re.VERBOSE,
)


class SoqlError(ValueError):
    """The query is outside the supported subset or is not SOQL at all."""


_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", "'": "'", '"': '"',
             "\\": "\\"}


def _unescape(body: str) -> str:
    def one(m: re.Match[str]) -> str:
        found = _UNESCAPE.get(m.group(1))
        if found is None:
            raise SoqlError(f"invalid escape sequence \\{m.group(1)}")
        return found
    return re.sub(r"\\(.)", one, body, flags=re.DOTALL)


@dataclass(frozen=True)
class Condition:
    field: str
    negated: bool
    value: Any
    """The literal; for ``IN`` a tuple of literals."""
    in_list: bool = False

    def matches(self, found: Any) -> bool:
        hit = found in self.value if self.in_list else found == self.value
        return hit != self.negated


@dataclass(frozen=True)
class Query:
    fields: tuple[str, ...]
    sobject: str
    where: tuple[Condition, ...] = ()
    order_by: str | None = None
    descending: bool = False
    limit: int | None = None


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise SoqlError(f"unexpected token: {text[pos:].split()[0][:40]!r}")
        kind = m.lastgroup
        assert kind is not None
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek_word(self) -> str | None:
        if self.pos < len(self.tokens) and self.tokens[self.pos][0] == "word":
            return self.tokens[self.pos][1].upper()
        return None

    def take(self, kind: str) -> str:
        if self.pos >= len(self.tokens):
            raise SoqlError(f"unexpected end of query, expecting {kind}")
        got_kind, value = self.tokens[self.pos]
        if got_kind != kind:
            raise SoqlError(f"unexpected token: {value!r}")
        self.pos += 1
        return value

    def keyword(self, word: str) -> None:
        if self.peek_word() != word:
            found = self.tokens[self.pos][1] if self.pos < len(self.tokens) else "end of query"
            raise SoqlError(f"expecting {word}, found {found!r}")
        self.pos += 1

    def literal(self) -> Any:
        if self.pos >= len(self.tokens):
            raise SoqlError("unexpected end of query, expecting a value")
        kind, value = self.tokens[self.pos]
        self.pos += 1
        if kind == "string":
            return _unescape(value[1:-1])
        if kind == "date":
            return value
        if kind == "number":
            return float(value) if "." in value else int(value)
        if kind == "word" and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if kind == "word" and value.lower() == "null":
            return None
        raise SoqlError(f"unexpected token: {value!r}")

    def condition(self, name: str) -> Condition:
        negated = self.peek_word() == "NOT"
        if negated:
            self.pos += 1
        if self.peek_word() == "IN":
            self.pos += 1
            if self.take("op") != "(":
                raise SoqlError("expecting ( after IN")
            values = [self.literal()]
            while True:
                op = self.take("op")
                if op == ")":
                    break
                if op != ",":
                    raise SoqlError(f"unexpected token: {op!r}")
                values.append(self.literal())
            return Condition(name, negated, tuple(values), in_list=True)
        if negated:
            raise SoqlError("expecting IN after NOT")
        op = self.take("op")
        if op not in ("=", "!="):
            raise SoqlError(f"unexpected token: {op!r}")
        return Condition(name, op == "!=", self.literal())

    def parse(self) -> Query:
        self.keyword("SELECT")
        fields = [self.take("word")]
        while self.pos < len(self.tokens) and self.tokens[self.pos] == ("op", ","):
            self.pos += 1
            fields.append(self.take("word"))
        self.keyword("FROM")
        sobject = self.take("word")
        where: list[Condition] = []
        order_by: str | None = None
        descending = False
        limit: int | None = None
        if self.peek_word() == "WHERE":
            self.pos += 1
            while True:
                name = self.take("word")
                where.append(self.condition(name))
                if self.peek_word() != "AND":
                    break
                self.pos += 1
        if self.peek_word() == "ORDER":
            self.pos += 1
            self.keyword("BY")
            order_by = self.take("word")
            if self.peek_word() in ("ASC", "DESC"):
                descending = self.peek_word() == "DESC"
                self.pos += 1
        if self.peek_word() == "LIMIT":
            self.pos += 1
            raw = self.take("number")
            if "." in raw or int(raw) < 0:
                raise SoqlError(f"invalid LIMIT {raw!r}")
            limit = int(raw)
        if self.pos != len(self.tokens):
            raise SoqlError(f"unexpected token: {self.tokens[self.pos][1]!r}")
        return Query(tuple(fields), sobject, tuple(where), order_by, descending, limit)


def parse(text: str) -> Query:
    """Parse a query of the supported subset, or raise :class:`SoqlError`."""
    if not text or not text.strip():
        raise SoqlError("empty query")
    return _Parser(text).parse()
