"""sfrtr: share Salesforce OAuth grants safely across asyncio workers.

Salesforce rotates refresh tokens and treats a reused one as theft. sfrtr
makes sure each refresh token is presented at most once across every
coroutine, process and host, and that a rotated token is never silently lost.

The public API is what this module exports; everything else is private.
"""

import logging
from typing import TYPE_CHECKING, Any

from sfrtr.errors import (
    ConfigurationError,
    CoordinationTimeout,
    GrantSuspended,
    InvalidTokenResponse,
    LeaseLost,
    MissingExtra,
    NotConnected,
    OAuthError,
    ReauthorizationRequired,
    RefreshIndeterminate,
    RefusedToClear,
    SessionRefused,
    SfrtrError,
    StoreError,
    TokenEndpointUnavailable,
)

if TYPE_CHECKING:
    from sfrtr.hooks import Hooks
    from sfrtr.keeper import IdleKeeper, KeeperReport
    from sfrtr.loop_stall import LoopStallMonitor
    from sfrtr.manager import Credentials, ManagerStats, TokenManager
    from sfrtr.oauth import (
        InstanceUrlPolicy,
        Introspection,
        OAuthClient,
        OAuthConfig,
        OutcomeKind,
        RefreshOutcome,
        TokenGrant,
    )
    from sfrtr.oauth_state import InvalidState
    from sfrtr.policy import RecoveryMode, RefreshPolicy
    from sfrtr.records import Intent, Status, TokenRecord, Versioned
    from sfrtr.salesforce import (
        DEFAULT_API_VERSION,
        BulkJobFailed,
        Client,
        ClientCredentials,
        Collections,
        InvalidField,
        InvalidResponse,
        JwtBearer,
        LimitInfo,
        MalformedQuery,
        NotFound,
        QueryResult,
        RecordError,
        RecordResult,
        RequestLimitExceeded,
        Response,
        RetryPolicy,
        SalesforceError,
        ServerTokenSource,
        ServerUnavailable,
        SessionExpired,
        TokenSource,
        UpsertResult,
        api_usage,
        format_soql,
        like_contains,
        soql_literal,
    )
    from sfrtr.secret import Secret, fingerprint
    from sfrtr.singleflight import Singleflight
    from sfrtr.store import MemoryStore, OnceStore, SqliteStore, TokenStore
    from sfrtr.store.etcd import EtcdStore
    from sfrtr.store.etcd_client import EtcdSettings
    from sfrtr.store.postgres import PostgresStore
    from sfrtr.store.sealing import KeyRing, RekeyReport, Sealer, SealingError, rekey

__version__ = "0.1.0"

# A library prints nothing unless the application configures logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())

# Every public name but the errors is imported on first use (PEP 562): most of them
# pull in aiohttp (a quarter of a second of start-up), which ``import sfrtr``, ``sfrtr
# --version`` or an error handler never need. ``from sfrtr import X`` and ``sfrtr.X``
# work as before; type checkers read the imports above.
_MODULES: dict[str, tuple[str, ...]] = {
    "sfrtr.hooks": ("Hooks",),
    "sfrtr.keeper": ("IdleKeeper", "KeeperReport"),
    "sfrtr.loop_stall": ("LoopStallMonitor",),
    "sfrtr.manager": ("Credentials", "ManagerStats", "TokenManager"),
    "sfrtr.oauth": (
        "InstanceUrlPolicy", "Introspection", "OAuthClient", "OAuthConfig", "OutcomeKind",
        "RefreshOutcome", "TokenGrant",
    ),
    "sfrtr.oauth_state": ("InvalidState",),
    "sfrtr.policy": ("RecoveryMode", "RefreshPolicy"),
    "sfrtr.records": ("Intent", "Status", "TokenRecord", "Versioned"),
    "sfrtr.salesforce": (
        "DEFAULT_API_VERSION", "BulkJobFailed", "Client", "ClientCredentials", "Collections",
        "InvalidField", "InvalidResponse", "JwtBearer", "LimitInfo", "MalformedQuery", "NotFound",
        "QueryResult", "RecordError", "RecordResult", "RequestLimitExceeded", "Response",
        "RetryPolicy", "SalesforceError", "ServerTokenSource", "ServerUnavailable",
        "SessionExpired", "TokenSource", "UpsertResult", "api_usage", "format_soql",
        "like_contains", "soql_literal",
    ),
    "sfrtr.secret": ("Secret", "fingerprint"),
    "sfrtr.singleflight": ("Singleflight",),
    "sfrtr.store": ("MemoryStore", "OnceStore", "SqliteStore", "TokenStore"),
    "sfrtr.store.sealing": ("KeyRing", "RekeyReport", "Sealer", "SealingError", "rekey"),
    "sfrtr.store.etcd": ("EtcdStore",),
    "sfrtr.store.etcd_client": ("EtcdSettings",),
    "sfrtr.store.postgres": ("PostgresStore",),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}
_EXTRA = {"EtcdStore": "etcd", "EtcdSettings": "etcd", "PostgresStore": "postgres"}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'sfrtr' has no attribute {name!r}")
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # The etcd store needs the ``etcd`` extra (aetcd, grpcio), the Postgres store
        # the ``postgres`` extra (asyncpg): name the extra, not the missing module.
        if name not in _EXTRA or (exc.name or "").partition(".")[0] == "sfrtr":
            raise
        raise MissingExtra(f"sfrtr.{name}", _EXTRA[name], exc.name) from exc
    value = getattr(module, name)
    if name not in _EXTRA:
        # Later lookups are plain attribute reads. Not for the extras' names: an extra
        # uninstalled later (tests do that) must be named again, as before.
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "DEFAULT_API_VERSION",
    "BulkJobFailed",
    "Client",
    "ClientCredentials",
    "Collections",
    "ConfigurationError",
    "CoordinationTimeout",
    "Credentials",
    "EtcdSettings",
    "EtcdStore",
    "GrantSuspended",
    "Hooks",
    "IdleKeeper",
    "InstanceUrlPolicy",
    "Intent",
    "Introspection",
    "InvalidField",
    "InvalidResponse",
    "InvalidState",
    "InvalidTokenResponse",
    "JwtBearer",
    "KeeperReport",
    "KeyRing",
    "LeaseLost",
    "LimitInfo",
    "LoopStallMonitor",
    "MalformedQuery",
    "ManagerStats",
    "MemoryStore",
    "MissingExtra",
    "NotConnected",
    "NotFound",
    "OAuthClient",
    "OAuthConfig",
    "OAuthError",
    "OnceStore",
    "OutcomeKind",
    "PostgresStore",
    "QueryResult",
    "ReauthorizationRequired",
    "RecordError",
    "RecordResult",
    "RecoveryMode",
    "RefreshIndeterminate",
    "RefreshOutcome",
    "RefreshPolicy",
    "RefusedToClear",
    "RekeyReport",
    "RequestLimitExceeded",
    "Response",
    "RetryPolicy",
    "SalesforceError",
    "Sealer",
    "SealingError",
    "Secret",
    "ServerTokenSource",
    "ServerUnavailable",
    "SessionExpired",
    "SessionRefused",
    "SfrtrError",
    "Singleflight",
    "SqliteStore",
    "Status",
    "StoreError",
    "TokenEndpointUnavailable",
    "TokenGrant",
    "TokenManager",
    "TokenRecord",
    "TokenSource",
    "TokenStore",
    "UpsertResult",
    "Versioned",
    "__version__",
    "api_usage",
    "fingerprint",
    "format_soql",
    "like_contains",
    "rekey",
    "soql_literal",
]
