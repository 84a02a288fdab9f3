"""Operations on stored grants: list customers and statuses, clear dead records.

Nothing here ever shows a token value; the CLI (``sfrtr status``, ``sfrtr
clear``) is a thin layer over these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from sfrtr.errors import SfrtrError
from sfrtr.records import Status
from sfrtr.store.base import TokenStore


@dataclass(frozen=True, slots=True)
class CustomerStatus:
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


class RefusedToClear(SfrtrError):
    """Clearing would throw away a usable grant."""


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
        raise RefusedToClear(f"customer {customer!r} is {status.value}, not reauth_required; "
                             "clearing would discard a live grant (use force to insist)")
    if not force and (current.rescued or await store.rescues(customer)):
        # A worker fenced out mid-refresh kept the family's newest tokens: the next
        # read of the customer revives the grant with them.
        raise RefusedToClear(f"customer {customer!r} has rescued tokens that may revive it; "
                             "ask for its token once, or use force to insist")
    # Delete the version we judged, not whatever is there now: a record revived in
    # between (a rescue adopted, a re-authorization) holds a live grant.
    if not await store.delete(customer, version=current.version):
        raise RefusedToClear(f"customer {customer!r} changed while clearing; look again")
    return status
