"""Operations on stored grants: list customers and statuses, clear dead records.

Nothing here ever shows a token value; the CLI (``sfrtr status``, ``sfrtr
clear``) is a thin layer over these functions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import orjson

from sfrtr.errors import RefusedToClear, StoreError
from sfrtr.records import Status, TokenRecord
from sfrtr.store.base import TokenStore

if TYPE_CHECKING:
    from sfrtr.store.etcd_client import EtcdClient


@dataclass(frozen=True, slots=True)
class CustomerStatus:
    """One customer's grant as an operator sees it: status, generation, lock, last
    refresh, the host and app it belongs to, the refresh token's fingerprint (never
    its value)."""

    customer: str
    status: Status
    generation: int
    expires_at: float
    locked: bool
    reason: str
    refresh_fingerprint: str
    rescued: bool = False
    """Rescue entries exist: a late refresh's tokens may still revive the grant."""
    issued_at: float = 0.0
    """Epoch seconds of the last successful refresh (or of the grant)."""
    intent: bool = False
    """A refresh's intent is recorded (in flight, or left for recovery)."""
    rescues: int = 0
    """How many rescue entries wait (0 where the store only says whether any do)."""
    token_host: str = ""
    """The login host that issued the grant (empty: the workers' own ``login_url``)."""
    client_id: str = ""
    """The connected app of the grant (empty: the workers' own app)."""

    def idle_days(self, now: float) -> float:
        """Days since the last successful refresh, as of ``now`` (epoch seconds)."""
        return max(0.0, now - self.issued_at) / 86_400.0

    def last_refresh(self) -> str:
        """``issued_at`` as UTC time, ``YYYY-MM-DD HH:MM:SSZ``."""
        return datetime.fromtimestamp(self.issued_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")

    def as_json(self, now: float | None = None) -> dict[str, Any]:
        """The row as JSON-ready fields (what ``sfrtr status --json`` prints)."""
        now = time.time() if now is None else now
        return {"customer": self.customer, "status": self.status.value,
                "generation": self.generation, "reason": self.reason,
                "last_refresh": self.last_refresh(), "issued_at": self.issued_at,
                "idle_days": round(self.idle_days(now), 3), "expires_at": self.expires_at,
                "locked": self.locked, "intent": self.intent, "rescued": self.rescued,
                "rescues": self.rescues, "token_host": self.token_host,
                "client_id": self.client_id, "refresh_fingerprint": self.refresh_fingerprint}


async def list_status(store: TokenStore, customers: Iterable[str] | None = None
                      ) -> list[CustomerStatus]:
    """Every stored customer (or those of ``customers`` that are stored), sorted by
    name, through the store's own ``read`` (a sealed record needs the store's sealer)."""
    out: list[CustomerStatus] = []
    names = await store.customers() if customers is None else customers
    for customer in sorted(names):
        current = await store.read(customer)
        if current is None:
            continue
        r = current.record
        rescues = len(await store.rescues(customer))
        out.append(CustomerStatus(customer, r.status, r.generation, r.expires_at,
                                  current.locked, r.reason, r.refresh_token.fingerprint,
                                  current.rescued or rescues > 0, r.issued_at,
                                  r.intent is not None, rescues, r.token_host, r.client_id))
    return out


async def status_rows(client: EtcdClient, namespace: str, *, page_size: int = 5000,
                      customer: str | None = None) -> list[CustomerStatus]:
    """Every customer under an etcd ``namespace``, sorted by name, read with plain
    Range calls at one revision: no lease, no watch, nothing written (what ``sfrtr
    status`` runs, so that looking adds no session to a loaded cluster).

    ``customer``: that customer only, read with three Range calls (its record, its
    lock, its rescues) instead of the whole namespace.

    A record sealed at rest (:mod:`sfrtr.store.sealing`) keeps its status,
    generation and expiry in the clear: its row shows them, and ``sealed`` for the
    refresh token's fingerprint (no key is needed to look).
    """
    prefix = f"{namespace}/".encode()
    ranges = [prefix]
    if customer is not None:
        key = quote(customer, safe="")
        # A prefix, not a key: rescue entries sit under it (tok/acme also matches
        # tok/acme2, which the name check below drops).
        ranges = [prefix + f"{kind}/{key}".encode() for kind in ("tok", "lock", "rescue")]
    records: dict[str, bytes] = {}
    locked: set[str] = set()
    rescues: dict[str, int] = {}
    for start in ranges:
        async for _, kvs in client.range_pages(start, page_size):
            for kv in kvs:
                # NS/tok/<customer>, NS/lock/<customer>, NS/rescue/<customer>/<fence>;
                # customers are percent-encoded in keys.
                kind, _, rest = kv.key[len(prefix):].decode().partition("/")
                if kind == "rescue":
                    rest = rest.rpartition("/")[0]
                if not rest:
                    continue
                name = unquote(rest)
                if customer is not None and name != customer:
                    continue
                if kind == "tok":
                    records[name] = kv.value
                elif kind == "lock":
                    locked.add(name)
                elif kind == "rescue":
                    rescues[name] = rescues.get(name, 0) + 1
    out = []
    for name in sorted(records):
        r, fingerprint = _readable(name, records[name])
        count = rescues.get(name, 0)
        out.append(CustomerStatus(name, r.status, r.generation, r.expires_at,
                                  name in locked, r.reason, fingerprint, count > 0,
                                  r.issued_at, r.intent is not None, count, r.token_host,
                                  r.client_id))
    return out


def _readable(customer: str, raw: bytes) -> tuple[TokenRecord, str]:
    """The record's clear fields and its refresh token's fingerprint (``sealed``
    when the tokens are sealed at rest)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise StoreError(f"the record of customer {customer!r} is not JSON") from None
    if isinstance(data, dict) and "sealed" in data:
        # The secrets are in the ciphertext; stand-ins let the clear fields be read.
        plain = {"instance_url": "", **data, "access_token": "-", "refresh_token": "-"}
        return TokenRecord.from_dict(plain), "sealed"
    record = TokenRecord.from_dict(data)
    return record, record.refresh_token.fingerprint


async def clear(store: TokenStore, customer: str, *, force: bool = False) -> Status | None:
    """Delete a customer's record (and rescues) after it was marked ``reauth_required``.

    Returns the status that was cleared (``None``: nothing was stored). A
    record in any other status is kept unless ``force`` is given: it holds
    the only copy of a live refresh token.
    """
    current = await store.read(customer)
    if current is None:
        return None
    status = current.record.status
    if status is not Status.REAUTH_REQUIRED and not force:
        raise RefusedToClear(f"customer {customer!r} is {status.value}, not reauth_required: "
                             "clearing would discard a live grant", forceable=True)
    if not force and (current.rescued or await store.rescues(customer)):
        # A worker fenced out mid-refresh kept the family's newest tokens: the next
        # read of the customer revives the grant with them.
        raise RefusedToClear(f"customer {customer!r} has rescued tokens that may revive it: "
                             "ask for its token once", forceable=True)
    # Delete the version we judged, not whatever is there now: a record revived in
    # between (a rescue adopted, a re-authorization) holds a live grant.
    if not await store.delete(customer, version=current.version):
        raise RefusedToClear(f"customer {customer!r} changed while clearing: look again",
                             forceable=False)
    return status


__all__ = ["CustomerStatus", "RefusedToClear", "clear", "list_status", "status_rows"]
