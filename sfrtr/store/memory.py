"""The in-process store: the embedded default for a single worker process.

All operations run on the event loop without awaiting in between, so each one
is atomic. The lock has no lease: it lives as long as the process, which is
also how long this store's data lives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sfrtr.records import Intent, Status, TokenRecord, Versioned


class MemoryStore:
    def __init__(self) -> None:
        self._records: dict[str, tuple[TokenRecord, int]] = {}
        self._stamps: dict[str, int] = {}
        self._locked: set[str] = set()
        self._rescues: dict[str, dict[int, TokenRecord]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._revision = 0
        self._subscribers: list[Callable[[str, Versioned | None], None]] = []

    def subscribe(self, callback: Callable[[str, Versioned | None], None]) -> None:
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
        return self._view(customer)

    async def put(self, customer: str, record: TokenRecord) -> Versioned:
        self._rescues.pop(customer, None)  # a new grant: the old one's rescues are moot
        return self._store(customer, record, False)

    async def acquire(self, customer: str, expected_version: int,
                      intent: Intent) -> Versioned | None:
        found = self._records.get(customer)
        if found is None or found[1] != expected_version or customer in self._locked:
            return None
        return self._store(customer, found[0].replace(status=Status.REFRESHING, intent=intent),
                           True)

    async def commit(self, customer: str, fence: int, record: TokenRecord) -> Versioned | None:
        found = self._records.get(customer)
        if found is None or found[1] != fence:
            return None
        return self._store(customer, record, False)

    async def save_rescue(self, customer: str, fence: int, record: TokenRecord) -> None:
        self._rescues.setdefault(customer, {})[fence] = record
        self._bump(customer)

    async def rescues(self, customer: str) -> list[tuple[int, TokenRecord]]:
        return sorted(self._rescues.get(customer, {}).items())

    async def drop_rescue(self, customer: str, fence: int) -> None:
        entries = self._rescues.get(customer)
        if entries is not None and fence in entries:
            del entries[fence]
            if not entries:
                del self._rescues[customer]
            self._bump(customer)

    async def wait_for_change(self, customer: str, after: int,
                              timeout: float) -> Versioned | None:
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
        return list(self._records)

    def lease_remaining(self, lease: int | None = None) -> float | None:
        return None

    @property
    def lease_ttl(self) -> float:
        return 0.0

    async def aclose(self) -> None:
        return None
