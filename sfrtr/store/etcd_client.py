"""A narrow etcd v3 client over gRPC: the only module that imports ``aetcd``.

sfrtr uses aetcd's generated gRPC stubs and messages, not its high-level
client: that client has no TLS channel and its watcher hides the compaction
and reconnect signals the protocol must see. What the store needs is small:
Txn with compares, ranges, leases with a keepalive stream, and one prefix
watch. Every unary call counts one round trip in :attr:`EtcdClient.round_trips`
(the benchmarks and the two-round-trip test read it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import grpc.aio
from aetcd import rpc

from sfrtr.errors import ConfigurationError, LeaseLost, StoreError

log = logging.getLogger(__name__)

Target = Literal["mod", "create", "version", "value", "lease"]
_TARGETS = {
    "mod": (rpc.Compare.MOD, "mod_revision"),
    "create": (rpc.Compare.CREATE, "create_revision"),
    "version": (rpc.Compare.VERSION, "version"),
    "value": (rpc.Compare.VALUE, "value"),
    "lease": (rpc.Compare.LEASE, "lease"),
}
_OPS = {"==": rpc.Compare.EQUAL, "!=": rpc.Compare.NOT_EQUAL, "<": rpc.Compare.LESS,
        ">": rpc.Compare.GREATER}


_CHANNEL_OPTIONS = [
    # Namespace loads are paginated (EtcdClient.range_pages); this is only a margin
    # for one large page or a watch batch of big records, above gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
]


def compare(key: bytes, target: Target, op: str, value: int | bytes) -> Any:
    """Build a Txn compare whose filled field always matches its target.

    etcd silently compares against 0 when the target and the filled field
    disagree; building every compare here makes that mistake impossible.
    """
    enum, field_name = _TARGETS[target]
    if (field_name == "value") != isinstance(value, bytes):
        raise TypeError(f"compare on {target} needs {'bytes' if field_name == 'value' else 'int'}")
    message = rpc.Compare(key=key, target=enum, result=_OPS[op])
    setattr(message, field_name, value)
    return message


def put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def delete(key: bytes, *, prefix: bool = False) -> Any:
    end = prefix_end(key) if prefix else b""
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=end))


def get(key: bytes, *, prefix: bool = False, keys_only: bool = False) -> Any:
    end = prefix_end(key) if prefix else b""
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=end,
                                                        keys_only=keys_only))


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix``."""
    raw = bytearray(prefix)
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"


@dataclass(frozen=True, slots=True)
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    """The store revision after the Txn (the revision of its writes, if any)."""
    ranges: list[list[KV]]
    """The results of the Txn's range ops, in order."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    kv: KV


@dataclass(frozen=True, slots=True)
class WatchBatch:
    revision: int
    events: list[WatchEvent] = field(default_factory=list)
    compacted: bool = False
    """History up to the requested revision is gone: resynchronize from a read."""


@dataclass(frozen=True)
class EtcdSettings:
    """Where etcd is and how to talk to it."""

    endpoints: Sequence[str] = ("127.0.0.1:2379",)
    """``host:port`` of each member; calls fail over to the next on UNAVAILABLE."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    """CA bundle for TLS; TLS is on when any of the three files is given."""
    cert_file: str | None = None
    key_file: str | None = None
    timeout: float = 5.0
    """Seconds per unary call."""

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigurationError("at least one etcd endpoint is required")
        if (self.username is None) != (self.password is None):
            raise ConfigurationError("etcd username and password go together")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigurationError("etcd client cert and key go together")

    @property
    def tls(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))


def _kv(message: Any) -> KV:
    return KV(message.key, message.value, message.mod_revision, message.create_revision,
              message.lease)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _tls_hint(details: str) -> str:
    """What to check when gRPC's details tell of a failed TLS handshake."""
    lowered = details.lower()
    if not any(word in lowered for word in ("ssl", "tls", "handshake", "certificate")):
        return ""
    return ("; TLS handshake failed: check the CA file (ca_file), that the certificates "
            "have not expired, that the server certificate names this host, and that the "
            "client certificate is one the server trusts")


def _call_cancelled() -> bool:
    """Whether a CancelledError just caught came from the gRPC call (its channel was
    closed under it: grpc.aio raises CancelledError then) rather than from a
    cancellation of the task awaiting it, which must propagate."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class StreamBroken(StoreError):
    """A stream failed (not merely a slow answer): its connection may be gone, and
    other streams on it with it, silently."""


class KeepAlive:
    """One LeaseKeepAlive stream: each :meth:`ping` is one round trip."""

    def __init__(self, client: EtcdClient, call: Any, channel: Any = None) -> None:
        self._client = client
        self._call = call
        self._channel = channel

    async def ping(self, lease_id: int, timeout: float) -> int | None:
        """The lease's remaining TTL as the server sees it (0: the lease is gone);
        ``None`` if the stream ended. Raises :class:`StoreError` on a broken stream."""
        self._client.keepalive_pings += 1
        try:
            await self._call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
            reply = await asyncio.wait_for(self._call.read(), timeout)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            # InvalidStateError: the call already finished (its connection was cut).
            self._client.suspect(self._channel)
            raise StreamBroken(f"etcd keepalive broke: {type(exc).__name__}") from None
        except TimeoutError:
            self._client.suspect(self._channel)  # a frozen member answers nothing
            raise StoreError("etcd keepalive answer timed out") from None
        except asyncio.CancelledError:
            if _call_cancelled():
                raise StreamBroken("etcd keepalive broke: its channel was closed") from None
            raise
        if reply is grpc.aio.EOF:
            return None
        return int(reply.TTL)

    def close(self) -> None:
        self._call.cancel()


class WatchStream:
    """Many watchers on one Watch stream, named by ids the caller chooses.

    :meth:`add` and :meth:`remove` only send; :meth:`read` yields each
    watcher's events as ``(watch_id, batch)``. A watcher whose history was
    compacted away yields one ``compacted`` batch and is gone (etcd cancels it);
    a broken stream raises :class:`StreamBroken` from any call, and every
    watcher on it is gone with it.
    """

    def __init__(self, call: Any, client: EtcdClient | None = None,
                 channel: Any = None) -> None:
        self._call = call
        self._client = client
        self._channel = channel
        self._write_lock = asyncio.Lock()  # grpc.aio allows one pending write per stream

    def _broken(self, why: str) -> StreamBroken:
        if self._client is not None:
            self._client.suspect(self._channel)
        return StreamBroken(f"etcd watch broke: {why}")

    async def _send(self, request: Any) -> None:
        async with self._write_lock:
            try:
                await self._call.write(request)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError,
                    asyncio.InvalidStateError) as exc:
                raise self._broken(type(exc).__name__) from None
            except asyncio.CancelledError:
                if _call_cancelled():
                    raise self._broken("its channel was closed") from None
                raise

    async def add(self, watch_id: int, key: bytes, range_end: bytes,
                  start_revision: int) -> None:
        """Watch ``[key, range_end)`` (``range_end`` empty: ``key`` alone) from
        ``start_revision`` on, as ``watch_id`` (which must not be in use)."""
        await self._send(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision,
            watch_id=watch_id)))

    async def remove(self, watch_id: int) -> None:
        await self._send(rpc.WatchRequest(cancel_request=rpc.WatchCancelRequest(
            watch_id=watch_id)))

    async def read(self) -> tuple[int, WatchBatch]:
        """The next watcher's events (created and cancelled replies are skipped)."""
        while True:
            try:
                reply = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                raise self._broken(exc.code().name) from None
            except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                raise self._broken(type(exc).__name__) from None
            except asyncio.CancelledError:
                if _call_cancelled():
                    raise self._broken("its channel was closed") from None
                raise
            if reply is grpc.aio.EOF:
                raise self._broken("the stream ended")
            if reply.compact_revision:
                return reply.watch_id, WatchBatch(reply.compact_revision, compacted=True)
            if reply.canceled:
                if reply.cancel_reason:
                    log.info("etcd cancelled watcher %d: %s", reply.watch_id,
                             reply.cancel_reason)
                    return reply.watch_id, WatchBatch(reply.header.revision, compacted=True)
                continue  # the answer to our own remove
            if not reply.events:
                continue  # created, or a progress notification
            events = [WatchEvent("delete" if e.type == rpc.Event.DELETE else "put", _kv(e.kv))
                      for e in reply.events]
            return reply.watch_id, WatchBatch(reply.header.revision, events)

    def close(self) -> None:
        self._call.cancel()


class EtcdClient:
    """Unary KV and lease calls, a keepalive stream and watch streams.

    One channel at a time, to one endpoint. With several endpoints it moves to
    the next one when that one fails: at once for a unary call that finds it
    unavailable (the call is retried there), and for the next call or stream
    after a stream broke or an answer timed out on it (a killed member refuses,
    a frozen one answers nothing). Leases and watches are the cluster's, not a
    member's: moving keeps the lease, and a watch resumes from its revision.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self.round_trips = 0
        """Unary calls made (reads, Txns, lease grants); keepalive pings not included."""
        self.keepalive_pings = 0
        self.failovers = 0
        """Times this client moved to another endpoint."""
        self._endpoint = 0
        self._channel: grpc.aio.Channel | None = None
        self._suspect: grpc.aio.Channel | None = None
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._kv: Any = None
        self._lease: Any = None
        self._watch: Any = None
        self._connect_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[Any]] = set()

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now."""
        return self.settings.endpoints[self._endpoint % len(self.settings.endpoints)]

    async def connect(self) -> None:
        """Open a channel if none is open, or move on from one a stream found failing."""
        if self._channel is not None and self._suspect is not self._channel:
            return
        async with self._connect_lock:
            if self._channel is not None and self._suspect is self._channel:
                self._move_on(self._channel)
            if self._channel is None:
                await self._open()

    async def _open(self) -> None:
        target = self.endpoint
        if self.settings.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(self.settings.ca_file),
                private_key=_read(self.settings.key_file),
                certificate_chain=_read(self.settings.cert_file))
            channel = grpc.aio.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._channel = channel
        self._kv = rpc.KVStub(channel)
        self._lease = rpc.LeaseStub(channel)
        self._watch = rpc.WatchStub(channel)
        if self.settings.username is not None:
            await self._authenticate()

    def suspect(self, channel: Any) -> None:
        """A stream on ``channel`` broke or went silent: with other endpoints to go
        to, the next call or stream moves on (if ``channel`` is still the one in use)."""
        if len(self.settings.endpoints) > 1 and channel is not None and \
                channel is self._channel:
            self._suspect = channel

    def _move_on(self, failed: grpc.aio.Channel) -> None:
        """Drop ``failed`` (if it is still the channel in use) for the next endpoint.
        Calls still running on it get a grace to finish (a member without a leader
        may still answer them); the next call opens the new channel."""
        old = self._channel
        if old is None or old is not failed:
            return  # another call moved on already
        self._channel = None
        self._endpoint += 1
        self.failovers += 1
        log.warning("etcd: moving to endpoint %s", self.endpoint)
        closing = old.close(grace=self.settings.timeout)
        task = asyncio.get_running_loop().create_task(closing)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _authenticate(self) -> None:
        assert self._channel is not None
        stub = rpc.AuthStub(self._channel)
        try:
            reply = await stub.Authenticate(
                rpc.AuthenticateRequest(name=self.settings.username,
                                        password=self.settings.password),
                timeout=self.settings.timeout)
        except grpc.aio.AioRpcError as exc:
            raise StoreError(f"etcd authentication failed at {self.endpoint}: "
                             f"{exc.code().name}{_tls_hint(exc.details() or '')}") from None
        self._metadata = (("token", reply.token),)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task

    async def _unary(self, stub: str, method: str, request: Any) -> Any:
        """One round trip, with one failover/re-authentication retry.

        UNAVAILABLE (the member is gone, or has no leader) is retried once on the
        next endpoint; a call that timed out is not retried (it may still land),
        but the next call goes to the next endpoint. A retried Txn may have landed
        the first time: the protocol's compares and intent nonces make that safe.
        """
        await self.connect()
        for attempt in (1, 2):
            channel = self._channel
            target = self.endpoint  # named in errors (a failover moves self.endpoint on)
            call = getattr(getattr(self, stub), method)
            self.round_trips += 1
            try:
                return await call(request, timeout=self.settings.timeout,
                                  metadata=self._metadata)
            except asyncio.CancelledError:
                if not _call_cancelled():
                    raise
                # Its channel was closed under it (another call moved on): the call
                # may have landed, as after UNAVAILABLE; retry once on the new channel.
                if attempt == 1:
                    await self.connect()
                    continue
                raise StoreError(f"etcd {method} failed: its channel was closed") from None
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                details = exc.details() or ""
                if "lease not found" in details:
                    raise LeaseLost("etcd lease not found (expired or revoked)") from None
                if attempt == 1 and code == grpc.StatusCode.UNAUTHENTICATED and \
                        self.settings.username is not None:
                    await self._authenticate()
                    continue
                if len(self.settings.endpoints) > 1 and channel is not None and code in (
                        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    async with self._connect_lock:
                        self._move_on(channel)
                    if attempt == 1 and code == grpc.StatusCode.UNAVAILABLE:
                        await self.connect()
                        continue
                raise StoreError(f"etcd {method} failed: {code.name} {details}".rstrip()
                                 + f" (endpoint {target}){_tls_hint(details)}"
                                 ) from None
        raise AssertionError("unreachable")

    # -- KV ------------------------------------------------------------------

    async def txn(self, compares: Sequence[Any], success: Sequence[Any],
                  failure: Sequence[Any] = ()) -> TxnResult:
        reply = await self._unary("_kv", "Txn", rpc.TxnRequest(
            compare=list(compares), success=list(success), failure=list(failure)))
        ranges = [[_kv(kv) for kv in r.response_range.kvs] for r in reply.responses
                  if r.WhichOneof("response") == "response_range"]
        return TxnResult(reply.succeeded, reply.header.revision, ranges)

    async def range(self, key: bytes, *, prefix: bool = False, keys_only: bool = False,
                    revision: int = 0) -> tuple[int, list[KV]]:
        end = prefix_end(key) if prefix else b""
        reply = await self._unary("_kv", "Range", rpc.RangeRequest(
            key=key, range_end=end, keys_only=keys_only, revision=revision))
        return reply.header.revision, [_kv(kv) for kv in reply.kvs]

    async def get_pair(self, first: bytes, second: bytes) -> tuple[int, list[KV], list[KV]]:
        """Two keys as of one revision: two Ranges, the second pinned to the first's.

        Not one read-only Txn: etcd up to 3.5.4 panics (the whole server exits)
        when the client goes away during a read-only Txn (etcd-io/etcd#14110), and
        a worker's connection can drop at any time; a Range just fails.
        """
        revision, a = await self.range(first)
        _, b = await self.range(second, revision=revision)
        return revision, a, b

    async def range_pages(self, prefix: bytes, page_size: int, *, keys_only: bool = False
                          ) -> AsyncIterator[tuple[int, list[KV]]]:
        """Every key under ``prefix``, ``page_size`` keys per round trip, all pages
        read at the first page's revision (one consistent snapshot). Yields
        ``(revision, kvs)``. A compaction past that revision between two pages
        fails the read (:class:`StoreError`): start again."""
        start, end, revision = prefix, prefix_end(prefix), 0
        while True:
            reply = await self._unary("_kv", "Range", rpc.RangeRequest(
                key=start, range_end=end, limit=page_size, revision=revision,
                keys_only=keys_only))
            if revision == 0:
                revision = reply.header.revision
            kvs = [_kv(kv) for kv in reply.kvs]
            yield revision, kvs
            if not reply.more or not kvs:
                return
            start = kvs[-1].key + b"\0"

    async def compact(self, revision: int) -> None:
        """Discard history before ``revision`` (operators do this; tests too)."""
        await self._unary("_kv", "Compact", rpc.CompactionRequest(revision=revision,
                                                                 physical=True))

    # -- leases --------------------------------------------------------------

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: ``(id, ttl)`` with the TTL the server granted."""
        reply = await self._unary("_lease", "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl))
        if reply.error:
            raise StoreError(f"etcd refused a lease: {reply.error}")
        return reply.ID, reply.TTL

    async def revoke(self, lease_id: int) -> None:
        with contextlib.suppress(LeaseLost):
            await self._unary("_lease", "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease_id))

    async def keepalive(self) -> KeepAlive:
        """A LeaseKeepAlive stream; close it when done."""
        await self.connect()
        return KeepAlive(self, self._lease.LeaseKeepAlive(metadata=self._metadata),
                         self._channel)

    # -- watch ---------------------------------------------------------------

    async def watch_stream(self) -> WatchStream:
        """One Watch stream carrying many watchers (the per-customer mirror's)."""
        await self.connect()
        return WatchStream(self._watch.Watch(metadata=self._metadata), self, self._channel)

    async def watch_prefix(self, prefix: bytes, start_revision: int
                           ) -> AsyncIterator[WatchBatch]:
        """Events under ``prefix`` from ``start_revision`` on, batch by batch.

        Ends (raises :class:`StoreError`) when the stream breaks; yields one
        ``compacted`` batch and ends if the history was compacted away.
        """
        await self.connect()
        channel = self._channel
        call = self._watch.Watch(metadata=self._metadata)
        try:
            await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=prefix, range_end=prefix_end(prefix), start_revision=start_revision,
                progress_notify=True)))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            call.cancel()
            self.suspect(channel)
            raise StreamBroken(f"etcd watch broke: {type(exc).__name__}") from None
        except asyncio.CancelledError:
            call.cancel()
            if _call_cancelled():
                raise StreamBroken("etcd watch broke: its channel was closed") from None
            raise
        try:
            while True:
                try:
                    reply = await call.read()
                except grpc.aio.AioRpcError as exc:
                    self.suspect(channel)
                    raise StreamBroken(f"etcd watch broke: {exc.code().name}") from None
                except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                    self.suspect(channel)
                    raise StreamBroken(f"etcd watch broke: {type(exc).__name__}") from None
                except asyncio.CancelledError:
                    if _call_cancelled():
                        raise StreamBroken("etcd watch broke: its channel was closed") from None
                    raise
                if reply is grpc.aio.EOF:
                    self.suspect(channel)
                    raise StoreError("etcd watch stream ended")
                if reply.compact_revision:
                    yield WatchBatch(reply.compact_revision, compacted=True)
                    return
                if reply.canceled:
                    raise StoreError(f"etcd watch canceled: {reply.cancel_reason}")
                if reply.created and not reply.events:
                    # Its header revision is the store's, not a promise that every
                    # event up to it was delivered: nothing to yield.
                    continue
                events = [WatchEvent("delete" if e.type == rpc.Event.DELETE else "put",
                                     _kv(e.kv)) for e in reply.events]
                yield WatchBatch(reply.header.revision, events)
        finally:
            call.cancel()
