"""The Salesforce API of one customer's org: REST client, errors, SOQL literals.

``sfrtr`` re-exports the public names; import them from there. One module per
API family: ``client`` (the request path, queries, single records, composite,
Apex REST), ``collections`` (sObject Collections), ``bulk`` (Bulk API 2.0),
``errors``, ``limits`` (API usage, Retry-After), ``soql`` (literals that cannot
inject), ``versions`` (API version negotiation).
"""

from sfrtr.salesforce.client import (
    DEFAULT_API_VERSION,
    Client,
    QueryResult,
    Response,
    RetryPolicy,
    UpsertResult,
)
from sfrtr.salesforce.collections import Collections, RecordError, RecordResult
from sfrtr.salesforce.errors import (
    InvalidField,
    InvalidResponse,
    MalformedQuery,
    NotFound,
    RequestLimitExceeded,
    SalesforceError,
    ServerUnavailable,
    SessionExpired,
)
from sfrtr.salesforce.limits import LimitInfo, api_usage
from sfrtr.salesforce.soql import format_soql, like_contains
from sfrtr.salesforce.soql import literal as soql_literal

__all__ = [
    "DEFAULT_API_VERSION",
    "Client",
    "Collections",
    "InvalidField",
    "InvalidResponse",
    "LimitInfo",
    "MalformedQuery",
    "NotFound",
    "QueryResult",
    "RecordError",
    "RecordResult",
    "RequestLimitExceeded",
    "Response",
    "RetryPolicy",
    "SalesforceError",
    "ServerUnavailable",
    "SessionExpired",
    "UpsertResult",
    "api_usage",
    "format_soql",
    "like_contains",
    "soql_literal",
]
