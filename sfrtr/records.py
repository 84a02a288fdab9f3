"""The token record: what sfrtr stores per customer, immutable.

A record carries both tokens, where to send the access token, and the
bookkeeping of the refresh protocol (status, generation, intent). Its repr
shows fingerprints only.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from sfrtr.errors import StoreError
from sfrtr.secret import Secret


class Status(enum.StrEnum):
    VALID = "valid"
    """Usable; refresh when the access token is near its estimated expiry."""
    REFRESHING = "refreshing"
    """A worker announced (with an intent) that it is redeeming the refresh token."""
    INDETERMINATE = "indeterminate"
    """A redemption's outcome is unknown; the recovery policy must decide."""
    REAUTH_REQUIRED = "reauth_required"
    """The grant is dead; the customer must authorize again."""
    SUSPENDED = "suspended"
    """The grant is alive (its refresh token is stored) but its last answer could not be
    used (a bad signature, an instance URL outside the policy): no access token is handed
    out, and no refresh is tried before ``refresh_after``. An operator fixes the
    configuration; no re-authorization is needed."""


@dataclass(frozen=True, slots=True)
class Intent:
    """Written, durably, before a refresh token is presented to the provider.

    It outlives the worker that wrote it: whoever finds it with no live lock
    knows a redemption of ``refresh_fingerprint`` may have happened.
    """

    worker: str
    refresh_fingerprint: str
    started_at: float
    """When the token was first put up for redemption, on the provider's clock as its
    writer measured it (0: unknown, the writer had no answer to measure by). Only
    ``reuse_window`` recovery reads it; waits use the local monotonic clock."""
    lease: int = 0
    """The store's lease id of the writer (0 where the store has none)."""
    id: str = ""
    """A nonce naming this one acquisition, so its writer recognises it when the
    store's answer to the acquire was lost (the Txn applied, the reply did not arrive)."""
    limit: float = 0.0
    """The longest the writer's token request can last, seconds (its timeout, answer
    graces and lease margin): a recoverer waits at least this long after the writer's
    lock is gone, whatever its own configuration says."""


@dataclass(frozen=True, slots=True, repr=False)
class TokenRecord:
    access_token: Secret
    refresh_token: Secret
    instance_url: str
    issued_at: float
    """When the access token was issued, epoch seconds."""
    expires_at: float
    """Estimated expiry of the access token, epoch seconds (Salesforce sends none)."""
    generation: int = 0
    """How many refreshes produced this record; grows by one per rotation."""
    status: Status = Status.VALID
    identity_url: str = ""
    scope: str = ""
    intent: Intent | None = None
    reason: str = ""
    """Why the record is not valid (human-readable, never a token)."""
    grant_id: str = ""
    """Names one authorization. Rotations keep it; a re-authorization gets a new one, so
    a refresh of the old grant that lands late can never pass for the new grant."""
    refresh_after: float = 0.0
    """Provider-clock epoch seconds before which no refresh is tried: set when a refresh
    could not help (a refreshed session refused again, an answer that was not usable)."""
    backoff: float = 0.0
    """The length of that backoff, seconds: each worker also holds back this long from
    when it first sees it, on its own monotonic clock (clocks may disagree)."""
    token_host: str = ""
    """The login host that issued the grant (a sandbox, a My Domain): its refreshes,
    introspection and revocation go there. Empty: the manager's own ``login_url``
    (records written before hosts were recorded)."""
    client_id: str = ""
    """The connected app the grant belongs to. Empty: the manager's own app."""

    def replace(self, **changes: Any) -> TokenRecord:
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        return (
            f"TokenRecord(status={self.status.value}, generation={self.generation}, "
            f"access={self.access_token.fingerprint}, refresh={self.refresh_token.fingerprint}, "
            f"instance_url={self.instance_url!r}, expires_at={self.expires_at:.0f})"
        )

    __str__ = __repr__

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form for stores (token values included: stores hold secrets)."""
        out: dict[str, Any] = {
            "access_token": self.access_token.reveal(),
            "refresh_token": self.refresh_token.reveal(),
            "instance_url": self.instance_url,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "generation": self.generation,
            "status": self.status.value,
            "identity_url": self.identity_url,
            "scope": self.scope,
            "reason": self.reason,
            "grant_id": self.grant_id,
            "refresh_after": self.refresh_after,
            "backoff": self.backoff,
        }
        if self.token_host:
            out["token_host"] = self.token_host
        if self.client_id:
            out["client_id"] = self.client_id
        if self.intent is not None:
            intent = self.intent
            out["intent"] = {"worker": intent.worker,
                             "refresh_fingerprint": intent.refresh_fingerprint,
                             "started_at": intent.started_at, "lease": intent.lease,
                             "id": intent.id, "limit": intent.limit}
        return out

    @classmethod
    def from_dict(cls, data: Any) -> TokenRecord:
        """Rebuild a record a store wrote; :class:`StoreError` if it is malformed."""
        try:
            intent = data.get("intent")
            return cls(
                access_token=Secret(data["access_token"]),
                refresh_token=Secret(data["refresh_token"]),
                instance_url=_str(data["instance_url"]),
                issued_at=float(data["issued_at"]),
                expires_at=float(data["expires_at"]),
                generation=int(data["generation"]),
                status=Status(data["status"]),
                identity_url=_str(data.get("identity_url", "")),
                scope=_str(data.get("scope", "")),
                reason=_str(data.get("reason", "")),
                grant_id=_str(data.get("grant_id", "")),
                refresh_after=float(data.get("refresh_after", 0.0)),
                backoff=float(data.get("backoff", 0.0)),
                token_host=_str(data.get("token_host", "")),
                client_id=_str(data.get("client_id", "")),
                intent=None if intent is None else Intent(
                    worker=_str(intent["worker"]),
                    refresh_fingerprint=_str(intent["refresh_fingerprint"]),
                    started_at=float(intent["started_at"]),
                    lease=int(intent.get("lease", 0)),
                    id=_str(intent.get("id", "")),
                    limit=float(intent.get("limit", 0.0))),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(f"malformed token record in store ({type(exc).__name__})") from None


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


@dataclass(frozen=True, slots=True)
class Versioned:
    """A record as a store read it: its version (the fence) and lock state."""

    record: TokenRecord
    version: int
    locked: bool = False
    """A live worker holds the customer's refresh lock right now."""
    stamp: int = 0
    """Moves whenever anything the store keeps for the customer changes: the record,
    the lock (a lease expiry included) or its rescues. Waiters pass the stamp of what
    they last saw to ``wait_for_change``, so a wait never returns for a change they
    have already seen (0: the store did not say; the version stands in)."""
    rescued: bool = False
    """Rescue entries exist for the customer (tokens a fenced-out commit kept)."""

    def __post_init__(self) -> None:
        if self.stamp == 0:
            object.__setattr__(self, "stamp", self.version)
