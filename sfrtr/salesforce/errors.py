"""Salesforce REST errors, one class per common ``errorCode``."""

from __future__ import annotations

from typing import Any

from sfrtr.errors import SfrtrError


class SalesforceError(SfrtrError):
    """A REST call failed. ``error_code`` is Salesforce's (or ours for transport faults)."""

    def __init__(self, status: int, error_code: str, message: str,
                 fields: list[str] | None = None) -> None:
        super().__init__(f"{status} {error_code}: {message}")
        self.status = status
        self.error_code = error_code
        self.message = message
        self.fields = fields or []


class SessionExpired(SalesforceError):
    """401 again with a token newer than the one that failed."""


class NotFound(SalesforceError):
    pass


class MalformedQuery(SalesforceError):
    pass


class InvalidField(SalesforceError):
    pass


class RequestLimitExceeded(SalesforceError):
    pass


class ServerUnavailable(SalesforceError):
    pass


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
    if status == 503:
        return ServerUnavailable(status, "SERVER_UNAVAILABLE", "service unavailable")
    return InvalidResponse(status, "INVALID_RESPONSE",
                           "error answer not in Salesforce's [{message, errorCode}] shape")
