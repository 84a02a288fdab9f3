"""Judge a store against the emulator: which lockouts were needless, what is unsettled.

Invariant 4 says a customer is marked ``reauth_required`` only when its
stored refresh token is provably unusable. The emulator knows the truth
(:meth:`~sfrtr.emulator.Emulator.refresh_token_state`), so a fault run can
count **unjustified lockouts**: customers marked ``reauth_required`` whose
stored refresh token is still live at the emulator, or who hold a live token
in a rescue entry that nobody adopted. It also says whether every customer
has *settled*: valid with a live refresh token, or justifiably dead.

Only fingerprints leave this module: reports never carry a token value.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sfrtr.emulator.server import Emulator
from sfrtr.emulator.token_state import TokenState
from sfrtr.records import Status
from sfrtr.store.base import TokenStore

StateLookup = Callable[[str], TokenState]
"""A refresh token's state by its fingerprint."""


@dataclass(frozen=True)
class Verdict:
    customer: str
    status: str
    """The record's status, or ``"missing"``."""
    token_state: TokenState
    """The emulator's view of the stored refresh token."""
    live_rescue: bool = False
    """A rescue entry of this customer holds a refresh token that is live."""
    access_live: bool | None = None
    """Whether the stored access token still works (``None``: not known)."""

    @property
    def unjustified_lockout(self) -> bool:
        return self.status == Status.REAUTH_REQUIRED.value and (
            self.token_state is TokenState.LIVE or self.live_rescue)

    @property
    def settled(self) -> bool:
        """Valid with a live refresh token, or dead with no live token anywhere."""
        if self.status == Status.VALID.value:
            return self.token_state is TokenState.LIVE
        if self.status == Status.REAUTH_REQUIRED.value:
            return not self.unjustified_lockout
        return False


@dataclass(frozen=True)
class LockoutAudit:
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def unjustified_lockouts(self) -> list[str]:
        """Customers marked ``reauth_required`` although a live refresh token exists."""
        return [v.customer for v in self.verdicts if v.unjustified_lockout]

    @property
    def reauth_required(self) -> list[str]:
        return [v.customer for v in self.verdicts if v.status == Status.REAUTH_REQUIRED.value]

    @property
    def unsettled(self) -> list[str]:
        return [v.customer for v in self.verdicts if not v.settled]

    @property
    def valid_but_dead(self) -> list[str]:
        """``valid`` records whose refresh token no longer works (a lost successor)."""
        return [v.customer for v in self.verdicts
                if v.status == Status.VALID.value and v.token_state is not TokenState.LIVE]

    @property
    def stale_access(self) -> list[str]:
        """``valid`` records whose access token is dead: the next call must refresh."""
        return [v.customer for v in self.verdicts
                if v.status == Status.VALID.value and v.access_live is False]

    @property
    def settled(self) -> bool:
        return not self.unsettled

    def by_status(self) -> dict[str, int]:
        return dict(Counter(v.status for v in self.verdicts))

    def summary(self) -> dict[str, object]:
        """JSON-ready figures (customer names, never tokens)."""
        return {
            "customers": len(self.verdicts),
            "by_status": self.by_status(),
            "reauth_required": len(self.reauth_required),
            "unjustified_lockouts": len(self.unjustified_lockouts),
            "unjustified_customers": self.unjustified_lockouts,
            "valid_but_dead": len(self.valid_but_dead),
            "unsettled": len(self.unsettled),
            "stale_access": len(self.stale_access),
        }


def _lookup(source: Emulator | StateLookup) -> StateLookup:
    if isinstance(source, Emulator):
        emulator = source
        return lambda fp: emulator.refresh_token_state(fingerprint=fp)
    return source


async def audit_lockouts(store: TokenStore, emulator: Emulator | StateLookup,
                         customers: Iterable[str] | None = None) -> LockoutAudit:
    """Read each customer's record (and rescues) and judge it against the emulator.

    ``customers`` defaults to every customer in the store; a listed customer
    with no record is reported with status ``"missing"``.
    """
    state_of = _lookup(emulator)
    world = emulator.world if isinstance(emulator, Emulator) else None
    names = list(customers) if customers is not None else await store.customers()
    verdicts = []
    for name in names:
        current = await store.read(name)
        if current is None:
            verdicts.append(Verdict(name, "missing", TokenState.UNKNOWN))
            continue
        record = current.record
        live_rescue = any(state_of(r.refresh_token.fingerprint) is TokenState.LIVE
                          for _, r in await store.rescues(name))
        access_live = None
        if world is not None:
            token = world.access_index.get(record.access_token.reveal())
            access_live = token is not None and world.access_alive(token, time.time())
        verdicts.append(Verdict(name, str(record.status.value),
                                state_of(record.refresh_token.fingerprint), live_rescue,
                                access_live))
    return LockoutAudit(verdicts)
