"""The etcd store: the cross-process, cross-host guarantee.

Keys under a namespace ``NS``::

    NS/tok/<customer>            the token record (no lease)
    NS/lock/<customer>           the refresh lock, bound to this process's lease
    NS/rescue/<customer>/<fence> tokens whose commit lost its compare

The record's version is its ``mod_revision``. Acquire (lock + intent) and
commit (record + unlock) are one Txn each, so an uncontended refresh costs
two round trips: reads come from a mirror of the namespace that one prefix
watch keeps current, and waiters wake from that watch, never by polling.
See ``docs/protocol.md`` for the invariant each step protects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, unquote

import orjson

from sfrtr.errors import LeaseLost, StoreError
from sfrtr.records import Intent, Status, TokenRecord, Versioned
from sfrtr.store.etcd_client import (
    KV,
    EtcdClient,
    EtcdSettings,
    TxnResult,
    WatchBatch,
    compare,
    delete,
    get,
    put,
)

log = logging.getLogger("sfrtr.etcd")

Subscriber = Callable[[str, Versioned | None], None]


@dataclass
class _Mirror:
    """What this process knows of one customer, and as of which revision."""

    record: TokenRecord | None = None
    version: int = 0
    locked: bool = False
    observed: int = 0
    """The store revision this view is known to be current at."""
    changed: int = 0
    """The revision of the last change seen to any of the customer's keys."""


def _encode(record: TokenRecord) -> bytes:
    return orjson.dumps(record.to_dict())


def _decode(raw: bytes) -> TokenRecord:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise StoreError("malformed token record in etcd (not JSON)") from None
    return TokenRecord.from_dict(data)


class EtcdStore:
    """A :class:`~sfrtr.store.TokenStore` on etcd v3. One per process.

    Starts itself on first use (lease, keepalive, watch); call
    :meth:`aclose` (or the manager's) to revoke the lease and stop.
    """

    def __init__(self, settings: EtcdSettings | None = None, *, namespace: str = "sfrtr",
                 lease_ttl: int = 30) -> None:
        if not namespace or namespace.endswith("/"):
            raise ValueError("namespace must be non-empty and not end with '/'")
        if lease_ttl < 2:
            raise ValueError("lease_ttl must be at least 2 seconds")
        self.client = EtcdClient(settings or EtcdSettings())
        self.namespace = namespace
        self._prefix = f"{namespace}/".encode()
        self._requested_ttl = lease_ttl
        self._ttl = float(lease_ttl)
        self._lease_id: int | None = None
        self._lease_deadline = 0.0
        self._lease_ready = asyncio.Event()
        self._mirror: dict[str, _Mirror] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._synced = False
        self._watch_from = 0
        self._subscribers: list[Subscriber] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._start_lock = asyncio.Lock()
        self._grant_lock = asyncio.Lock()
        self._started = False
        self._closed = False

    # -- keys ----------------------------------------------------------------

    def _tok(self, customer: str) -> bytes:
        return self._prefix + b"tok/" + quote(customer, safe="").encode()

    def _lock(self, customer: str) -> bytes:
        return self._prefix + b"lock/" + quote(customer, safe="").encode()

    def _rescue_prefix(self, customer: str) -> bytes:
        return self._prefix + b"rescue/" + quote(customer, safe="").encode() + b"/"

    def _parse_key(self, key: bytes) -> tuple[str, str] | None:
        if not key.startswith(self._prefix):
            return None
        kind, _, rest = key[len(self._prefix):].decode().partition("/")
        if kind == "rescue":
            rest = rest.rpartition("/")[0]
        if kind not in ("tok", "lock", "rescue") or not rest:
            return None
        return kind, unquote(rest)

    # -- life cycle ------------------------------------------------------------

    async def start(self) -> None:
        """Connect, take the session lease, load the mirror and start the watch."""
        async with self._start_lock:
            if self._started:
                return
            if self._closed:
                raise StoreError("the store is closed")
            await self.client.connect()
            await self._grant()
            await self._resync()
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._keepalive_loop()),
                           loop.create_task(self._watch_loop())]
            self._started = True

    async def _ensure(self) -> None:
        if not self._started:
            await self.start()

    async def aclose(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._lease_id is not None and self._started:
            with contextlib.suppress(StoreError, LeaseLost):
                await self.client.revoke(self._lease_id)
        self._lease_id = None
        self._started = False
        await self.client.close()

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback(customer, state)`` whenever a record changes (``None``: deleted)."""
        self._subscribers.append(callback)

    # -- the lease -------------------------------------------------------------

    @property
    def lease_ttl(self) -> float:
        return self._ttl

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    def lease_remaining(self) -> float | None:
        if self._lease_id is None:
            return 0.0
        return max(0.0, self._lease_deadline - time.monotonic())

    async def _grant(self) -> None:
        asked = time.monotonic()
        lease_id, ttl = await self.client.grant(self._requested_ttl)
        self._lease_id, self._ttl = lease_id, float(ttl)
        self._lease_deadline = asked + ttl  # timed from the request: never optimistic
        self._lease_ready.set()
        log.info("etcd lease %x granted (ttl %ss)", lease_id, ttl)

    def _lose_lease(self, why: str) -> None:
        if self._lease_id is not None:
            log.warning("etcd lease %x lost: %s", self._lease_id, why)
        self._lease_id = None
        self._lease_deadline = 0.0
        self._lease_ready.clear()

    async def _keepalive_loop(self) -> None:
        while not self._closed:
            try:
                if self._lease_id is None:
                    await self._grant()
                await self._keepalive_stream()
            except (StoreError, LeaseLost) as exc:
                log.info("etcd keepalive interrupted: %s", type(exc).__name__)
            if self._lease_id is not None and time.monotonic() >= self._lease_deadline:
                self._lose_lease("no keepalive answer before the deadline")
            await asyncio.sleep(min(1.0, self._ttl / 6))

    async def _keepalive_stream(self) -> None:
        stream = await self.client.keepalive()
        try:
            while self._lease_id is not None and not self._closed:
                lease_id = self._lease_id
                sent = time.monotonic()
                ttl = await stream.ping(lease_id, timeout=self._ttl / 3)
                if ttl is None:
                    return
                if ttl <= 0:
                    if lease_id == self._lease_id:
                        self._lose_lease("keepalive answered without a TTL")
                    return
                if lease_id == self._lease_id:
                    self._lease_deadline = sent + ttl
                await asyncio.sleep(self._ttl / 3)
        finally:
            stream.close()

    async def _live_lease(self) -> int:
        """The lease to bind a new lock to: the current one if it has time left,
        else a fresh grant (a process that was paused comes back without one)."""
        async with self._grant_lock:
            if self._lease_id is None or self.lease_remaining() == 0:
                self._lose_lease("deadline passed")
                await self._grant()
            assert self._lease_id is not None
            return self._lease_id

    # -- the mirror and the watch --------------------------------------------

    async def _resync(self) -> None:
        revision, kvs = await self.client.range(self._prefix, prefix=True)
        fresh: dict[str, _Mirror] = {}
        for kv in kvs:
            parsed = self._parse_key(kv.key)
            if parsed is None:
                continue
            kind, customer = parsed
            m = fresh.setdefault(customer, _Mirror(observed=revision))
            if kind == "tok":
                with contextlib.suppress(StoreError):
                    m.record = _decode(kv.value)
                m.version = kv.mod_revision
            elif kind == "lock":
                m.locked = True
            m.changed = max(m.changed, kv.mod_revision)
        for customer, old in self._mirror.items():
            if customer not in fresh:  # deleted while we were not watching
                fresh[customer] = _Mirror(observed=revision, changed=revision)
            elif (old.version, old.locked) != (fresh[customer].version, fresh[customer].locked):
                fresh[customer].changed = revision
        self._mirror = fresh
        self._watch_from = revision + 1
        self._synced = True
        for customer in list(self._waiters):
            self._wake(customer)
        for customer, m in fresh.items():
            self._notify(customer, m)

    async def _watch_loop(self) -> None:
        while not self._closed:
            try:
                if not self._synced:
                    await self._resync()
                async for batch in self.client.watch_prefix(self._prefix, self._watch_from):
                    if batch.compacted:
                        log.warning("etcd watch history compacted; resynchronizing")
                        self._synced = False
                        break
                    self._apply_batch(batch)
            except StoreError as exc:
                log.info("etcd watch interrupted (%s); resynchronizing", exc)
                self._synced = False
                await asyncio.sleep(0.2)

    def _apply_batch(self, batch: WatchBatch) -> None:
        for event in batch.events:
            parsed = self._parse_key(event.kv.key)
            if parsed is None:
                continue
            kind, customer = parsed
            revision = event.kv.mod_revision
            m = self._mirror.setdefault(customer, _Mirror())
            m.changed = max(m.changed, revision)
            if revision > m.observed:
                if kind == "tok":
                    if event.kind == "put":
                        try:
                            m.record = _decode(event.kv.value)
                        except StoreError as exc:
                            log.error("customer %s: %s", customer, exc)
                            m.record = None
                        m.version = revision
                    else:
                        m.record, m.version = None, 0
                    self._notify(customer, m)
                elif kind == "lock":
                    m.locked = event.kind == "put"
            self._wake(customer)
        self._watch_from = max(self._watch_from, batch.revision + 1)
        for m in self._mirror.values():
            m.observed = max(m.observed, batch.revision)

    def _observe(self, customer: str, revision: int, tok: list[KV], lock: list[KV]) -> _Mirror:
        """Fold a direct read (or a Txn's ranges) at ``revision`` into the mirror."""
        m = self._mirror.setdefault(customer, _Mirror())
        if revision >= m.observed:
            if tok:
                m.record = _decode(tok[0].value)
                m.version = tok[0].mod_revision
            else:
                m.record, m.version = None, 0
            m.locked = bool(lock)
            m.observed = revision
            m.changed = max(m.changed, m.version, lock[0].mod_revision if lock else 0)
        return m

    def _wrote(self, customer: str, revision: int, record: TokenRecord | None,
               locked: bool) -> None:
        m = self._mirror.setdefault(customer, _Mirror())
        if revision >= m.observed:
            m.record, m.version, m.locked, m.observed = record, revision, locked, revision
            m.changed = max(m.changed, revision)
            self._notify(customer, m)
        self._wake(customer)

    def _wake(self, customer: str) -> None:
        event = self._waiters.pop(customer, None)
        if event is not None:
            event.set()

    def _notify(self, customer: str, m: _Mirror) -> None:
        state = None if m.record is None else Versioned(m.record, m.version, m.locked)
        for callback in self._subscribers:
            try:
                callback(customer, state)
            except Exception:  # a subscriber's bug must not stop the watch
                log.exception("store subscriber failed")

    @staticmethod
    def _view(m: _Mirror | None) -> Versioned | None:
        if m is None or m.record is None:
            return None
        return Versioned(m.record, m.version, m.locked)

    # -- TokenStore --------------------------------------------------------------

    async def read(self, customer: str) -> Versioned | None:
        await self._ensure()
        if self._synced:
            known = self._view(self._mirror.get(customer))
            # A record the mirror holds is at worst stale, which a compare
            # catches; one it lacks may be brand new and still on its way.
            if known is not None:
                return known
        result = await self.client.txn([], [get(self._tok(customer)), get(self._lock(customer))])
        return self._view(self._observe(customer, result.revision, *result.ranges))

    async def put(self, customer: str, record: TokenRecord) -> Versioned:
        await self._ensure()
        result = await self.client.txn(
            [], [put(self._tok(customer), _encode(record)), delete(self._lock(customer))])
        self._wrote(customer, result.revision, record, False)
        return Versioned(record, result.revision, False)

    async def acquire(self, customer: str, expected_version: int,
                      intent: Intent) -> Versioned | None:
        await self._ensure()
        current = self._mirror.get(customer)
        if current is None or current.record is None:
            return None
        lease = await self._live_lease()
        intent = Intent(intent.worker, intent.refresh_fingerprint, intent.started_at, lease)
        # The record body comes from the version we compare against: if the
        # compare holds, this is exactly the record at expected_version.
        if current.version != expected_version:
            await self._refresh_view(customer)
            return None
        record = current.record.replace(status=Status.REFRESHING, intent=intent)
        tok, lock = self._tok(customer), self._lock(customer)
        try:
            result = await self.client.txn(
                [compare(tok, "mod", "==", expected_version), compare(lock, "create", "==", 0)],
                [put(lock, intent.worker.encode(), lease), put(tok, _encode(record))],
                [get(tok), get(lock)])
        except LeaseLost:
            self._lose_lease("etcd refused it for a write")
            raise
        if not result.succeeded:
            self._observe(customer, result.revision, *result.ranges)
            return None
        self._wrote(customer, result.revision, record, True)
        return Versioned(record, result.revision, True)

    async def _refresh_view(self, customer: str) -> None:
        result = await self.client.txn([], [get(self._tok(customer)), get(self._lock(customer))])
        self._observe(customer, result.revision, *result.ranges)

    async def commit(self, customer: str, fence: int, record: TokenRecord) -> Versioned | None:
        await self._ensure()
        tok = self._tok(customer)
        result: TxnResult = await self.client.txn(
            [compare(tok, "mod", "==", fence)],
            [put(tok, _encode(record)), delete(self._lock(customer))],
            [get(tok), get(self._lock(customer))])
        if not result.succeeded:
            self._observe(customer, result.revision, *result.ranges)
            return None
        self._wrote(customer, result.revision, record, False)
        return Versioned(record, result.revision, False)

    async def save_rescue(self, customer: str, fence: int, record: TokenRecord) -> None:
        await self._ensure()
        await self.client.txn([], [put(self._rescue_prefix(customer) + b"%020d" % fence,
                                       _encode(record))])

    async def rescues(self, customer: str) -> list[tuple[int, TokenRecord]]:
        await self._ensure()
        _, kvs = await self.client.range(self._rescue_prefix(customer), prefix=True)
        found: list[tuple[int, TokenRecord]] = []
        for kv in kvs:
            try:
                found.append((int(kv.key.rpartition(b"/")[2]), _decode(kv.value)))
            except (ValueError, StoreError):
                log.error("customer %s: unreadable rescue entry skipped", customer)
        return sorted(found, key=lambda item: item[0])

    async def drop_rescue(self, customer: str, fence: int) -> None:
        await self._ensure()
        await self.client.txn([], [delete(self._rescue_prefix(customer) + b"%020d" % fence)])

    async def wait_for_change(self, customer: str, after_version: int,
                              timeout: float) -> Versioned | None:
        await self._ensure()
        deadline = time.monotonic() + timeout
        while True:
            m = self._mirror.get(customer)
            if m is not None and m.changed > after_version:
                return await self.read(customer)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            event = self._waiters.setdefault(customer, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                return None
            if not self._synced:
                return await self.read(customer)

    async def delete(self, customer: str) -> None:
        await self._ensure()
        result = await self.client.txn([], [
            delete(self._tok(customer)), delete(self._lock(customer)),
            delete(self._rescue_prefix(customer), prefix=True)])
        self._wrote(customer, result.revision, None, False)

    async def customers(self) -> list[str]:
        await self._ensure()
        _, kvs = await self.client.range(self._prefix + b"tok/", prefix=True, keys_only=True)
        return [unquote(kv.key[len(self._prefix) + 4:].decode()) for kv in kvs]
