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
    StreamBroken,
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


@dataclass(slots=True)
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


@dataclass(eq=False)
class _StreamWatcher:
    """One watcher of a multiplexed stream, as the server holds it."""

    stream: ModelWatchStream
    watch_id: int
    key: bytes
    end: bytes
    """``b""``: the key alone."""
    start: int
    removing: bool = False
    """The client sent its removal (the server may still deliver until it arrives)."""

    def covers(self) -> bytes:
        """The key, or the prefix, this watcher covers (prefix-shaped ranges only)."""
        return self.key


class ModelWatchStream:
    """A multiplexed Watch stream, as ``EtcdClient.watch_stream`` returns it.

    :meth:`add` and :meth:`remove` travel one hop and return (they only send).
    The server creates a watcher a created-reply latency later (0.05-0.55 s,
    from ``watch_rng``) and then sends the events since its start revision as
    one catch-up batch at the current revision; later events follow one batch
    per watcher per revision. The stream delivers in order, each batch no
    earlier than the worker's watch lag after its commit. A watcher whose start
    revision is compacted away, or which is still behind a compaction, or which
    the server cancels, yields one ``compacted`` batch for its id and is gone.
    A broken stream (etcd down, the worker partitioned or killed) raises
    :class:`StreamBroken` from every call. Removing a watcher stops its events
    once the removal reached the server; batches already on their way are
    still delivered (the client must ignore ids it no longer uses).
    """

    def __init__(self, client: ModelClient) -> None:
        self.client = client
        self.model = client.model
        self.worker = client.worker
        self.loop = client.model.loop
        self.pending: deque[tuple[float, int, WatchBatch]] = deque()
        self.last_at = 0.0
        self.broken = ""
        self.closed = False
        self.live: dict[int, _StreamWatcher] = {}
        """Watchers the server created and still holds."""
        self.creating: dict[int, _StreamWatcher] = {}
        """Watchers asked for, not yet created by the server."""
        self.removing: set[int] = set()
        """Ids whose removal the client sent and the server has not processed."""
        self._wakeup: asyncio.Future[None] | None = None
        self.delivered_events = 0
        self.delivered_batches = 0

    # -- server side (the model's context) ------------------------------------------

    def push(self, at: float, watch_id: int, batch: WatchBatch) -> None:
        at = max(at, self.last_at)  # a stream delivers in order
        self.last_at = at
        self.pending.append((at, watch_id, batch))
        self._wake()

    def _wake(self) -> None:
        # (close() may come from a killed worker's coroutine collected after the run.)
        if self._wakeup is not None and not self._wakeup.done() and not self.loop.is_closed():
            self._wakeup.set_result(None)

    def break_(self, why: str) -> None:
        if not self.broken:
            self.broken = why
        self._drop_all()
        self._wake()

    def _drop_all(self) -> None:
        for sw in self.live.values():
            self.model._unindex(sw)
        self.live.clear()
        self.creating.clear()
        if self in self.model.streams:
            self.model.streams.remove(self)

    def cancel(self, sw: _StreamWatcher, why: str) -> None:
        if self.live.get(sw.watch_id) is not sw:
            return
        del self.live[sw.watch_id]
        self.model._unindex(sw)
        now = self.loop.time()
        self.model.trace(self.worker, f"etcd: watcher {sw.watch_id} cancelled ({why})")
        self.push(now + self.model.faults.lag(self.worker, now), sw.watch_id,
                  WatchBatch(self.model.revision, compacted=True))

    def compacted(self, revision: int) -> None:
        """Watchers with undelivered events at or below ``revision`` are cancelled."""
        behind = {wid for _, wid, b in self.pending if b.events and b.revision <= revision}
        if not behind:
            return
        self.pending = deque(item for item in self.pending if item[1] not in behind)
        now = self.loop.time()
        for wid in sorted(behind):
            sw = self.live.pop(wid, None)
            if sw is not None:
                self.model._unindex(sw)
            self.push(now + self.model.faults.lag(self.worker, now), wid,
                      WatchBatch(self.model.compact_revision, compacted=True))

    def _create(self, sw: _StreamWatcher) -> None:
        if self.creating.get(sw.watch_id) is not sw or self.broken or self.closed:
            return
        del self.creating[sw.watch_id]
        model = self.model
        now = self.loop.time()
        at = now + model.faults.lag(self.worker, now)
        if sw.watch_id in self.live:
            error = (f"{self.worker} added watch id {sw.watch_id} while it was in use "
                     f"(etcd refuses it: duplicate watch ID)")
            model.stream_errors.append(error)
            model.trace(self.worker, f"etcd: {error}")
            self.push(at, sw.watch_id, WatchBatch(model.revision, compacted=True))
            return
        if 0 < sw.start <= model.compact_revision:
            self.push(at, sw.watch_id, WatchBatch(model.compact_revision, compacted=True))
            return
        if sw.start:
            past = model.events_since(sw.key, sw.end, sw.start)
            if past:  # catch-up: one answer at the current revision, as etcd sends it
                self.push(at, sw.watch_id, WatchBatch(model.revision, past))
        self.live[sw.watch_id] = sw
        model._index(sw)

    def _remove(self, watch_id: int) -> None:
        self.removing.discard(watch_id)
        self.creating.pop(watch_id, None)
        sw = self.live.pop(watch_id, None)
        if sw is not None:
            self.model._unindex(sw)

    # -- client side (the worker's context) ------------------------------------------

    def _check(self) -> None:
        if self.broken:
            raise StreamBroken(f"etcd watch broke: {self.broken}")
        if self.closed:
            raise StreamBroken("etcd watch stream closed")

    async def add(self, watch_id: int, key: bytes, range_end: bytes,
                  start_revision: int) -> None:
        self._check()
        await self.client.travel()
        self._check()
        model = self.model
        if self.client.unreachable(self.loop.time()):
            self.break_("UNAVAILABLE")
            self._check()
        sw = _StreamWatcher(self, watch_id, key, range_end, start_revision)
        self.creating[watch_id] = sw
        delay = 0.05 + model.watch_rng.random() * 0.5  # the server, then the created reply
        self.loop.call_at(self.loop.time() + delay, self._create, sw, context=model._ctx)

    async def remove(self, watch_id: int) -> None:
        self._check()
        self.removing.add(watch_id)
        for table in (self.live, self.creating):
            if watch_id in table:
                table[watch_id].removing = True
        await self.client.travel()
        self._check()
        if self.client.unreachable(self.loop.time()):
            self.break_("UNAVAILABLE")
            self._check()
        self._remove(watch_id)

    async def read(self) -> tuple[int, WatchBatch]:
        # Every reply is a separate read on a real stream: other tasks run between two
        # replies even when both are already there (a waiter can look at the mirror
        # between a Txn's record reply and its lock reply).
        await asyncio.sleep(0)
        while True:
            self._check()
            now = self.loop.time()
            self._wakeup = self.loop.create_future()
            if self.pending:
                at, watch_id, batch = self.pending[0]
                if at <= now:
                    self.pending.popleft()
                    self.delivered_batches += 1
                    self.delivered_events += len(batch.events)
                    self.client.watch_events += len(batch.events)
                    self.client.watch_batches += 1
                    if not self.pending and self.model.on_stream_caught_up is not None:
                        self.loop.call_soon(self._caught_up)
                    return watch_id, batch
                timer = self.loop.call_at(at, self._wake)
                try:
                    await self._wakeup
                finally:
                    timer.cancel()
            else:
                await self._wakeup

    def _caught_up(self) -> None:
        hook = self.model.on_stream_caught_up
        if hook is not None and not self.pending and not self.broken and not self.closed:
            hook(self.worker, self)

    def settled_watchers(self) -> dict[bytes, list[int]]:
        """key or prefix -> the ids of the live watchers on it the client has not
        asked to remove."""
        out: dict[bytes, list[int]] = {}
        for sw in self.live.values():
            if not sw.removing:
                out.setdefault(sw.key, []).append(sw.watch_id)
        return out

    def settled_keys(self) -> tuple[set[bytes], set[bytes]]:
        """What the live watchers cover, and what a watcher being created or removed
        covers (``(settled, unsettled)``, keys and prefixes as the watchers name them)."""
        unsettled = {sw.key for sw in self.creating.values()}
        unsettled |= {sw.key for sw in self.live.values() if sw.removing}
        settled = {sw.key for sw in self.live.values() if not sw.removing}
        return settled, unsettled

    def close(self) -> None:
        self.closed = True
        self._drop_all()
        self._wake()


class EtcdModel:
    """The cluster: one keyspace, shared by every worker's client."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rng: random.Random,
                 trace: Callable[[str | None, str], None],
                 watch_rng: random.Random | None = None) -> None:
        self.loop = loop
        self.rng = rng
        self.watch_rng = watch_rng or random.Random(0)
        # Seeded from the watch stream's state as text: hash() of that state is not
        # stable across processes (it holds None, whose hash is its address on 3.11).
        self.reply_rng = random.Random(repr(self.watch_rng.getstate()[1][:8]))
        """Orders the replies of one revision to one stream's watchers (its own
        generator, so drawing from it leaves every other draw of a schedule as it was)."""
        """Draws watch-creation latencies (a stream of its own)."""
        self.on_caught_up: Callable[[str, int], None] | None = None
        self.trace = trace
        self.faults = Faults()
        self.revision = 1
        self.compact_revision = 0
        self.keys: dict[bytes, _Key] = {}
        self._sorted: list[bytes] = []
        self.history: list[tuple[int, list[WatchEvent]]] = []
        self.commit_at: dict[int, float] = {}
        """Revision -> the virtual time it was committed (for the wake-up check)."""
        self.leases: dict[int, float] = {}
        """lease -> virtual deadline."""
        self.ttls: dict[int, int] = {}
        self.owners: dict[int, str] = {}
        """lease -> the worker that granted it."""
        self._next_lease = 0x7A00
        self.watchers: list[_Watcher] = []
        """Prefix watches (``watch_prefix``), one stream each."""
        self.streams: list[ModelWatchStream] = []
        """Multiplexed watch streams (``watch_stream``) still open."""
        self._by_key: dict[bytes, list[_StreamWatcher]] = {}
        self._by_prefix: dict[bytes, list[_StreamWatcher]] = {}
        self._ranged: list[_StreamWatcher] = []
        """Stream watchers, indexed: one key, a prefix (``[p, prefix_end(p))``), other ranges."""
        self.on_stream_caught_up: Callable[[str, ModelWatchStream], None] | None = None
        """Called (soon, in the reader's context) when a stream delivered a batch and
        has nothing left pending: every event of its live watchers up to the model's
        revision has then been delivered."""
        self.stream_errors: list[str] = []
        """Misuse of a stream by the client (a watch id added twice)."""
        self.versions: dict[bytes, list[tuple[int, _Key | None]]] = {}
        """key -> its states since the run began, ``(from revision, state or None)``, the
        first being its state before its first change: what pinned reads
        (``range(revision=R)``) and stream catch-ups are answered from. Pruned at
        compaction as etcd's MVCC store is."""
        self._ever: list[bytes] = []
        """Sorted keys of :attr:`versions`."""
        self.events_committed = 0
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

    def fill(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Put many keys at once, each at its own revision, with no watch events and no
        history: the state a cluster was in before the run (the scale mode's million
        customers, written without a million Txns)."""
        for key, value in items:
            self.revision += 1
            self.keys[key] = _Key(value, self.revision, self.revision, 1, 0)
        self._sorted = sorted(self.keys)

    def state_at(self, key: bytes, revision: int) -> _Key | None:
        """The key as of ``revision`` (not compacted away)."""
        hist = self.versions.get(key)
        if hist is None:  # unchanged since the run began (or filled before it)
            k = self.keys.get(key)
            return k if k is not None and k.mod_revision <= revision else None
        found: _Key | None = None
        for since, state in hist:
            if since > revision:
                break
            found = state
        return found

    def range_at(self, key: bytes, end: bytes, keys_only: bool, revision: int) -> list[KV]:
        """A Range pinned to ``revision`` (0: the current one), as etcd answers it."""
        if revision <= 0 or revision == self.revision:
            return self.range(key, end, keys_only)
        if revision > self.revision:
            raise StoreError("etcd Range failed: OUT_OF_RANGE (future revision)")
        if revision < self.compact_revision:
            raise StoreError("etcd Range failed: OUT_OF_RANGE "
                             "(required revision has been compacted)")
        if end:
            lo = bisect.bisect_left(self._ever, key)
            hi = len(self._ever) if end == b"\0" else bisect.bisect_left(self._ever, end)
            names = sorted(set(self._span(key, end)) | set(self._ever[lo:hi]))
        else:
            names = [key]
        out = []
        for k in names:
            st = self.state_at(k, revision)
            if st is not None:
                out.append(KV(k, b"" if keys_only else st.value, st.mod_revision,
                              st.create_revision, st.lease))
        return out

    def _history_of(self, key: bytes) -> list[tuple[int, _Key | None]]:
        hist = self.versions.get(key)
        if hist is None:
            old = self.keys.get(key)
            prior = None if old is None else _Key(old.value, old.create_revision,
                                                  old.mod_revision, old.version, old.lease)
            hist = self.versions[key] = [(0 if old is None else old.mod_revision, prior)]
            bisect.insort(self._ever, key)
        return hist

    def events_since(self, key: bytes, end: bytes, start: int) -> list[WatchEvent]:
        """The events of ``[key, end)`` at revisions >= ``start``, in revision order
        (from the per-key states, so a catch-up costs the keys it covers)."""
        if end:
            lo = bisect.bisect_left(self._ever, key)
            hi = len(self._ever) if end == b"\0" else bisect.bisect_left(self._ever, end)
            names = self._ever[lo:hi]
        else:
            names = [key] if key in self.versions else []
        found: list[tuple[int, int, WatchEvent]] = []
        for n, k in enumerate(names):
            hist = self.versions[k]
            for i in range(1, len(hist)):
                rev, st = hist[i]
                if rev < start:
                    continue
                if st is not None:
                    kv = KV(k, st.value, st.mod_revision, st.create_revision, st.lease)
                    found.append((rev, n, WatchEvent("put", kv)))
                else:
                    before = hist[i - 1][1]
                    create = before.create_revision if before is not None else 0
                    found.append((rev, n, WatchEvent("delete", KV(k, b"", rev, create, 0))))
        found.sort(key=lambda item: (item[0], item[1]))
        return [e for _, _, e in found]

    def _put(self, key: bytes, value: bytes, lease: int, rev: int,
             events: list[WatchEvent]) -> None:
        hist = self._history_of(key)
        old = self.keys.get(key)
        if old is None:
            bisect.insort(self._sorted, key)
            new = self.keys[key] = _Key(value, rev, rev, 1, lease)
        else:
            old.value, old.mod_revision, old.version, old.lease = \
                value, rev, old.version + 1, lease
            new = old
        hist.append((rev, _Key(new.value, new.create_revision, new.mod_revision,
                               new.version, new.lease)))
        events.append(WatchEvent("put", self._kv(key)))

    def _delete(self, key: bytes, end: bytes, rev: int, events: list[WatchEvent]) -> None:
        for k in self._span(key, end):
            self._history_of(k).append((rev, None))
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
        self.events_committed += len(events)
        self.history.append((rev, events))
        self.commit_at[rev] = self.loop.time()
        now = self.loop.time()
        for w in self.watchers:
            mine = [e for e in events if w.prefix <= e.kv.key < w.end]
            if mine and not w.broken:
                w.push(now + self.faults.lag(w.worker, now), WatchBatch(rev, mine))
        if self._by_key or self._by_prefix or self._ranged:
            hits: dict[_StreamWatcher, list[WatchEvent]] = {}
            for e in events:
                for sw in self._stream_watchers_of(e.kv.key):
                    hits.setdefault(sw, []).append(e)
            # One Txn's events reach a stream as one reply per watcher, and etcd sends
            # those replies in no promised order (a served customer's record and lock
            # watchers see an acquire or a commit as two replies): shuffle them.
            # Each is its own message: a little apart, so the worker's other tasks
            # can run between them.
            replies = list(hits.items())
            self.reply_rng.shuffle(replies)
            gap: dict[ModelWatchStream, float] = {}
            for sw, mine in replies:
                st = sw.stream
                gap[st] = gap.get(st, -0.0005) + 0.0005 + self.reply_rng.random() * 0.002
                st.push(now + self.faults.lag(st.worker, now) + gap[st], sw.watch_id,
                        WatchBatch(rev, mine))

    def _stream_watchers_of(self, key: bytes) -> list[_StreamWatcher]:
        found = list(self._by_key.get(key, ()))
        if self._by_prefix:
            for i in range(len(key) + 1):
                found += self._by_prefix.get(key[:i], ())
        found += [sw for sw in self._ranged if sw.key <= key < sw.end]
        return found

    def _index(self, sw: _StreamWatcher) -> None:
        if not sw.end:
            self._by_key.setdefault(sw.key, []).append(sw)
        elif sw.end == prefix_end(sw.key) and sw.end != b"\0":
            self._by_prefix.setdefault(sw.key, []).append(sw)
        else:
            self._ranged.append(sw)

    def _unindex(self, sw: _StreamWatcher) -> None:
        for table in (self._by_key, self._by_prefix):
            group = table.get(sw.key)
            if group is not None and sw in group:
                group.remove(sw)
                if not group:
                    del table[sw.key]
                return
        if sw in self._ranged:
            self._ranged.remove(sw)

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
        for hist in self.versions.values():
            # Keep the state as of the compact revision and everything after it.
            keep = 0
            while keep + 1 < len(hist) and hist[keep + 1][0] <= revision:
                keep += 1
            if keep:
                del hist[:keep]
        now = self.loop.time()
        for w in self.watchers:
            if any(b.revision <= revision and b.events for _, b in w.pending):
                w.pending.clear()
                w.push(now + self.faults.lag(w.worker, now),
                       WatchBatch(self.compact_revision, compacted=True))
        for st in list(self.streams):
            st.compacted(revision)
        self.trace(None, f"etcd: compacted at {revision}")

    def open_watch(self, worker: str, prefix: bytes, end: bytes, start: int) -> _Watcher:
        # Only a watch over the records and locks (the namespace mirror's) vouches
        # for the mirror when it catches up; a narrower one (the member list) does not.
        covers = prefix <= b"sim/lock/" and end > b"sim/tok/"
        w = _Watcher(worker, prefix, end, self.loop,
                     caught_up=self.on_caught_up if covers else None)
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
        for st in list(self.streams):
            if worker is None or st.worker == worker:
                st.break_(why)

    def cancel_stream_watchers(self, worker: str, p: float, why: str) -> int:
        """The server cancels each of ``worker``'s stream watchers with chance ``p``
        (each yields a ``compacted`` batch, as the adapter reports a cancel with a
        reason, and is gone); the streams themselves stay up. How many were cancelled."""
        n = 0
        for st in self.streams:
            if st.worker != worker:
                continue
            for sw in list(st.live.values()):
                if self.watch_rng.random() < p:
                    st.cancel(sw, why)
                    n += 1
        return n

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
        self.watch_events = 0
        """Watch events delivered to this worker (both kinds of watch)."""
        self.watch_batches = 0

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

    async def range(self, key: bytes, *, prefix: bool = False, keys_only: bool = False,
                    revision: int = 0) -> tuple[int, list[KV]]:
        """A Range, at the current revision or pinned to ``revision`` (answered from
        the model's per-key states; below the compact revision it fails as etcd's
        ``required revision has been compacted`` does). The header revision is the
        current one, as etcd's is."""
        end = prefix_end(key) if prefix else b""
        model = self.model
        result: tuple[int, list[KV]] = await self._unary(
            "Range", lambda: (model.revision, model.range_at(key, end, keys_only, revision)))
        return result

    async def get_pair(self, first: bytes, second: bytes
                       ) -> tuple[int, list[KV], list[KV]]:
        """Two keys as of one revision (the adapter reads them with two Ranges, the
        second pinned to the first's revision; the model answers both at once)."""
        result: tuple[int, list[KV], list[KV]] = await self._unary(
            "Range", lambda: (self.model.revision, self.model.range(first, b"", False),
                              self.model.range(second, b"", False)))
        return result

    async def range_pages(self, prefix: bytes, page_size: int, *, keys_only: bool = False
                          ) -> AsyncIterator[tuple[int, list[KV]]]:
        """Paginated load at one revision (the adapter's ``range_pages``): the first
        page takes a snapshot that later pages are served from, one round trip each,
        failing if compacted past it (what pinned pages of etcd do)."""
        end = prefix_end(prefix)
        snapshot: list[KV] = []
        revision = 0

        def first() -> tuple[int, list[KV]]:
            return self.model.revision, self.model.range(prefix, end, keys_only)
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
                self.watch_events += len(batch.events)
                self.watch_batches += 1
                yield batch
                if batch.compacted:
                    return
        finally:
            model.close_watch(w)

    async def watch_stream(self) -> ModelWatchStream:
        """A multiplexed Watch stream (see :class:`ModelWatchStream`). Opening it sends
        nothing: if etcd is unreachable, its first call fails."""
        stream = ModelWatchStream(self)
        if self.unreachable(self.model.loop.time()):
            stream.broken = "UNAVAILABLE"
        else:
            self.model.streams.append(stream)
        return stream
