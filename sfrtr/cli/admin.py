"""Operations on stored grants: list customers and statuses, clear dead records.

Nothing here ever shows a token value; the CLI (``sfrtr status``, ``sfrtr
clear``) is a thin layer over these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

import orjson

from sfrtr.errors import RefusedToClear, StoreError
from sfrtr.records import Status, TokenRecord
from sfrtr.store.base import TokenStore

if TYPE_CHECKING:
    from sfrtr.store.etcd_client import EtcdClient


@dataclass(frozen=True, slots=True)
class CustomerStatus:
    """One customer's grant as an operator sees it: status, generation, lock, the
    refresh token's fingerprint (never its value)."""

    customer: str
    status: Status
    generation: int
    expires_at: float
    locked: bool
    reason: str
    refresh_fingerprint: str
    rescued: bool = False
    """Rescue entries exist: a late refresh's tokens may still revive the grant."""


async def list_status(store: TokenStore) -> list[CustomerStatus]:
    """Every stored customer, sorted by name."""
    out: list[CustomerStatus] = []
    for customer in sorted(await store.customers()):
        current = await store.read(customer)
        if current is None:
            continue
        r = current.record
        out.append(CustomerStatus(customer, r.status, r.generation, r.expires_at,
                                  current.locked, r.reason, r.refresh_token.fingerprint,
                                  current.rescued))
    return out


async def status_rows(client: EtcdClient, namespace: str, *, page_size: int = 5000
                      ) -> list[CustomerStatus]:
    """Every customer under an etcd ``namespace``, sorted by name, read with plain
    Range calls at one revision: no lease, no watch, nothing written (what ``sfrtr
    status`` runs, so that looking adds no session to a loaded cluster).

    A record sealed at rest (:mod:`sfrtr.store.sealing`) keeps its status,
    generation and expiry in the clear: its row shows them, and ``sealed`` for the
    refresh token's fingerprint (no key is needed to look).
    """
    prefix = f"{namespace}/".encode()
    records: dict[str, bytes] = {}
    locked: set[str] = set()
    rescued: set[str] = set()
    async for _, kvs in client.range_pages(prefix, page_size):
        for kv in kvs:
            # NS/tok/<customer>, NS/lock/<customer>, NS/rescue/<customer>/<fence>;
            # customers are percent-encoded in keys.
            kind, _, rest = kv.key[len(prefix):].decode().partition("/")
            if kind == "rescue":
                rest = rest.rpartition("/")[0]
            if not rest:
                continue
            customer = unquote(rest)
            if kind == "tok":
                records[customer] = kv.value
            elif kind == "lock":
                locked.add(customer)
            elif kind == "rescue":
                rescued.add(customer)
    out = []
    for customer in sorted(records):
        r, fingerprint = _readable(customer, records[customer])
        out.append(CustomerStatus(customer, r.status, r.generation, r.expires_at,
                                  customer in locked, r.reason, fingerprint,
                                  customer in rescued))
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
