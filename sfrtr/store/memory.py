"""The in-process store: the embedded default for a single worker process.

All operations run on the event loop without awaiting in between, so each one
is atomic. The lock has no lease: it lives as long as the process, which is
also how long this store's data lives.

A forked child (gunicorn's workers, ``multiprocessing``) would get a copy of
the store and refresh on its own, presenting the same refresh tokens as its
siblings: the naive pattern Salesforce punishes with a revocation. So a store
created before a ``fork()`` refuses to work in the child.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import Callable
from types import TracebackType

from sfrtr.errors import ConfigurationError
from sfrtr.protocol import refreshing_record
from sfrtr.records import Intent, TokenRecord, Versioned

_LIVE: weakref.WeakSet[MemoryStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_LIVE):
        store._forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class MemoryStore:
    """The in-process :class:`~sfrtr.store.TokenStore` (one process's alone).
    Nothing to start; ``async with MemoryStore() as store`` works as for the others."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._forked = False
        _LIVE.add(self)
        self._records: dict[str, tuple[TokenRecord, int]] = {}
        self._stamps: dict[str, int] = {}
        self._locked: set[str] = set()
        self._rescues: dict[str, dict[int, TokenRecord]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._revision = 0
        self._subscribers: list[Callable[[str, Versioned | None], None]] = []
        self._claims: dict[str, float] = {}

    def _refuse_if_forked(self) -> None:
        if self._forked:
            raise ConfigurationError(
                f"this MemoryStore was created in process {self._pid} and is used in "
                f"process {os.getpid()}, a fork of it: each process would keep its own copy "
                "of the tokens and refresh them on its own, presenting the same refresh "
                "token twice (Salesforce revokes the grant). Several processes need a "
                "shared store: SqliteStore (one host) or EtcdStore (many hosts), created "
                "in each process after the fork")

    def subscribe(self, callback: Callable[[str, Versioned | None], None]) -> None:
        self._refuse_if_forked()
        self._subscribers.append(callback)

    def _store(self, customer: str, record: TokenRecord, locked: bool) -> Versioned:
        if locked:
            self._locked.add(customer)
        else:
            self._locked.discard(customer)
        version = self._bump(customer)
        self._records[customer] = (record, version)
        state = self._view(customer)
        assert state is not None
        for callback in self._subscribers:
            callback(customer, state)
        return state

    def _bump(self, customer: str) -> int:
        self._revision += 1
        self._stamps[customer] = self._revision
        event = self._changed.pop(customer, None)
        if event is not None:
            event.set()
        return self._revision

    def _view(self, customer: str) -> Versioned | None:
        found = self._records.get(customer)
        if found is None:
            return None
        return Versioned(found[0], found[1], customer in self._locked,
                         stamp=self._stamps[customer], rescued=bool(self._rescues.get(customer)))

    async def read(self, customer: str) -> Versioned | None:
        self._refuse_if_forked()
        return self._view(customer)

    async def put(self, customer: str, record: TokenRecord) -> Versioned:
        self._refuse_if_forked()
        self._rescues.pop(customer, None)  # a new grant: the old one's rescues are moot
        return self._store(customer, record, False)

    async def acquire(self, customer: str, expected_version: int,
                      intent: Intent) -> Versioned | None:
        self._refuse_if_forked()
        found = self._records.get(customer)
        if found is None or found[1] != expected_version or customer in self._locked:
            return None
        return self._store(customer, refreshing_record(found[0], intent), True)

    async def commit(self, customer: str, fence: int, record: TokenRecord) -> Versioned | None:
        self._refuse_if_forked()
        found = self._records.get(customer)
        if found is None or found[1] != fence:
            return None
        return self._store(customer, record, False)

    async def save_rescue(self, customer: str, fence: int, record: TokenRecord) -> None:
        self._refuse_if_forked()
        self._rescues.setdefault(customer, {})[fence] = record
        self._bump(customer)

    async def reseal_rescue(self, customer: str, fence: int, record: TokenRecord) -> bool:
        """Replace a rescue entry only if it still exists (what rekey uses)."""
        self._refuse_if_forked()
        entries = self._rescues.get(customer)
        if entries is None or fence not in entries:
            return False
        entries[fence] = record
        return True

    async def rescues(self, customer: str) -> list[tuple[int, TokenRecord]]:
        self._refuse_if_forked()
        return sorted(self._rescues.get(customer, {}).items())

    async def drop_rescue(self, customer: str, fence: int) -> None:
        self._refuse_if_forked()
        entries = self._rescues.get(customer)
        if entries is not None and fence in entries:
            del entries[fence]
            if not entries:
                del self._rescues[customer]
            self._bump(customer)

    async def wait_for_change(self, customer: str, after: int,
                              timeout: float) -> Versioned | None:
        self._refuse_if_forked()
        current = self._view(customer)
        if current is None or current.stamp != after:
            return current
        event = self._changed.setdefault(customer, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return None
        return self._view(customer)

    async def delete(self, customer: str, *, version: int | None = None) -> bool:
        self._refuse_if_forked()
        found = self._records.get(customer)
        if version is not None and found is not None and found[1] != version:
            return False
        self._records.pop(customer, None)
        self._locked.discard(customer)
        self._rescues.pop(customer, None)
        self._bump(customer)
        for callback in self._subscribers:
            callback(customer, None)
        return True

    async def customers(self) -> list[str]:
        self._refuse_if_forked()
        return list(self._records)

    async def rescued_customers(self) -> list[str]:
        """Every customer with rescue entries, with a record or not."""
        self._refuse_if_forked()
        return sorted(c for c, entries in self._rescues.items() if entries)

    def lease_remaining(self, lease: int | None = None) -> float | None:
        return None

    @property
    def lease_ttl(self) -> float:
        return 0.0

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def claim_once(self, key: str, ttl: float) -> bool:
        """True for the first claim of ``key`` within ``ttl`` seconds (this process's)."""
        self._refuse_if_forked()
        now = time.monotonic()
        if len(self._claims) > 1000:
            self._claims = {k: t for k, t in self._claims.items() if t > now}
        if self._claims.get(key, 0.0) > now:
            return False
        self._claims[key] = now + ttl
        return True
