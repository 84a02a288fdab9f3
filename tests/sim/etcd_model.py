"""A model of etcd v3 behind the interface of ``sfrtr.store.etcd_client.EtcdClient``.

It interprets the real protobuf requests the store builds (``compare``,
``put``, ``delete``, ``get``): one global revision, per-key create/mod
revision and version, leases that expire in virtual time and delete the keys
bound to them, Txn atomicity, and watch streams that deliver events in
revision order with a per-worker lag. Faults: unavailability windows (for
everyone, or one worker cut off), answers lost after the request was applied
(any, or an acquire's over a record a refresh left behind), a retried request
applied twice, compaction (slow watchers get a ``compacted`` batch, as etcd
cancels them). Creating a watch takes 0.05-0.55 s, as the created reply does
over a real connection.

The model's own timers run in a context owned by nobody, so pausing or
killing a worker never stops etcd; a request travels in its worker's context,
so a paused worker neither sends nor hears.
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import inspect
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aetcd import rpc

from sfrtr.errors import LeaseLost, StoreError
from sfrtr.store.etcd_client import (
    KV,
    EtcdClient,
    TxnResult,
    WatchBatch,
    WatchEvent,
    prefix_end,
)

#: Which oneof field each compare target reads (etcd compares an unset one as 0).
_TARGET_FIELD = {rpc.Compare.MOD: "mod_revision", rpc.Compare.CREATE: "create_revision",
                 rpc.Compare.VERSION: "version", rpc.Compare.VALUE: "value",
                 rpc.Compare.LEASE: "lease"}

#: Whether the adapter at this commit yields the watch-created reply as a batch.
#: The model answers as the adapter would, so the store sees what it sees on real etcd.
ADAPTER_YIELDS_CREATED = "created" not in inspect.getsource(EtcdClient.watch_prefix)


@dataclass
class _Key:
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass
class Faults:
    """The etcd faults in force; the runner sets them from the plan."""

    down: Callable[[float], bool] = lambda now: False
    lost: Callable[[float], float] = lambda now: 0.0
    """Probability that an applied request's answer is lost."""
    dup: Callable[[float], float] = lambda now: 0.0
    """Probability that a request is applied twice (the adapter's retry)."""
    lag: Callable[[str, float], float] = lambda worker, now: 0.002
    """Watch delivery lag for a worker, seconds."""
    cut: Callable[[str, float], bool] = lambda worker, now: False
    """Whether a worker is partitioned from etcd (etcd itself is up)."""
    acquire_lost: Callable[[float], float] = lambda now: 0.0
    """Probability that the answer of an acquire (a Txn putting the lock and the record)
    over a ``refreshing`` or ``indeterminate`` record is lost after it was applied."""


@dataclass
class _Watcher:
    worker: str
    prefix: bytes
    end: bytes
    loop: asyncio.AbstractEventLoop
    pending: deque[tuple[float, WatchBatch]] = field(default_factory=deque)
    last_at: float = 0.0
    broken: str = ""
    wakeup: asyncio.Future[None] | None = None
    caught_up: Callable[[str, int], None] | None = None
    """Called (soon, in the reader's context) when a delivered batch leaves nothing
    pending: the worker's mirror has then applied everything up to its revision."""

    def push(self, at: float, batch: WatchBatch) -> None:
        at = max(at, self.last_at)  # a stream delivers in order
        self.last_at = at
        self.pending.append((at, batch))
        self._wake()

    def break_(self, why: str) -> None:
        self.broken = why
        self._wake()

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def next(self) -> WatchBatch:
        while True:
            if self.broken:
                raise StoreError(f"etcd watch broke: {self.broken}")
            now = self.loop.time()
            self.wakeup = self.loop.create_future()
            if self.pending:
                at, batch = self.pending[0]
                if at <= now:
                    self.pending.popleft()
                    if self.caught_up is not None and not self.pending and \
                            not batch.compacted:
                        self.loop.call_soon(self.caught_up, self.worker, batch.revision)
                    return batch
                timer = self.loop.call_at(at, self._wake)
                try:
                    await self.wakeup
                finally:
                    timer.cancel()
            else:
                await self.wakeup


class EtcdModel:
    """The cluster: one keyspace, shared by every worker's client."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rng: random.Random,
                 trace: Callable[[str | None, str], None],
                 watch_rng: random.Random | None = None) -> None:
        self.loop = loop
        self.rng = rng
        self.watch_rng = watch_rng or random.Random(0)
        """Draws watch-creation latencies (a stream of its own)."""
        self.on_caught_up: Callable[[str, int], None] | None = None
        self.trace = trace
        self.faults = Faults()
        self.revision = 1
        self.compact_revision = 0
        self.keys: dict[bytes, _Key] = {}
        self._sorted: list[bytes] = []
        self.history: list[tuple[int, list[WatchEvent]]] = []
        self.leases: dict[int, float] = {}
        """lease -> virtual deadline."""
        self.ttls: dict[int, int] = {}
        self.owners: dict[int, str] = {}
        """lease -> the worker that granted it."""
        self._next_lease = 0x7A00
        self.watchers: list[_Watcher] = []
        self._ctx = contextvars.Context()  # nobody's: pausing a worker never stops etcd

    # -- keyspace ----------------------------------------------------------------

    def _kv(self, key: bytes, keys_only: bool = False) -> KV:
        k = self.keys[key]
        return KV(key, b"" if keys_only else k.value, k.mod_revision, k.create_revision, k.lease)

    def _span(self, key: bytes, end: bytes) -> list[bytes]:
        if not end:
            return [key] if key in self.keys else []
        lo = bisect.bisect_left(self._sorted, key)
        hi = len(self._sorted) if end == b"\0" else bisect.bisect_left(self._sorted, end)
        return self._sorted[lo:hi]

    def range(self, key: bytes, end: bytes = b"", keys_only: bool = False) -> list[KV]:
        return [self._kv(k, keys_only) for k in self._span(key, end)]

    def _put(self, key: bytes, value: bytes, lease: int, rev: int,
             events: list[WatchEvent]) -> None:
        old = self.keys.get(key)
        if old is None:
            bisect.insort(self._sorted, key)
            self.keys[key] = _Key(value, rev, rev, 1, lease)
        else:
            old.value, old.mod_revision, old.version, old.lease = \
                value, rev, old.version + 1, lease
        events.append(WatchEvent("put", self._kv(key)))

    def _delete(self, key: bytes, end: bytes, rev: int, events: list[WatchEvent]) -> None:
        for k in self._span(key, end):
            old = self.keys.pop(k)
            self._sorted.remove(k)
            events.append(WatchEvent("delete", KV(k, b"", rev, old.create_revision, 0)))

    def _compare(self, c: Any) -> bool:
        key = self.keys.get(c.key)
        name = _TARGET_FIELD[c.target]
        want = getattr(c, name)
        if name == "value":
            if key is None:
                return False
            have: Any = key.value
        else:
            have = 0 if key is None else getattr(key, name)
        result = c.result
        if result == rpc.Compare.EQUAL:
            return bool(have == want)
        if result == rpc.Compare.NOT_EQUAL:
            return bool(have != want)
        if result == rpc.Compare.LESS:
            return bool(have < want)
        return bool(have > want)

    def txn(self, compares: Sequence[Any], success: Sequence[Any],
            failure: Sequence[Any]) -> TxnResult:
        ok = all(self._compare(c) for c in compares)
        ops = success if ok else failure
        for op in ops:
            if op.WhichOneof("request") == "request_put":
                lease = op.request_put.lease
                if lease and lease not in self.leases:
                    raise LeaseLost("etcd lease not found (expired or revoked)")
        rev = self.revision + 1
        events: list[WatchEvent] = []
        ranges: list[list[KV]] = []
        for op in ops:
            kind = op.WhichOneof("request")
            if kind == "request_put":
                p = op.request_put
                self._put(p.key, p.value, p.lease, rev, events)
            elif kind == "request_delete_range":
                d = op.request_delete_range
                self._delete(d.key, d.range_end, rev, events)
            elif kind == "request_range":
                r = op.request_range
                ranges.append(self.range(r.key, r.range_end, r.keys_only))
            else:
                raise AssertionError(f"the model does not know Txn op {kind}")
        if events:
            self._commit(rev, events)
        return TxnResult(ok, self.revision, ranges)

    def _commit(self, rev: int, events: list[WatchEvent]) -> None:
        self.revision = rev
        self.history.append((rev, events))
        now = self.loop.time()
        for w in self.watchers:
            mine = [e for e in events if w.prefix <= e.kv.key < w.end]
            if mine and not w.broken:
                w.push(now + self.faults.lag(w.worker, now), WatchBatch(rev, mine))

    # -- leases --------------------------------------------------------------------

    def grant(self, ttl: int, owner: str = "") -> int:
        self._next_lease += 1
        lease = self._next_lease
        self.owners[lease] = owner
        self.leases[lease] = self.loop.time() + ttl
        self.ttls[lease] = ttl
        self._arm(lease)
        return lease

    def _arm(self, lease: int) -> None:
        self.loop.call_at(self.leases[lease], self._expire, lease, context=self._ctx)

    def _expire(self, lease: int) -> None:
        deadline = self.leases.get(lease)
        if deadline is None:
            return
        if deadline > self.loop.time():
            self._arm(lease)  # kept alive meanwhile: look again at the new deadline
            return
        self.trace(None, f"etcd: lease {lease:x} expired")
        self.revoke(lease)

    def keepalive(self, lease: int) -> int:
        if lease not in self.leases:
            return 0
        ttl = self.ttls[lease]
        self.leases[lease] = self.loop.time() + ttl
        return ttl

    def revoke(self, lease: int) -> None:
        if self.leases.pop(lease, None) is None:
            return
        bound = [k for k in self._sorted if self.keys[k].lease == lease]
        if bound:
            rev = self.revision + 1
            events: list[WatchEvent] = []
            for k in bound:
                self._delete(k, b"", rev, events)
            self._commit(rev, events)

    # -- compaction and watches ----------------------------------------------------

    def compact(self, revision: int) -> None:
        """Forget history up to ``revision``; watchers still behind it are cancelled
        with a compacted answer, as etcd does with slow watchers."""
        self.compact_revision = max(self.compact_revision, revision)
        self.history = [(r, e) for r, e in self.history if r > revision]
        now = self.loop.time()
        for w in self.watchers:
            if any(b.revision <= revision and b.events for _, b in w.pending):
                w.pending.clear()
                w.push(now + self.faults.lag(w.worker, now),
                       WatchBatch(self.compact_revision, compacted=True))
        self.trace(None, f"etcd: compacted at {revision}")

    def open_watch(self, worker: str, prefix: bytes, end: bytes, start: int) -> _Watcher:
        w = _Watcher(worker, prefix, end, self.loop, caught_up=self.on_caught_up)
        now = self.loop.time()
        lag = self.faults.lag(worker, now)
        if 0 < start <= self.compact_revision:
            w.push(now + lag, WatchBatch(self.compact_revision, compacted=True))
            return w
        if ADAPTER_YIELDS_CREATED:
            w.push(now + lag, WatchBatch(self.revision))
        if start:
            past = [e for r, evs in self.history if r >= start for e in evs
                    if prefix <= e.kv.key < end]
            if past:  # catch-up: one answer at the current revision, as etcd sends it
                w.push(now + lag, WatchBatch(self.revision, past))
        self.watchers.append(w)
        return w

    def close_watch(self, w: _Watcher) -> None:
        if w in self.watchers:
            self.watchers.remove(w)

    def break_watches(self, worker: str | None, why: str) -> None:
        for w in list(self.watchers):
            if worker is None or w.worker == worker:
                w.break_(why)
                self.watchers.remove(w)

    # -- inspection for the invariants -------------------------------------------------

    def value(self, key: bytes) -> bytes | None:
        k = self.keys.get(key)
        return None if k is None else k.value


_CMP = {rpc.Compare.EQUAL: "==", rpc.Compare.NOT_EQUAL: "!=", rpc.Compare.LESS: "<",
        rpc.Compare.GREATER: ">"}


def _short(key: bytes) -> str:
    return key.decode(errors="replace").partition("/")[2]


def _describe(compares: Sequence[Any], success: Sequence[Any], result: TxnResult) -> str:
    """A Txn as the timeline shows it: keys, compares and outcome, never a value."""
    conds = ", ".join(f"{_TARGET_FIELD[c.target].split('_')[0]}({_short(c.key)})"
                      f"{_CMP[c.result]}{getattr(c, _TARGET_FIELD[c.target])!r}"
                      for c in compares if _TARGET_FIELD[c.target] != "value")
    ops = []
    for op in success:
        kind = op.WhichOneof("request")
        if kind == "request_put":
            lease = op.request_put.lease
            ops.append(f"put {_short(op.request_put.key)}" + (f"@{lease:x}" if lease else ""))
        elif kind == "request_delete_range":
            ops.append(f"del {_short(op.request_delete_range.key)}")
    verdict = "ok" if result.succeeded else "FAILED"
    return f"etcd txn [{conds}] {verdict} rev {result.revision}: {', '.join(ops)}"


class _KeepAlive:
    def __init__(self, client: ModelClient) -> None:
        self._client = client
        self._closed = False

    async def ping(self, lease_id: int, timeout: float) -> int | None:
        c = self._client
        c.keepalive_pings += 1
        await c.travel()
        if self._closed:
            return None
        model = c.model
        now = model.loop.time()
        if c.unreachable(now):
            raise StoreError("etcd keepalive broke: AioRpcError")
        ttl = model.keepalive(lease_id)
        if model.rng.random() < model.faults.lost(now):
            await asyncio.sleep(timeout)
            raise StoreError("etcd keepalive answer timed out")
        await c.travel()
        return ttl

    def close(self) -> None:
        self._closed = True


class ModelClient:
    """One worker's connection to :class:`EtcdModel`, shaped like ``EtcdClient``."""

    def __init__(self, model: EtcdModel, worker: str, timeout: float = 5.0) -> None:
        self.model = model
        self.worker = worker
        self.timeout = timeout
        self.round_trips = 0
        self.keepalive_pings = 0

    async def travel(self) -> None:
        """One network hop: a millisecond or so, never zero (a hop always yields)."""
        await asyncio.sleep(0.0005 + self.model.rng.random() * 0.002)

    def unreachable(self, now: float) -> bool:
        faults = self.model.faults
        return faults.down(now) or faults.cut(self.worker, now)

    async def _unary(self, method: str, apply: Callable[[], Any], lose: float = 0.0) -> Any:
        self.round_trips += 1
        await self.travel()
        model = self.model
        now = model.loop.time()
        if self.unreachable(now):
            raise StoreError(f"etcd {method} failed: UNAVAILABLE")
        result = apply()
        if model.rng.random() < model.faults.dup(now):
            # The adapter's retry after UNAVAILABLE: etcd had applied the first.
            model.trace(self.worker, f"etcd: {method} applied twice (retry)")
            result = apply()
        if model.rng.random() < model.faults.lost(now) or \
                (lose > 0.0 and model.rng.random() < lose):
            model.trace(self.worker, f"etcd: {method} applied, answer lost")
            if model.rng.random() < 0.5:
                await asyncio.sleep(self.timeout)
                raise StoreError(f"etcd {method} failed: DEADLINE_EXCEEDED")
            await self.travel()
            raise StoreError(f"etcd {method} failed: UNAVAILABLE")
        await self.travel()
        return result

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def txn(self, compares: Sequence[Any], success: Sequence[Any],
                  failure: Sequence[Any] = ()) -> TxnResult:
        def apply() -> TxnResult:
            result = self.model.txn(compares, success, failure)
            if compares or any(op.WhichOneof("request") != "request_range" for op in success):
                self.model.trace(self.worker, _describe(compares, success, result))
            return result
        lose = self.model.faults.acquire_lost(self.model.loop.time())
        if lose > 0.0 and not self._acquires_after_refresh(success):
            lose = 0.0
        result: TxnResult = await self._unary("Txn", apply, lose)
        return result

    def _acquires_after_refresh(self, success: Sequence[Any]) -> bool:
        """Whether a Txn puts a lock and a record over a record a refresh left behind."""
        puts = [op.request_put.key for op in success
                if op.WhichOneof("request") == "request_put"]
        record = next((k for k in puts if b"/tok/" in k), None)
        if record is None or not any(b"/lock/" in k for k in puts):
            return False
        old = self.model.value(record)
        return old is not None and orjson.loads(old).get("status") in (
            "refreshing", "indeterminate")

    async def range(self, key: bytes, *, prefix: bool = False,
                    keys_only: bool = False) -> tuple[int, list[KV]]:
        end = prefix_end(key) if prefix else b""
        result: tuple[int, list[KV]] = await self._unary(
            "Range", lambda: (self.model.revision, self.model.range(key, end, keys_only)))
        return result

    async def get_pair(self, first: bytes, second: bytes
                       ) -> tuple[int, list[KV], list[KV]]:
        """Two keys as of one revision (the adapter reads them with two Ranges, the
        second pinned to the first's revision; the model answers both at once)."""
        result: tuple[int, list[KV], list[KV]] = await self._unary(
            "Range", lambda: (self.model.revision, self.model.range(first, b"", False),
                              self.model.range(second, b"", False)))
        return result

    async def range_pages(self, prefix: bytes, page_size: int
                          ) -> AsyncIterator[tuple[int, list[KV]]]:
        """Paginated load at one revision (the adapter's ``range_pages``): the model
        keeps no old versions, so the first page takes a snapshot that later pages
        are served from, one round trip each, failing if compacted past it."""
        end = prefix_end(prefix)
        snapshot: list[KV] = []
        revision = 0

        def first() -> tuple[int, list[KV]]:
            return self.model.revision, self.model.range(prefix, end)
        revision, snapshot = await self._unary("Range", first)
        for i in range(0, max(len(snapshot), 1), max(page_size, 1)):
            if i:
                def page(rev: int = revision) -> None:
                    if self.model.compact_revision > rev:
                        raise StoreError("etcd Range failed: compacted")
                await self._unary("Range", page)
            yield revision, snapshot[i:i + page_size]

    async def compact(self, revision: int) -> None:
        await self._unary("Compact", lambda: self.model.compact(revision))

    async def grant(self, ttl: int) -> tuple[int, int]:
        lease: int = await self._unary("LeaseGrant", lambda: self.model.grant(ttl, self.worker))
        return lease, ttl

    async def revoke(self, lease_id: int) -> None:
        await self._unary("LeaseRevoke", lambda: self.model.revoke(lease_id))

    async def keepalive(self) -> _KeepAlive:
        if self.unreachable(self.model.loop.time()):
            raise StoreError("etcd keepalive broke: UNAVAILABLE")
        return _KeepAlive(self)

    async def watch_prefix(self, prefix: bytes, start_revision: int
                           ) -> AsyncIterator[WatchBatch]:
        await self.travel()
        model = self.model
        if self.unreachable(model.loop.time()):
            raise StoreError("etcd watch broke: UNAVAILABLE")
        await asyncio.sleep(0.05 + model.watch_rng.random() * 0.5)  # the created reply
        w = model.open_watch(self.worker, prefix, prefix_end(prefix), start_revision)
        try:
            while True:
                batch = await w.next()
                yield batch
                if batch.compacted:
                    return
        finally:
            model.close_watch(w)

