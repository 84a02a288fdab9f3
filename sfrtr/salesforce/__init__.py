"""The Salesforce API of one customer's org: REST client, errors, SOQL literals.

``sfrtr`` re-exports the public names; import them from there. One module per
API family: ``client`` (the request path, queries, single records), ``errors``,
``soql`` (literals that cannot inject).
"""

from sfrtr.salesforce.client import (
    DEFAULT_API_VERSION,
    Client,
    LimitInfo,
    QueryResult,
    Response,
    RetryPolicy,
    UpsertResult,
)
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

__all__ = [
    "DEFAULT_API_VERSION",
    "Client",
    "InvalidField",
    "InvalidResponse",
    "LimitInfo",
    "MalformedQuery",
    "NotFound",
    "QueryResult",
    "RequestLimitExceeded",
    "Response",
    "RetryPolicy",
    "SalesforceError",
    "ServerUnavailable",
    "SessionExpired",
    "UpsertResult",
]
