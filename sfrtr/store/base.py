"""The store interface: the few atomic operations the refresh protocol needs.

A store keeps, per customer, one versioned :class:`~sfrtr.records.TokenRecord`,
a lock held by at most one live worker, and rescue entries. Every write that
matters is a compare on the record's version, so a stale writer can never
overwrite a newer truth; the version at which a worker took the lock is its
*fence*.

The protocol (``docs/protocol.md``) is written once, in the token manager,
against this interface; each store only maps these calls onto its own atomic
primitives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

from sfrtr.records import Intent, TokenRecord, Versioned


class RefreshOrder(NamedTuple):
    """A process's place in line to refresh a customer: what a store with a member
    list (etcd) answers from ``refresh_order(customer)``."""

    place: int
    """0: first; n: n live processes come before this one."""
    processes: int
    """Live processes in the namespace, this one included."""
    known: bool
    """Whether the first in line is the customer's last lock holder (a process known
    to use it), not only the first by hash."""


@runtime_checkable
class TokenStore(Protocol):
    async def read(self, customer: str) -> Versioned | None:
        """The current record, its version and whether the lock is held."""

    async def put(self, customer: str, record: TokenRecord) -> Versioned:
        """Write ``record`` unconditionally (a first grant, or a re-authorization).

        Any lock is released, rescues of the replaced grant are dropped, and any
        in-flight refresh is fenced out: its commit fails its compare (its tokens
        then go to a rescue that no one adopts: they belong to the old grant).
        """

    async def acquire(self, customer: str, expected_version: int,
                      intent: Intent) -> Versioned | None:
        """Take the lock and record the intent, in one atomic step.

        Succeeds only if the record is still at ``expected_version`` and no
        live worker holds the lock. The record is rewritten with status
        ``refreshing`` and ``intent``; the returned version is the fence.
        Returns ``None`` if the compare failed. A store whose answers can be
        lost recognises its own applied write by ``intent.id`` (a retried
        request whose first attempt landed) and returns it as a success.
        """

    async def commit(self, customer: str, fence: int, record: TokenRecord) -> Versioned | None:
        """Write ``record`` and release the lock, if the version is still ``fence``.

        Does not require the lock to still be held (the old refresh token is
        already burnt; dropping the new one would force a re-authorization).
        Returns ``None`` if the compare failed.
        """

    async def save_rescue(self, customer: str, fence: int, record: TokenRecord) -> None:
        """Keep tokens whose commit lost its compare, for the next holder to adopt."""

    async def rescues(self, customer: str) -> list[tuple[int, TokenRecord]]:
        """Rescue entries of ``customer`` as ``(fence, record)``, oldest fence first."""

    async def drop_rescue(self, customer: str, fence: int) -> None:
        """Forget one rescue entry (after adopting or superseding it)."""

    async def wait_for_change(self, customer: str, after: int,
                              timeout: float) -> Versioned | None:
        """Wait until anything kept for the customer changes after the state whose
        :attr:`~sfrtr.records.Versioned.stamp` is ``after`` (the record, the lock,
        a rescue entry); return the current state, ``None`` on timeout.

        Returns at once only if the stamp already moved: a caller that passes the
        stamp of what it last read never spins.
        """

    async def delete(self, customer: str, *, version: int | None = None) -> bool:
        """Remove the customer's record, lock and rescues; with ``version``, only if
        the record is still at that version. Returns whether it deleted."""

    async def customers(self) -> list[str]:
        """Every customer with a stored record."""

    def subscribe(self, callback: Callable[[str, Versioned | None], None]) -> None:
        """Call ``callback(customer, state)`` after every change to the record of a
        customer this process uses (has read or written), including changes made by
        other processes. ``None``: the record was deleted, or the store no longer keeps
        it current here (an idle customer let go), so a cached copy must be dropped.
        Keeps the token manager's cache current without reads; a store may also
        notify changes of customers this process never used."""

    def lease_remaining(self, lease: int | None = None) -> float | None:
        """Seconds this process can still count on its lock lease, or ``None``
        when the store has no leases (one process owns everything). With
        ``lease`` (the id a lock was bound to): 0 unless that lease is the one
        still held, since a lock dies with its lease even if a new one was granted."""

    @property
    def lease_ttl(self) -> float:
        """The lease's time to live, seconds (0 when the store has no leases)."""

    async def aclose(self) -> None:
        """Release the store's resources (connections, lease, watch)."""


@runtime_checkable
class OnceStore(Protocol):
    """A store that can remember a key for a while, for every process sharing it."""

    async def claim_once(self, key: str, ttl: float) -> bool:
        """``True`` for the first claim of ``key`` within ``ttl`` seconds, ``False`` for
        any later claim while it lasts, whichever process makes it (used for OAuth
        ``state`` nonces: a replayed callback fails on every worker). Atomic: of two
        concurrent claims exactly one wins."""
