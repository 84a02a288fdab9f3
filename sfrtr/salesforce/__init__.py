"""The Salesforce API of one customer's org: REST client, errors, SOQL literals.

``sfrtr`` re-exports the public names; import them from there. One module per
API family: ``client`` (the request path, queries, single records, composite,
Apex REST), ``collections`` (sObject Collections), ``bulk`` (Bulk API 2.0),
``errors``, ``limits`` (API usage, Retry-After), ``soql`` (literals that cannot
inject), ``versions`` (API version negotiation), ``server_flows`` (JWT bearer
and client credentials tokens).
"""

from sfrtr.salesforce.bulk import (
    Bulk,
    BulkJobFailed,
    IngestResult,
    JobInfo,
    QueryJob,
    WaitPolicy,
)
from sfrtr.salesforce.client import (
    DEFAULT_API_VERSION,
    Client,
    QueryResult,
    Response,
    RetryPolicy,
    TokenSource,
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
from sfrtr.salesforce.server_flows import ClientCredentials, JwtBearer, ServerTokenSource
from sfrtr.salesforce.soql import format_soql, like_contains
from sfrtr.salesforce.soql import literal as soql_literal

__all__ = [
    "DEFAULT_API_VERSION",
    "Bulk",
    "BulkJobFailed",
    "Client",
    "ClientCredentials",
    "Collections",
    "IngestResult",
    "InvalidField",
    "InvalidResponse",
    "JobInfo",
    "JwtBearer",
    "LimitInfo",
    "MalformedQuery",
    "NotFound",
    "QueryJob",
    "QueryResult",
    "RecordError",
    "RecordResult",
    "RequestLimitExceeded",
    "Response",
    "RetryPolicy",
    "SalesforceError",
    "ServerTokenSource",
    "ServerUnavailable",
    "SessionExpired",
    "TokenSource",
    "UpsertResult",
    "WaitPolicy",
    "api_usage",
    "format_soql",
    "like_contains",
    "soql_literal",
]
