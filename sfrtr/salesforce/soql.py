"""SOQL literals that user input cannot break out of.

SOQL has no bind parameters over REST, so values end up inside the query
text. :func:`literal` renders one Python value as a SOQL literal, and
:func:`format_soql` fills ``{}`` placeholders of a template with literals::

    format_soql("SELECT Id FROM Contact WHERE Email = {} AND CreatedDate > {}",
                email, since)

A string is always quoted and every character that could end it (a quote, a
backslash) or that SOQL cannot carry raw (newline, tab, ...) is escaped, so the
rendered literal is one token whatever the input: ``x' OR Name != '`` stays a
string that matches nothing, instead of widening the ``WHERE`` clause.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import string
from collections.abc import Iterable
from typing import Any

# SOQL's escape sequences for string literals (the Salesforce SOQL reference,
# "Quoted String Escape Sequences"). Everything else is literal text.
_ESCAPES = str.maketrans({
    "\\": "\\\\",
    "'": "\\'",
    '"': '\\"',
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",
    "\f": "\\f",
})

# In a LIKE pattern ``%`` and ``_`` are wildcards; escaped, they match themselves.
_LIKE_ESCAPES = str.maketrans({"%": "\\%", "_": "\\_"})


class Like:
    """A LIKE pattern: ``%`` and ``_`` are wildcards, everything else is literal text.

    ``Like("Acme%")`` matches names starting with "Acme"; build patterns from
    user input with :func:`like_contains` or :func:`like_prefix`, which escape the
    input's own ``%`` and ``_``.
    """

    __slots__ = ("body",)

    def __init__(self, pattern: str) -> None:
        _no_nul(pattern)
        self.body = pattern.translate(_ESCAPES)

    def __repr__(self) -> str:
        return f"Like({self.body!r})"


def _like_text(text: str) -> str:
    _no_nul(text)
    return text.translate(_ESCAPES).translate(_LIKE_ESCAPES)


def _no_nul(value: str) -> None:
    if "\x00" in value:
        raise ValueError("a SOQL string cannot hold a NUL character")


def quote_string(value: str) -> str:
    """``value`` as a quoted SOQL string literal."""
    _no_nul(value)
    return "'" + value.translate(_ESCAPES) + "'"


def like_contains(text: str) -> Like:
    """A LIKE pattern matching values that contain ``text`` literally.

    ``%`` and ``_`` in ``text`` are escaped, so user input cannot become a
    wildcard: ``format_soql("... WHERE Name LIKE {}", like_contains(q))``.
    """
    pattern = Like("")
    pattern.body = "%" + _like_text(text) + "%"
    return pattern


def like_prefix(text: str) -> Like:
    """A LIKE pattern matching values that start with ``text`` literally."""
    pattern = Like("")
    pattern.body = _like_text(text) + "%"
    return pattern


def literal(value: Any) -> str:
    """``value`` rendered as a SOQL literal.

    - ``str``: quoted, with quotes, backslashes and control characters escaped;
    - ``bool``: ``true`` / ``false``; ``None``: ``null``;
    - ``int``, ``float`` (finite), ``Decimal``: as a number;
    - ``datetime.datetime`` (timezone-aware): ``2024-05-01T12:00:00Z`` in UTC;
      a naive datetime is refused, since SOQL would read it as UTC silently;
    - ``datetime.date``: ``2024-05-01``;
    - a list, tuple, set or frozenset (for ``IN``): ``('a', 'b')``, never empty.

    Anything else raises ``TypeError``: it has no safe rendering.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Like):
        return "'" + value.body + "'"
    if isinstance(value, str):
        return quote_string(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("SOQL has no literal for NaN or infinity")
        return repr(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ValueError("SOQL has no literal for NaN or infinity")
        return format(value, "f")
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("a naive datetime is ambiguous; give it a timezone")
        utc = value.astimezone(dt.UTC)
        text = utc.strftime("%Y-%m-%dT%H:%M:%S")
        if utc.microsecond:
            text += f".{utc.microsecond // 1000:03d}"
        return text + "Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        if not items:
            raise ValueError("an IN list needs at least one value")
        rendered = [literal(item) for item in items]
        if any(r.startswith("(") for r in rendered):
            raise TypeError("IN lists cannot nest")
        return "(" + ", ".join(rendered) + ")"
    raise TypeError(f"no SOQL literal for a {type(value).__name__}")


class _Formatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if format_spec:
            raise ValueError("format specs are not allowed in SOQL templates")
        return literal(value)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:
            raise ValueError("conversions (!r, !s) are not allowed in SOQL templates")
        return value


_FORMATTER = _Formatter()


def format_soql(template: str, *args: Any, **kwargs: Any) -> str:
    """Fill the ``{}`` / ``{name}`` placeholders of ``template`` with SOQL literals.

    Each value goes through :func:`literal`; literal braces are written
    ``{{`` and ``}}``. Field and object names are not values: they are never
    taken from a placeholder (use a fixed list of allowed names instead).
    """
    return _FORMATTER.vformat(template, args, kwargs)


def in_list(values: Iterable[Any]) -> str:
    """An ``IN`` list of literals from any iterable (``ValueError`` if empty)."""
    return literal(list(values))


__all__ = ["Like", "format_soql", "in_list", "like_contains", "like_prefix", "literal",
           "quote_string"]
