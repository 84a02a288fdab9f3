"""Salesforce REST errors, one class per common ``errorCode``."""

from __future__ import annotations

from typing import Any

from sfrtr.errors import SfrtrError
from sfrtr.salesforce.limits import LimitInfo


class SalesforceError(SfrtrError):
    """A REST call failed. ``error_code`` is Salesforce's (or ours for transport faults)."""

    def __init__(self, status: int, error_code: str, message: str,
                 fields: list[str] | None = None) -> None:
        super().__init__(f"{status} {error_code}: {message}")
        self.status = status
        self.error_code = error_code
        self.message = message
        self.fields = fields or []
        self.retry_after: float | None = None
        """Seconds the answer's ``Retry-After`` asked us to wait, if it had one."""


class SessionExpired(SalesforceError):
    """401 again with a token newer than the one that failed."""


class NotFound(SalesforceError):
    """The record or resource does not exist (``NOT_FOUND``)."""


class MalformedQuery(SalesforceError):
    """The SOQL or SOSL text does not parse (``MALFORMED_QUERY``)."""


class InvalidField(SalesforceError):
    """A field or object name is unknown (``INVALID_FIELD``, ``INVALID_TYPE``)."""


class RequestLimitExceeded(SalesforceError):
    """The org's daily API allowance is spent (``403 REQUEST_LIMIT_EXCEEDED``).

    Never retried: retrying cannot help until the org's rolling 24-hour usage
    drops. ``limit_info`` is the last usage Salesforce reported, if any.
    """

    def __init__(self, status: int, error_code: str, message: str,
                 fields: list[str] | None = None) -> None:
        super().__init__(status, error_code, message, fields)
        self.limit_info: LimitInfo | None = None


class ServerUnavailable(SalesforceError):
    """503/429, a dropped connection or a timeout: retried for idempotent calls."""


class InvalidResponse(SalesforceError):
    """The answer was not what Salesforce sends (not JSON, wrong shape, a redirect)."""


_BY_CODE: dict[str, type[SalesforceError]] = {
    "INVALID_SESSION_ID": SessionExpired,
    "NOT_FOUND": NotFound,
    "MALFORMED_QUERY": MalformedQuery,
    "INVALID_FIELD": InvalidField,
    "INVALID_TYPE": InvalidField,
    "REQUEST_LIMIT_EXCEEDED": RequestLimitExceeded,
    "SERVER_UNAVAILABLE": ServerUnavailable,
}


def error_from(status: int, body: Any) -> SalesforceError:
    """The exception for a non-2xx answer whose JSON body was ``body``."""
    if isinstance(body, list) and body and isinstance(body[0], dict):
        first = body[0]
        code = first.get("errorCode")
        message = first.get("message")
        fields = first.get("fields")
        if isinstance(code, str) and isinstance(message, str):
            kind = _BY_CODE.get(code, SalesforceError)
            return kind(status, code, message[:500],
                        [f for f in fields if isinstance(f, str)] if isinstance(fields, list)
                        else None)
    if status == 404:
        return NotFound(status, "NOT_FOUND", "The requested resource does not exist")
    if status in (429, 503):
        return ServerUnavailable(status, "SERVER_UNAVAILABLE", "service unavailable")
    return InvalidResponse(status, "INVALID_RESPONSE",
                           "error answer not in Salesforce's [{message, errorCode}] shape")
