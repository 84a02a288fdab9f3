"""The etcd store: the cross-process, cross-host guarantee.

Keys under a namespace ``NS``::

    NS/tok/<customer>            the token record (no lease)
    NS/lock/<customer>           the refresh lock, bound to this process's lease
    NS/rescue/<customer>/<fence> tokens whose commit lost its compare
    NS/member/<lease>            one per live process, bound to its lease: who
                                 is first in line to refresh a customer

The record's version is its ``mod_revision``. Acquire (lock + intent) and
commit (record + unlock) are one Txn each, so an uncontended refresh costs
two round trips: reads come from a mirror that watches keep current, and
waiters wake from those watches, never by polling.

Two mirrors (``mirror=``):

- ``"namespace"`` (the default): one prefix watch; the version, lock and
  rescue state of every customer (loaded keys-only, page by page), the token
  record only of the customers this process serves. Every worker hears every
  change of the fleet: right for up to some tens of thousands of customers.
- ``"served"``: only the customers this process uses, each read on first use
  and followed by its own watchers on one shared stream, dropped after
  ``idle_after`` seconds unused. Memory and watch traffic grow with the
  customers a worker serves, not with the fleet (``docs/operations.md``).

See ``docs/protocol.md`` for the invariant each step protects.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote, unquote

import orjson

from sfrtr.errors import LeaseLost, StoreError
from sfrtr.protocol import refreshing_record
from sfrtr.records import Intent, Status, TokenRecord, Versioned
from sfrtr.store import sealing
from sfrtr.store.base import RefreshOrder
from sfrtr.store.etcd_client import (
    KV,
    EtcdClient,
    EtcdSettings,
    StreamBroken,
    TxnResult,
    WatchBatch,
    WatchEvent,
    WatchStream,
    compare,
    delete,
    get,
    prefix_end,
    put,
)

if TYPE_CHECKING:
    from sfrtr.store.sealing import Sealer

log = logging.getLogger(__name__)

Subscriber = Callable[[str, Versioned | None], None]
Mirror = Literal["namespace", "served"]
_KINDS = ("tok", "lock", "rescue")  # a served customer's watchers, by id offset
_CATCH_UP = 0.25
"""Longest a served read waits for the second event of a Txn whose first it saw."""
_CATCH_UP_UNSURE = 0.025
"""The same when the first may have no second (a lock deleted ahead of its record:
a commit's, or a lease's running out): the pair's events come back to back on one
stream, so a short wait catches a commit's, and an expiry costs little."""


@dataclass(slots=True)
class _Mirror:
    """What this process knows of one customer, and as of which revision."""

    record: TokenRecord | None = None
    """The record at ``version``, kept only while the customer is served (``None``
    with a version: not served here, or its body is not known: read it)."""
    version: int = 0
    """The record's mod revision; 0: there is no record."""
    locked: bool = False
    observed: int = 0
    """The revision the version (and record) is known to be current at (a direct
    read's, or the last watch event applied); older events are not applied."""
    lock_at: int = 0
    """The same for the lock. Kept apart: a served customer's record and lock come
    on separate watchers, so one may run ahead of the other."""
    changed: int = 0
    """The revision of the last change seen to any of the customer's keys: the
    stamp waiters compare against."""
    rescues: set[int] | None = None
    """Fences of the customer's rescue entries (``None``: none)."""
    rescue_at: int = 0
    """The revision ``rescues`` is known to be current at (the last rescue event, or
    read, or own write folded in). A write whose answer comes back after the watch
    delivered newer rescue events must not fold its older view over them."""
    used: float = 0.0
    """Monotonic time this process last used the customer (0: never): a used
    customer's record is kept, its changes reach subscribers."""
    holder: int = 0
    """The lease of the last lock on the customer seen here (0: none seen): the
    process that refreshed it last, first in line for the next refresh while alive."""
    holder_at: int = 0
    """The revision of that lock's put. Kept apart from ``lock_at``: on a served
    mirror a commit's record event can pass the acquire's lock event."""


def _encode(record: TokenRecord, sealer: Sealer | None = None, namespace: str = "",
            customer: str = "") -> bytes:
    return orjson.dumps(sealing.encode(sealer, namespace, customer, record))


def _member_lease(key: bytes, prefix: bytes) -> int | None:
    try:
        return int(key[len(prefix):], 16)
    except ValueError:
        return None


def _rendezvous(lease: int, customer: bytes) -> bytes:
    return hashlib.blake2b(customer, digest_size=8, key=lease.to_bytes(8, "big")).digest()


def _rescue_fence(key: bytes) -> int | None:
    try:
        return int(key.rpartition(b"/")[2])
    except ValueError:
        return None


def _decode(raw: bytes, sealer: Sealer | None = None, namespace: str = "",
            customer: str = "") -> TokenRecord:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise StoreError("malformed token record in etcd (not JSON)") from None
    return sealing.decode(sealer, namespace, customer, data)


class EtcdStore:
    """A :class:`~sfrtr.store.TokenStore` on etcd v3. One per process.

    Starts itself on first use (lease, keepalive, watch); call
    :meth:`aclose` (or the manager's) to revoke the lease and stop, or use it as
    ``async with EtcdStore(...) as store``. ``sealer``: seal records at rest
    (:mod:`sfrtr.store.sealing`; the namespace is the associated data's).
    """

    local_reads = True
    """Reads come from the watch-fed mirror: looking again costs no round trip (the
    manager spreads simultaneous acquires on such stores: ``acquire_spread``)."""

    def __init__(self, settings: EtcdSettings | None = None, *, namespace: str = "sfrtr",
                 lease_ttl: int = 30, page_size: int = 5000, mirror: Mirror = "namespace",
                 idle_after: float = 600.0, sealer: Sealer | None = None) -> None:
        if not namespace or namespace.endswith("/"):
            raise ValueError("namespace must be non-empty and not end with '/'")
        if lease_ttl < 2:
            raise ValueError("lease_ttl must be at least 2 seconds")
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        if mirror not in ("namespace", "served"):
            raise ValueError("mirror must be 'namespace' or 'served'")
        if not idle_after >= 1.0:
            raise ValueError("idle_after must be at least 1 second")
        self.page_size = page_size
        """Keys per Range page when loading the namespace (keys only: 5,000 keys
        are about 300 KB, well inside one gRPC message)."""
        self.mirror: Mirror = mirror
        self.idle_after = idle_after
        """Seconds a customer stays served without use before its record is let go
        (and, with ``mirror="served"``, its watchers)."""
        self.client = EtcdClient(settings or EtcdSettings())
        self.namespace = namespace
        self.sealer = sealer
        self._prefix = f"{namespace}/".encode()
        self._requested_ttl = lease_ttl
        self._ttl = float(lease_ttl)
        self._lease_id: int | None = None
        self._lease_deadline = 0.0
        self._mirror: dict[str, _Mirror] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._in_use: set[str] = set()
        """Customers marked used (``_Mirror.used``): what the idle sweep walks."""
        self._waiting: dict[str, int] = {}
        """Customer -> calls of wait_for_change under way (a waited-on customer is
        never let go)."""
        self._synced = mirror == "served"  # a served mirror has no namespace snapshot
        self._watch_from = 0
        # mirror="served": customer -> its first watcher id (tok, lock, rescue follow
        # it); watcher id -> [customer, the revision to resume it from].
        self._followed: dict[str, int] = {}
        self._watchers: dict[int, list[str | int]] = {}
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._next_watch = 1
        self._to_add: set[int] = set()
        self._to_remove: set[int] = set()
        self._send_kick = asyncio.Event()
        self._subscribers: list[Subscriber] = []
        self._members: set[int] = set()
        """Leases of the namespace's live processes, as the member watch last said."""
        self._past_leases: set[int] = set()
        """Leases this process held before its current one (a re-grant after a pause):
        a customer whose lock it held under one of them is still its own to go first
        for, though that lease and its member key live on until their TTL."""
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
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

    def _member_prefix(self) -> bytes:
        return self._prefix + b"member/"

    def _encode(self, customer: str, record: TokenRecord) -> bytes:
        return _encode(record, self.sealer, self.namespace, customer)

    def _decode(self, customer: str, raw: bytes) -> TokenRecord:
        return _decode(raw, self.sealer, self.namespace, customer)

    def _parse_key(self, key: bytes) -> tuple[str, str] | None:
        if not key.startswith(self._prefix):
            return None
        kind, _, rest = key[len(self._prefix):].decode().partition("/")
        if kind == "rescue":
            rest = rest.rpartition("/")[0]
        if kind not in _KINDS or not rest:
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
            if self.sealer is not None:
                await self.sealer.ready()
            await self.client.connect()
            await self._grant()
            if self.mirror == "namespace":
                await self._resync()
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._keepalive_loop()),
                           loop.create_task(self._watch_task()),
                           loop.create_task(self._idle_loop()),
                           loop.create_task(self._members_loop())]
            self._started = True

    async def _ensure(self) -> None:
        if not self._started:
            await self.start()

    async def __aenter__(self) -> EtcdStore:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        tasks = [*self._tasks, *self._background]
        for task in tasks:
            task.cancel()
        for task in tasks:
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
        """Call ``callback(customer, state)`` whenever the record of a customer this
        process uses changes (``None``: deleted, or no longer followed here)."""
        self._subscribers.append(callback)

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the lease -------------------------------------------------------------

    @property
    def lease_ttl(self) -> float:
        return self._ttl

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    def lease_remaining(self, lease: int | None = None) -> float | None:
        if self._lease_id is None or (lease is not None and lease != self._lease_id):
            return 0.0  # no lease, or not the one asked about (it was lost and replaced)
        return max(0.0, self._lease_deadline - time.monotonic())

    async def _grant(self) -> None:
        asked = time.monotonic()
        lease_id, ttl = await self.client.grant(self._requested_ttl)
        self._lease_id, self._ttl = lease_id, float(ttl)
        self._lease_deadline = asked + ttl  # timed from the request: never optimistic
        log.info("etcd lease %x granted (ttl %ss)", lease_id, ttl)
        self._spawn(self._announce(lease_id))  # off the path of the acquire that re-grants

    async def _announce(self, lease_id: int) -> None:
        """Put this process's member key, bound to its new lease; tried again every
        second while that lease is this process's (etcd may be flapping)."""
        while not self._closed and self._lease_id == lease_id:
            try:
                await self.client.txn([], [put(self._member_prefix() + b"%016x" % lease_id,
                                               b"", lease=lease_id)])
                return
            except LeaseLost:
                return  # a new lease announces itself
            except StoreError as exc:
                # Meanwhile only an optimisation is lost: the others do not wait for
                # this process (their acquires may race its own and fail a compare).
                log.info("etcd lease %x: membership not announced yet (%s)", lease_id, exc)
            await asyncio.sleep(1.0)

    def _lose_lease(self, why: str) -> None:
        if self._lease_id is not None:
            log.warning("etcd lease %x lost: %s", self._lease_id, why)
            self._past_leases.add(self._lease_id)
        self._lease_id = None
        self._lease_deadline = 0.0

    async def _keepalive_loop(self) -> None:
        while not self._closed:
            try:
                if self._lease_id is None:
                    await self._grant()
                await self._keepalive_stream()
            except (StoreError, LeaseLost) as exc:
                log.info("etcd keepalive interrupted: %s", exc)
                if isinstance(exc, StreamBroken):
                    self._restart_watch()
            except Exception:  # this loop must never die: a lease nobody renews expires
                log.exception("etcd keepalive failed unexpectedly; starting again")
                self._restart_watch()
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

    # -- the namespace mirror: one prefix watch ----------------------------------

    async def _resync(self) -> None:
        """Load the namespace's keys (not their values), page by page, as one
        snapshot (every page is read at the first page's revision), then watch
        from the next revision. Records are read when a customer is used."""
        fresh: dict[str, _Mirror] = {}
        revision = 0
        async for revision, kvs in self.client.range_pages(self._prefix, self.page_size,
                                                           keys_only=True):
            for kv in kvs:
                parsed = self._parse_key(kv.key)
                if parsed is None:
                    continue
                kind, customer = parsed
                m = fresh.get(customer)
                if m is None:
                    m = fresh[customer] = _Mirror(observed=revision, lock_at=revision,
                                                  rescue_at=revision)
                if kind == "tok":
                    m.version = kv.mod_revision
                elif kind == "lock":
                    m.locked = True
                    m.holder, m.holder_at = kv.lease, kv.mod_revision
                else:
                    fence = _rescue_fence(kv.key)
                    if fence is not None:
                        m.rescues = (m.rescues or set()) | {fence}
                m.changed = max(m.changed, kv.mod_revision)
        changed_used: list[str] = []
        for customer, old in self._mirror.items():
            new = fresh.get(customer)
            if old.observed > revision:
                # Our own write (or a direct read) landed while the pages were read:
                # it is newer than the snapshot, keep it.
                if new is not None and new.rescues != old.rescues and \
                        old.rescue_at <= revision:
                    old.rescues, old.rescue_at = new.rescues, revision
                    old.changed = max(old.changed, revision)
                fresh[customer] = old
                continue
            if new is None:  # deleted while we were not watching
                new = fresh[customer] = _Mirror(observed=revision, lock_at=revision,
                                                rescue_at=revision)
            if (old.version, old.locked, old.rescues) != (new.version, new.locked, new.rescues):
                new.changed = max(old.changed, revision)
            else:
                new.changed = max(new.changed, old.changed)
            new.used = old.used
            if old.holder_at > new.holder_at:
                new.holder, new.holder_at = old.holder, old.holder_at
            if new.version == old.version:
                new.record = old.record
            elif old.used:
                changed_used.append(customer)  # its new record is read when next used
        self._mirror = fresh
        self._watch_from = revision + 1
        self._synced = True
        for customer in list(self._waiters):
            self._wake(customer)
        for customer in changed_used:
            self._notify(customer, fresh[customer])

    def _restart_watch(self) -> None:
        """The connection broke under the keepalive stream: the watch stream on it may
        be dead without knowing (a restarted etcd does not always end it, and
        progress notifications come every ten minutes), so start it again (from a
        fresh load, for the namespace mirror) rather than wait on it."""
        if self._closed or len(self._tasks) < 2:
            return
        loop = asyncio.get_running_loop()
        self._tasks[1].cancel()
        if self.mirror == "namespace":
            self._synced = False
        self._tasks[1] = loop.create_task(self._watch_task())
        if len(self._tasks) > 3:
            self._tasks[3].cancel()
            self._tasks[3] = loop.create_task(self._members_loop())

    def _watch_task(self) -> Coroutine[object, object, None]:
        return self._watch_loop() if self.mirror == "namespace" else self._follow_loop()

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
            except Exception:  # this loop must never die: the mirror would freeze
                log.exception("etcd watch failed unexpectedly; resynchronizing")
                self._synced = False
                await asyncio.sleep(0.2)

    def _apply_batch(self, batch: WatchBatch) -> None:
        for event in batch.events:
            # Only delivered events move the resume point: a reply's header
            # revision (the watch-created reply's above all) may run ahead of
            # events still on their way.
            self._watch_from = max(self._watch_from, event.kv.mod_revision + 1)
            self._apply_event(event, create=True)

    def _apply_event(self, event: WatchEvent, *, create: bool) -> None:
        revision = event.kv.mod_revision
        parsed = self._parse_key(event.kv.key)
        if parsed is None:
            return
        kind, customer = parsed
        m = self._mirror.get(customer)
        if m is None:
            if not create:
                return  # a served customer let go: its watchers' last events
            m = self._mirror[customer] = _Mirror()
        m.changed = max(m.changed, revision)
        if kind == "rescue":
            # Direct reads never cover rescues: only events (and loads) do.
            m.rescue_at = max(m.rescue_at, revision)
            fence = _rescue_fence(event.kv.key)
            if fence is not None:
                found = m.rescues or set()
                if event.kind == "put":
                    found.add(fence)
                else:
                    found.discard(fence)
                m.rescues = found or None
            self._notify(customer, m)
        elif kind == "tok":
            if revision >= m.observed:  # one Txn puts several keys at one revision
                m.observed = revision
                if event.kind == "put":
                    m.version = revision
                    m.record = None
                    if m.used:  # only a served customer's record is kept
                        try:
                            m.record = self._decode(customer, event.kv.value)
                        except StoreError as exc:
                            log.error("customer %s: %s", customer, exc)
                else:
                    m.record, m.version = None, 0
                if self.mirror == "served" and revision >= m.lock_at and \
                        (event.kind == "delete" or (m.record is not None and
                                                    m.record.status is not Status.REFRESHING)):
                    # Only an acquire writes a record without releasing the lock in
                    # the same Txn, and it always writes a refreshing one; commit,
                    # put and delete release it. So any other record's event tells
                    # the lock's state at its revision (free), whichever watcher's
                    # reply comes first. (A refreshing record tells nothing: a
                    # commit may put one back, releasing the lock.)
                    m.locked, m.lock_at = False, revision
                self._notify(customer, m)
        else:
            if event.kind == "put" and revision >= m.holder_at:
                m.holder, m.holder_at = event.kv.lease, revision
            if revision >= m.lock_at:
                m.lock_at = revision
                m.locked = event.kind == "put"
        self._wake(customer)

    # -- membership: who is first in line ------------------------------------------

    async def _members_loop(self) -> None:
        """Follow ``NS/member/``: the leases of the namespace's live processes (each
        key dies with its process's lease). Its own small watch, whatever the mirror."""
        prefix = self._member_prefix()
        while not self._closed:
            try:
                revision, kvs = await self.client.range(prefix, prefix=True, keys_only=True)
                self._members = {lease for kv in kvs
                                 if (lease := _member_lease(kv.key, prefix)) is not None}
                async for batch in self.client.watch_prefix(prefix, revision + 1):
                    if batch.compacted:
                        break
                    for event in batch.events:
                        lease = _member_lease(event.kv.key, prefix)
                        if lease is None:
                            continue
                        if event.kind == "put":
                            self._members.add(lease)
                        else:
                            self._members.discard(lease)
            except StoreError as exc:
                log.info("etcd member watch interrupted (%s); reloading", exc)
                await asyncio.sleep(0.5)
            except Exception:  # must not die: a stale membership only costs waits
                log.exception("etcd member watch failed unexpectedly; reloading")
                await asyncio.sleep(0.5)

    @property
    def live_processes(self) -> int:
        """How many live processes the member list holds (0 until it is loaded)."""
        return len(self._members)

    def refresh_order(self, customer: str) -> RefreshOrder:
        """This process's place in line to refresh ``customer`` among the namespace's
        live processes.

        First comes the process that held the customer's lock last (it refreshed
        it, so it uses it) while it is alive; then the others in an order made by
        rendezvous hashing over their leases (every process computes the same one
        from the same member list, each customer has its own, and a process that
        leaves moves only the customers it was first for). The manager lets the
        first go at once and the others defer to it (``RefreshPolicy.handoff``,
        only when the first is that known holder; ``refresh_stagger``), so a fleet
        that needs a customer at the same moment sends one acquire instead of one
        per process. The order is advice, never safety: the compare decides."""
        own = self._lease_id
        if own is None or not self._members:
            return RefreshOrder(0, 1, False)
        m = self._mirror.get(customer)
        holder = m.holder if m is not None else 0
        if holder in self._past_leases:
            holder = own  # this process held it under a lease it has since replaced
        elif holder not in self._members:
            holder = 0
        key = customer.encode()
        ours = _rendezvous(own, key)
        ahead, processes = 0, 1
        for lease in self._members:
            if lease == own or lease in self._past_leases:
                continue
            processes += 1
            if lease == holder or (own != holder and _rendezvous(lease, key) > ours):
                ahead += 1
        return RefreshOrder(ahead, processes, holder != 0)

    # -- the served mirror: watchers per customer, on one stream ----------------------

    async def _follow(self, customer: str) -> None:
        """Make sure a served customer is loaded and watched (one load at a time)."""
        if customer in self._followed:
            return
        loading = self._loading.get(customer)
        if loading is None:
            task = asyncio.get_running_loop().create_task(self._load(customer))
            self._loading[customer] = loading = task

            def done(t: asyncio.Future[None]) -> None:
                self._loading.pop(customer, None)
                if not t.cancelled():
                    t.exception()  # retrieved: a load nobody awaits any more fails quietly
            task.add_done_callback(done)
        await asyncio.shield(loading)

    async def _load(self, customer: str) -> None:
        """Read the customer's keys at one revision, then watch them from the next:
        the watchers replay whatever changed after the read."""
        tok, lock, rescues = self._tok(customer), self._lock(customer), \
            self._rescue_prefix(customer)
        revision, tok_kvs, lock_kvs = await self.client.get_pair(tok, lock)
        _, rescue_kvs = await self.client.range(rescues, prefix=True, keys_only=True,
                                                revision=revision)
        if self._closed or customer in self._followed:
            return
        m = self._observe(customer, revision, tok_kvs, lock_kvs)
        fences = {f for f in map(_rescue_fence, (kv.key for kv in rescue_kvs)) if f is not None}
        if (m.rescues or set()) != fences and m.rescue_at <= revision:
            m.rescues, m.rescue_at = fences or None, revision
            m.changed = max(m.changed, revision)
        first = self._next_watch
        self._next_watch += len(_KINDS)
        self._followed[customer] = first
        for offset in range(len(_KINDS)):
            self._watchers[first + offset] = [customer, revision + 1]
            self._to_add.add(first + offset)
        self._send_kick.set()
        self._wake(customer)

    def _unfollow(self, customer: str, *, gone: int = 0) -> None:
        """Stop watching a customer (``gone``: a watcher etcd already cancelled)."""
        first = self._followed.pop(customer, None)
        if first is None:
            return
        for watch_id in range(first, first + len(_KINDS)):
            self._watchers.pop(watch_id, None)
            if watch_id in self._to_add:
                self._to_add.discard(watch_id)
            elif watch_id != gone:
                self._to_remove.add(watch_id)
        self._send_kick.set()

    def _key_range(self, watch_id: int) -> tuple[bytes, bytes]:
        customer = str(self._watchers[watch_id][0])
        kind = _KINDS[watch_id - self._followed[customer]]
        if kind == "tok":
            return self._tok(customer), b""
        if kind == "lock":
            return self._lock(customer), b""
        start = self._rescue_prefix(customer)
        return start, prefix_end(start)

    async def _follow_loop(self) -> None:
        while not self._closed:
            stream: WatchStream | None = None
            try:
                stream = await self.client.watch_stream()
                # A new stream has no watchers: every followed one starts again from
                # its resume point (etcd replays what it missed, or says compacted).
                self._to_add, self._to_remove = set(self._watchers), set()
                self._send_kick.set()
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._send_watchers(stream))
                    group.create_task(self._read_watchers(stream))
            except* StoreError as broken:
                log.info("etcd watch interrupted (%s); following again",
                         broken.exceptions[0])
            except* Exception:  # this loop must never die: the mirror would freeze
                log.exception("etcd watch failed unexpectedly; following again")
            finally:
                if stream is not None:
                    stream.close()
            await asyncio.sleep(0.2)

    async def _send_watchers(self, stream: WatchStream) -> None:
        while True:
            await self._send_kick.wait()
            self._send_kick.clear()
            while self._to_remove:
                await stream.remove(self._to_remove.pop())
            while self._to_add:
                watch_id = self._to_add.pop()
                watcher = self._watchers.get(watch_id)
                if watcher is not None:
                    key, end = self._key_range(watch_id)
                    await stream.add(watch_id, key, end, int(watcher[1]))

    async def _read_watchers(self, stream: WatchStream) -> None:
        while True:
            watch_id, batch = await stream.read()
            watcher = self._watchers.get(watch_id)
            if watcher is None:
                continue  # a watcher we removed: its last words
            customer = str(watcher[0])
            if batch.compacted:
                # etcd dropped this watcher; its history is gone. Read the customer
                # afresh (new watchers from the new read).
                log.warning("customer %s: watch history compacted; reading it again",
                            customer)
                self._unfollow(customer, gone=watch_id)
                self._forget(customer)  # whatever changed meanwhile, no cached copy stays
                self._wake(customer)
                self._spawn(self._refollow(customer))
                continue
            for event in batch.events:
                watcher[1] = max(int(watcher[1]), event.kv.mod_revision + 1)
                self._apply_event(event, create=False)

    async def _refollow(self, customer: str) -> None:
        try:
            await self._follow(customer)
        except StoreError as exc:  # the next use loads it again
            log.info("customer %s: could not be read again (%s)", customer, exc)

    # -- letting idle customers go ------------------------------------------------------

    async def _idle_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(max(0.5, self.idle_after / 4))
            try:
                self._let_go_idle(time.monotonic() - self.idle_after)
            except Exception:  # never dies: a leak is better than a frozen mirror
                log.exception("letting idle customers go failed")

    def _let_go_idle(self, before: float) -> None:
        served = self.mirror == "served"
        # The namespace mirror holds every customer of the fleet: walk only the ones
        # this process uses (a walk of 100,000 entries would stall the loop).
        names = list(self._mirror) if served else list(self._in_use)
        for customer in names:
            m = self._mirror.get(customer)
            if m is None or not m.used:
                self._in_use.discard(customer)
                if m is None or not served:
                    continue
            if m.used >= before or customer in self._waiting or customer in self._loading:
                continue
            self._in_use.discard(customer)
            m.used, m.record = 0.0, None
            if served:
                self._unfollow(customer)
                del self._mirror[customer]
            elif not (m.version or m.locked or m.rescues):
                del self._mirror[customer]  # asked about, never there: nothing to keep
            self._forget(customer)

    def _forget(self, customer: str) -> None:
        """Tell subscribers the customer's record is no longer kept current here."""
        for callback in self._subscribers:
            try:
                callback(customer, None)
            except Exception:
                log.exception("store subscriber failed")

    # -- folding reads and writes into the mirror --------------------------------------

    def _observe(self, customer: str, revision: int, tok: list[KV], lock: list[KV]) -> _Mirror:
        """Fold a direct read (or a Txn's ranges) at ``revision`` into the mirror."""
        m = self._mirror.setdefault(customer, _Mirror())
        before = (m.version, m.locked)
        if revision >= m.observed:
            if tok:
                if tok[0].mod_revision != m.version or m.record is None:
                    try:
                        m.record = self._decode(customer, tok[0].value)
                    except sealing.SealingError:
                        # A record this process cannot open (a key it lacks): keep its
                        # version, drop the body. A read decodes again and raises; a
                        # commit that lost its compare to it still returns None, so
                        # its rotated tokens go to a rescue.
                        m.record = None
                m.version = tok[0].mod_revision
            else:
                m.record, m.version = None, 0
            m.observed = revision
        if revision >= m.lock_at:
            m.locked = bool(lock)
            m.lock_at = revision
        if lock and lock[0].mod_revision >= m.holder_at:
            m.holder, m.holder_at = lock[0].lease, lock[0].mod_revision
        if (m.version, m.locked) != before:
            # A deletion (a lock gone with its lease) has no revision of its
            # own to show: the read's revision stands in.
            m.changed = max(m.changed, revision)
        return m

    def _wrote(self, customer: str, revision: int, record: TokenRecord | None,
               locked: bool) -> None:
        m = self._mirror.setdefault(customer, _Mirror())
        if revision >= m.observed:
            m.record, m.observed = record, revision
            m.version = 0 if record is None else revision
            m.changed = max(m.changed, revision)
            self._notify(customer, m)
        if revision >= m.lock_at:
            m.locked, m.lock_at = locked, revision
        self._wake(customer)

    def _wake(self, customer: str) -> None:
        event = self._waiters.pop(customer, None)
        if event is not None:
            event.set()

    def _notify(self, customer: str, m: _Mirror) -> None:
        if not m.used:
            return  # nobody here holds this customer's record
        state = self._view(m)
        for callback in self._subscribers:
            try:
                callback(customer, state)
            except Exception:  # a subscriber's bug must not stop the watch
                log.exception("store subscriber failed")

    @staticmethod
    def _view(m: _Mirror | None) -> Versioned | None:
        if m is None or m.record is None:
            return None
        return Versioned(m.record, m.version, m.locked, stamp=m.changed,
                         rescued=m.rescues is not None)

    def _consistent(self, m: _Mirror) -> bool:
        """Whether the mirrored record and lock state belong together.

        On the namespace mirror they do: one watch delivers a Txn's events in one
        reply. A served customer's record and lock come on two watchers, so the two
        events of one Txn (an acquire, a commit) arrive as two replies, in either
        order, with other tasks running between them: a view taken between them is
        a state etcd never held (a commit's new record still locked; an intent
        without its lock, a false orphan). It is trusted only when both are known
        as of the same revision, and no event of its rescue watcher has run ahead of
        them (the stamp handed out with a view must not be newer than the view, or a
        waiter on it would sleep through the record and lock events still on their
        way); otherwise the customer is read from etcd, which brings all of it to the
        read's revision again.
        """
        return self.mirror == "namespace" or m.observed == m.lock_at >= m.changed

    def _split(self, customer: str, m: _Mirror) -> float:
        """How long to wait for the rest of a followed served customer's view (0: it
        is not one event short). One event short: its record and lock are known as
        of different revisions, the later of which is the newest change seen (its
        rescue watcher has not run ahead); the other event of that Txn is on its way
        on the same stream."""
        if self.mirror != "served" or m.observed == m.lock_at or \
                max(m.observed, m.lock_at) < m.changed or customer not in self._followed:
            return 0.0
        if m.lock_at < m.observed or m.locked:
            return _CATCH_UP  # a record event, or a lock's put (an acquire): always a pair
        # A lock deleted ahead of its record: a commit or a put releasing it (its record
        # event follows), or its holder's lease running out (nothing follows).
        return _CATCH_UP_UNSURE

    async def _catch_up(self, customer: str, budget: float) -> None:
        """Give a split view's missing event a moment (``budget`` at most) before
        reading: a reader woken by an acquire's or commit's first event would
        otherwise spend a round trip on what the second brings."""
        deadline = time.monotonic() + budget
        with self._waiting_on(customer):
            while (m := self._mirror.get(customer)) is not None and self._split(customer, m):
                if not await self._next_event(customer, deadline):
                    return

    @contextlib.contextmanager
    def _waiting_on(self, customer: str) -> Iterator[None]:
        """Count a waiter on ``customer`` (a waited-on customer is never let go); the
        last one out drops the customer's event (nobody waits: no event to keep)."""
        self._waiting[customer] = self._waiting.get(customer, 0) + 1
        try:
            yield
        finally:
            left_waiting = self._waiting.pop(customer) - 1
            if left_waiting:
                self._waiting[customer] = left_waiting
            else:
                self._waiters.pop(customer, None)

    async def _next_event(self, customer: str, deadline: float) -> bool:
        """Until the customer's next event (True) or ``deadline`` (False)."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        event = self._waiters.setdefault(customer, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), left)
        except TimeoutError:
            return False
        return True

    async def _use(self, customer: str) -> _Mirror:
        """Start (once) and mark the customer used now; a served mirror follows it.

        The entry exists and is marked used before any read is sent, so watch events
        that overtake that read keep the record's body (an unused entry keeps only
        its version, and a read older than those events is not folded in)."""
        await self._ensure()
        if self.mirror == "served":
            await self._follow(customer)
        m = self._mirror.get(customer)
        if m is None:
            m = self._mirror[customer] = _Mirror()
        m.used = time.monotonic()
        self._in_use.add(customer)
        return m

    # -- TokenStore --------------------------------------------------------------

    async def read(self, customer: str) -> Versioned | None:
        m = await self._use(customer)
        if m.record is not None and not self._consistent(m) and \
                (budget := self._split(customer, m)):
            await self._catch_up(customer, budget)
            m = await self._use(customer)
        if self._synced and m.record is not None and self._consistent(m):
            # A record the mirror holds is at worst stale, which a compare catches;
            # one it lacks may be brand new and still on its way.
            return self._view(m)
        revision, tok, lock = await self.client.get_pair(self._tok(customer),
                                                         self._lock(customer))
        m = self._observe(customer, revision, tok, lock)
        if m.record is None and m.version and tok:
            # The mirror moved past this read while it was under way (a resync, whose
            # entries carry no record, or events of a customer not used before) and
            # does not have the newer record: answer with what etcd said at the read's
            # revision, stale at worst, stamped with that revision so a waiter on it
            # wakes for the newer state at once.
            return Versioned(self._decode(customer, tok[0].value), tok[0].mod_revision,
                             bool(lock),
                             stamp=revision, rescued=m.rescues is not None)
        return self._view(m)

    async def put(self, customer: str, record: TokenRecord) -> Versioned:
        await self._use(customer)
        result = await self.client.txn(
            [], [put(self._tok(customer), self._encode(customer, record)),
                 delete(self._lock(customer)),
                 delete(self._rescue_prefix(customer), prefix=True)])
        self._mark_used(customer)
        self._wrote(customer, result.revision, record, False)
        self._dropped_rescues(customer, result.revision)
        return Versioned(record, result.revision, False, stamp=result.revision)

    def _dropped_rescues(self, customer: str, revision: int) -> None:
        """Our write at ``revision`` deleted every rescue entry of the customer. If the
        watch already delivered a newer rescue event (another holder's rescue, saved
        after our write), it delivered our deletes before it: keep what it built."""
        m = self._mirror[customer]
        if m.rescue_at <= revision:
            m.rescues, m.rescue_at = None, revision

    def _mark_used(self, customer: str) -> None:
        self._mirror.setdefault(customer, _Mirror()).used = time.monotonic()
        self._in_use.add(customer)

    async def acquire(self, customer: str, expected_version: int,
                      intent: Intent) -> Versioned | None:
        current = await self._use(customer)
        if current.version == 0:
            return None
        lease = await self._live_lease()
        intent = Intent(intent.worker, intent.refresh_fingerprint, intent.started_at, lease,
                        intent.id, intent.limit)  # dataclasses.replace costs 3x this
        # The record body comes from the version we compare against: if the
        # compare holds, this is exactly the record at expected_version.
        if current.version != expected_version or current.record is None:
            await self._refresh_view(customer)
            return None
        record = refreshing_record(current.record, intent)
        tok, lock = self._tok(customer), self._lock(customer)
        try:
            result = await self.client.txn(
                [compare(tok, "mod", "==", expected_version), compare(lock, "create", "==", 0)],
                [put(lock, intent.worker.encode(), lease),
                 put(tok, self._encode(customer, record))],
                [get(tok), get(lock)])
        except LeaseLost:
            self._lose_lease("etcd refused it for a write")
            raise
        if not result.succeeded:
            tok_kvs, lock_kvs = result.ranges
            m = self._observe(customer, result.revision, tok_kvs, lock_kvs)
            landed = m.record is not None and m.record.intent is not None and \
                bool(intent.id) and m.record.intent.id == intent.id and \
                bool(lock_kvs) and lock_kvs[0].lease == lease
            if landed and m.record is not None:
                # A retried request whose first attempt landed: the lock is ours.
                return Versioned(m.record, m.version, True, stamp=m.changed)
            return None
        self._mark_used(customer)
        self._wrote(customer, result.revision, record, True)
        m = self._mirror[customer]
        if result.revision >= m.holder_at:
            m.holder, m.holder_at = lease, result.revision
        return Versioned(record, result.revision, True, stamp=result.revision)

    async def _refresh_view(self, customer: str) -> None:
        revision, tok, lock = await self.client.get_pair(self._tok(customer),
                                                         self._lock(customer))
        self._observe(customer, revision, tok, lock)

    async def commit(self, customer: str, fence: int, record: TokenRecord) -> Versioned | None:
        await self._use(customer)
        tok = self._tok(customer)
        result: TxnResult = await self.client.txn(
            [compare(tok, "mod", "==", fence)],
            [put(tok, self._encode(customer, record)), delete(self._lock(customer))],
            [get(tok), get(self._lock(customer))])
        if not result.succeeded:
            self._observe(customer, result.revision, *result.ranges)
            return None
        self._mark_used(customer)
        self._wrote(customer, result.revision, record, False)
        return Versioned(record, result.revision, False, stamp=result.revision)

    def _wrote_rescue(self, customer: str, fence: int, revision: int, present: bool) -> None:
        m = self._mirror.setdefault(customer, _Mirror())
        if revision < m.rescue_at:
            # The watch ran ahead of this answer: it delivered this write already,
            # and newer rescue changes after it (a put that dropped this entry).
            m.changed = max(m.changed, revision)
            self._wake(customer)
            return
        m.rescue_at = revision
        found = m.rescues or set()
        if present:
            found.add(fence)
        else:
            found.discard(fence)
        m.rescues = found or None
        m.changed = max(m.changed, revision)
        self._wake(customer)

    async def save_rescue(self, customer: str, fence: int, record: TokenRecord) -> None:
        await self._use(customer)
        result = await self.client.txn(
            [], [put(self._rescue_prefix(customer) + b"%020d" % fence,
                     self._encode(customer, record))])
        self._wrote_rescue(customer, fence, result.revision, True)

    async def rescues(self, customer: str) -> list[tuple[int, TokenRecord]]:
        await self._use(customer)
        _, kvs = await self.client.range(self._rescue_prefix(customer), prefix=True)
        found: list[tuple[int, TokenRecord]] = []
        for kv in kvs:
            try:
                found.append((int(kv.key.rpartition(b"/")[2]),
                              self._decode(customer, kv.value)))
            except sealing.SealingError:
                raise  # a key problem, not damage: skipping would lose a rotated token
            except (ValueError, StoreError):
                log.error("customer %s: unreadable rescue entry skipped", customer)
        return sorted(found, key=lambda item: item[0])

    async def drop_rescue(self, customer: str, fence: int) -> None:
        await self._use(customer)
        result = await self.client.txn(
            [], [delete(self._rescue_prefix(customer) + b"%020d" % fence)])
        self._wrote_rescue(customer, fence, result.revision, False)

    async def reseal_rescue(self, customer: str, fence: int, record: TokenRecord) -> bool:
        """Write a rescue entry again (sealed with the newest key) only if it still
        exists: rekey must not bring back an entry adopted or dropped meanwhile."""
        await self._use(customer)
        key = self._rescue_prefix(customer) + b"%020d" % fence
        result = await self.client.txn([compare(key, "create", "!=", 0)],
                                       [put(key, self._encode(customer, record))])
        if result.succeeded:
            self._wrote_rescue(customer, fence, result.revision, True)
        return result.succeeded

    async def wait_for_change(self, customer: str, after: int,
                              timeout: float) -> Versioned | None:
        deadline = time.monotonic() + timeout
        with self._waiting_on(customer):
            while True:
                m = await self._use(customer)
                if m.changed > after:
                    return await self.read(customer)
                if not await self._next_event(customer, deadline):
                    return None
                if not self._synced:
                    return await self.read(customer)

    async def delete(self, customer: str, *, version: int | None = None) -> bool:
        await self._use(customer)
        tok = self._tok(customer)
        result = await self.client.txn(
            [] if version is None else [compare(tok, "mod", "==", version)],
            [delete(tok), delete(self._lock(customer)),
             delete(self._rescue_prefix(customer), prefix=True)],
            [get(tok), get(self._lock(customer))])
        if not result.succeeded:
            self._observe(customer, result.revision, *result.ranges)
            if result.ranges[0]:
                return False
            # Gone already: a retried request whose first attempt landed, or another
            # deleter. Either way what was asked for is true.
        self._wrote(customer, result.revision, None, False)
        self._dropped_rescues(customer, result.revision)
        return True

    async def customers(self) -> list[str]:
        await self._ensure()
        _, kvs = await self.client.range(self._prefix + b"tok/", prefix=True, keys_only=True)
        return [unquote(kv.key[len(self._prefix) + 4:].decode()) for kv in kvs]

    async def rescued_customers(self) -> list[str]:
        """Every customer with rescue entries, with a record or not (a refresh fenced
        out by a disconnect leaves its tokens in rescue under no record)."""
        await self._ensure()
        _, kvs = await self.client.range(self._prefix + b"rescue/", prefix=True,
                                         keys_only=True)
        return sorted({parsed[1] for kv in kvs if (parsed := self._parse_key(kv.key))})

    async def claim_once(self, key: str, ttl: float) -> bool:
        """True for the first claim of ``key`` within ``ttl`` seconds, in every process
        sharing the namespace: a Txn that creates ``NS/once/<key>`` only if absent,
        bound to a lease of its own (not the session's: the claim must outlive this
        process, or a replay would pass once it stops)."""
        await self._ensure()
        # Long keys are hashed: etcd bounds a request's size.
        label = quote(key, safe="") if len(key) <= 200 else \
            "sha256-" + hashlib.sha256(key.encode()).hexdigest()
        name = self._prefix + b"once/" + label.encode()
        lease, _ = await self.client.grant(max(2, int(ttl + 0.999)))
        # A value of our own: a retried Txn (its first answer lost) that finds the key
        # knows its own landed attempt by it.
        mine = secrets.token_hex(16).encode()
        result = await self.client.txn([compare(name, "create", "==", 0)],
                                       [put(name, mine, lease)], [get(name)])
        won = result.succeeded or bool(result.ranges and result.ranges[0] and
                                       result.ranges[0][0].value == mine)
        if not won:
            with contextlib.suppress(StoreError, LeaseLost):
                await self.client.revoke(lease)
        return won
