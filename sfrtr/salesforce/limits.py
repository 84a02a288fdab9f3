"""The org's API budget as Salesforce reports it, and how long it asks us to wait.

Every REST answer carries ``Sforce-Limit-Info: api-usage=N/M`` (calls used in
the last 24 hours, and the org's daily limit). The usage is per org, not per
:class:`~sfrtr.Client`: every client of one manager and customer shares one
:class:`ApiUsage` entry, so ``client.limit_info`` is current whichever client
made the last call, and :func:`api_usage` lists every customer seen.
"""

from __future__ import annotations

import email.utils
import re
import time
import weakref
from dataclasses import dataclass

# Anchored: ``per-app-api-usage=2/100(appName=x)`` is the connected app's own
# budget, not the org's, and must not be read as ``api-usage``.
_LIMIT_INFO = re.compile(r"(?:^|[\s,])api-usage=(\d+)/(\d+)")

#: The longest ``Retry-After`` honoured; a longer one fails the call instead of
#: parking a coroutine for minutes.
MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True, slots=True)
class LimitInfo:
    """The org's API usage, from the last ``Sforce-Limit-Info`` header."""

    used: int
    limit: int

    @property
    def remaining(self) -> int:
        """Calls left in the org's rolling 24-hour allowance (never negative)."""
        return max(0, self.limit - self.used)


def parse_limit_info(header: str | None) -> LimitInfo | None:
    """``LimitInfo`` from a ``Sforce-Limit-Info`` value, or None without ``api-usage``."""
    m = _LIMIT_INFO.search(header or "")
    return LimitInfo(int(m.group(1)), int(m.group(2))) if m else None


def parse_retry_after(header: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta seconds or an HTTP date)."""
    if not header:
        return None
    value = header.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class ApiUsage:
    """The last known :class:`LimitInfo` of each customer (one table per manager).

    Every answer carries the header but few callers read it, so :meth:`note`
    only checks the raw value (one regex search, a quarter of a parse) and
    keeps it; it becomes a :class:`LimitInfo` when :meth:`get` or
    :meth:`snapshot` asks. A value without a readable ``api-usage`` is not
    kept, so the last usage reported stays, as if parsed on arrival.
    """

    def __init__(self) -> None:
        self._by_customer: dict[str, LimitInfo] = {}
        self._raw: dict[str, str] = {}
        self._exhausted: dict[str, float] = {}

    def get(self, customer: str) -> LimitInfo | None:
        """The customer's last reported usage, or None before its first answer."""
        raw = self._raw.pop(customer, None)
        if raw is not None:
            self._parse(customer, raw)
        return self._by_customer.get(customer)

    def _parse(self, customer: str, raw: str) -> None:
        info = parse_limit_info(raw)
        if info is not None:
            self._by_customer[customer] = info

    def note(self, customer: str, header: str | None) -> None:
        """Keep an answer's ``Sforce-Limit-Info`` value for ``customer``, unparsed."""
        if header is not None and _LIMIT_INFO.search(header):
            self._raw[customer] = header

    def record(self, customer: str, info: LimitInfo) -> None:
        """Remember the usage an answer for ``customer`` reported."""
        self._raw.pop(customer, None)
        self._by_customer[customer] = info

    def exhausted(self, customer: str, until: float) -> None:
        """Note that the org refused with ``REQUEST_LIMIT_EXCEEDED`` (monotonic ``until``)."""
        self._exhausted[customer] = until

    def exhausted_until(self, customer: str) -> float | None:
        """Until when (monotonic) calls for ``customer`` are held back, if they are."""
        return self._exhausted.get(customer)

    def held_back(self, customer: str) -> float | None:
        """Seconds calls for ``customer`` are still held back, or None if they are not."""
        if not self._exhausted:
            return None
        until = self._exhausted.get(customer)
        if until is None:
            return None
        left = until - time.monotonic()
        if left > 0:
            return left
        del self._exhausted[customer]
        return None

    def snapshot(self) -> dict[str, LimitInfo]:
        """Every customer's last usage, as a new dict."""
        for customer, raw in list(self._raw.items()):
            del self._raw[customer]
            self._parse(customer, raw)
        return dict(self._by_customer)


_TABLES: weakref.WeakKeyDictionary[object, ApiUsage] = weakref.WeakKeyDictionary()


def usage_table(manager: object) -> ApiUsage:
    """The :class:`ApiUsage` shared by every client of ``manager``."""
    table = _TABLES.get(manager)
    if table is None:
        table = _TABLES[manager] = ApiUsage()
    return table


def api_usage(manager: object) -> dict[str, LimitInfo]:
    """The last reported API usage of every customer called through ``manager``.

    ``{customer: LimitInfo}``; ``info.remaining`` is the number of calls left
    in the org's daily allowance as of that customer's last answer.
    """
    return usage_table(manager).snapshot()
