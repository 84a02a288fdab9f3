"""The Postgres store: a fleet of workers that already has Postgres (and no etcd).

Tables (``schema_sql`` in :mod:`sfrtr.store.postgres_schema`, prefix ``sfrtr``)::

    sfrtr_tokens    customer, record (jsonb; NULL: deleted), version, holder, stamp
    sfrtr_rescues   customer, fence, record
    sfrtr_seq       versions and stamps (one counter for every write)
    sfrtr_holders   holder numbers, one per store instance

**A lock that dies with its holder, and no transaction held across the
provider call.** Each store instance takes a number (a *holder*) and holds a
session advisory lock on it, ``(key, holder)``, on one connection of its own,
its *presence*, for as long as it lives. A customer's refresh lock is the
``holder`` column, written with the intent by the acquire's single ``UPDATE``
and cleared by the commit's; it counts as held only while that holder's
advisory lock is granted (``pg_locks``). When the process dies, or its presence
connection does (``pg_terminate_backend``, a restart, a network cut the server
notices), Postgres drops the advisory lock and every lock of that holder reads
as free at once; its intent is then an orphan. A late commit by the old holder
is fenced by the version, as on every store. No row lock or transaction stays
open while the token endpoint is called, so a thousand concurrent refreshes
cost a thousand short statements, not a thousand open transactions.

**The lease.** Unlike a kernel file lock, a presence connection can be lost
while the process lives, and the process may not know (a network cut). So the
presence is a lease: a heartbeat every ``lease_ttl / 3`` on the presence
connection, and :meth:`lease_remaining` counts down ``lease_ttl`` from when the
last successful heartbeat was *sent*. The server had the session alive when it
answered, so it dropped the lock after that send; a recoverer waits
``lease_ttl`` + the request limit after it first sees the orphan (the manager's
grace), and this process sends only while its countdown covers the whole
request. A failed or late heartbeat, or the connection's end, drops the
presence at once (``lease_remaining`` is 0 for its holder: nothing more is sent
under its locks; commits still go through, fenced) and the next round takes a
new holder number. ``idle_session_timeout`` = ``lease_ttl`` on the presence
(Postgres 14+) and TCP keepalives make the server drop a silent client's lock
too, so a partitioned process does not keep its customers locked for hours.

**Fencing** is the ``version`` column, compared inside the acquire, commit and
delete statements (an ``UPDATE`` re-checks its ``WHERE`` on a row another
transaction changed meanwhile). The acquire rewrites the record as
``refreshing`` with the intent in the same statement (the durable intent).

**Stamps** are ``2 * stamp + dead``: ``stamp`` is the counter value of the last
write to anything of the customer (record, lock, rescue), ``dead`` is 1 when
the row names a holder whose advisory lock is gone.

**Waking and subscribers.** Every write sends ``NOTIFY`` (customer and stamp,
never a token: any role may ``LISTEN``) in its own transaction. One listening
connection per store wakes this process's waiters and, for customers this
process uses, reads the changed rows (batched, one query) for subscribers.
A holder's death sends nothing: while anyone here waits on a customer locked by
another holder, the store checks that holder every ``holder_poll`` seconds (a
store that closes cleanly does notify). A lost listening connection is
re-opened and every customer in use re-read.

**Pool.** Store calls use a pool of ``pool_size`` connections; presence and
listening have their own connections, so a saturated pool (a storm over many
customers queues its reads, acquires and commits there) never delays a
heartbeat or a wake-up, and the hot path (a cached token) never touches the
store at all. Every pooled statement runs under ``statement_timeout`` and
``lock_timeout``; a call that cannot get a connection within ``acquire_timeout``
fails with :class:`~sfrtr.StoreError`, which the manager retries for writes
that carry tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from sfrtr.errors import ConfigurationError, LeaseLost, StoreError
from sfrtr.records import Intent, TokenRecord, Versioned
from sfrtr.store import sealing
from sfrtr.store.postgres_schema import SCHEMA_VERSION, Names, schema_sql

if TYPE_CHECKING:
    from sfrtr.store.sealing import Sealer

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("PostgresStore needs asyncpg: pip install 'sfrtr[postgres]'") from exc

log = logging.getLogger(__name__)

T = TypeVar("T")
Subscriber = Callable[[str, Versioned | None], None]
Connection = Any  # asyncpg.Connection (asyncpg ships no type hints)

_OPEN: weakref.WeakSet[PostgresStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A child that kept the presence socket open would keep a dead parent's locks
    # alive; its connections are not usable from the child anyway.
    for store in list(_OPEN):
        store._forked_away()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (for reprs and messages)."""
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)(\S+)", r"\1***", dsn, flags=re.IGNORECASE)


def _encode(record: TokenRecord, sealer: Sealer | None = None, namespace: str = "",
            customer: str = "") -> str:
    return orjson.dumps(sealing.encode(sealer, namespace, customer, record)).decode()


def _decode(raw: str | bytes, sealer: Sealer | None = None, namespace: str = "",
            customer: str = "") -> TokenRecord:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise StoreError("malformed token record in the Postgres store (not JSON)") from None
    return sealing.decode(sealer, namespace, customer, data)


def _sock_fd(conn: Connection) -> int | None:
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    return None if sock is None else int(sock.fileno())


class PostgresStore:
    """A :class:`~sfrtr.store.TokenStore` in Postgres, for workers on many hosts.
    One instance per process (create it after any ``fork()``).

    ``dsn``: a libpq URL or keyword string (asyncpg's). ``schema``/``prefix``: where
    the tables live. ``create_schema``: create or migrate the schema on first use;
    with ``False`` the store checks it exists (apply it with ``sfrtr migrate``).
    ``lease_ttl``: seconds a presence is trusted after its last heartbeat (see the
    module doc). ``pool_size``: pooled connections for store calls (presence and
    listening take two more). ``statement_timeout``, ``acquire_timeout``: seconds.
    ``holder_poll``: how often a holder that waiters here wait on is checked.
    ``sealer``: seal records at rest (:mod:`sfrtr.store.sealing`; the associated
    data's namespace is ``prefix``). ``async with PostgresStore(...) as store``
    starts and closes it.
    """

    def __init__(self, dsn: str, *, schema: str = "public", prefix: str = "sfrtr",
                 create_schema: bool = True, lease_ttl: float = 30.0, pool_size: int = 10,
                 pool_min_size: int = 1, statement_timeout: float = 5.0,
                 acquire_timeout: float = 10.0, connect_timeout: float = 5.0,
                 holder_poll: float = 0.5, sealer: Sealer | None = None) -> None:
        if lease_ttl < 1.5:
            raise ValueError("lease_ttl must be at least 1.5 seconds")
        if pool_size < 1 or not 0 <= pool_min_size <= pool_size:
            raise ValueError("pool_size must be >= 1 and pool_min_size within [0, pool_size]")
        if min(statement_timeout, acquire_timeout, connect_timeout, holder_poll) <= 0:
            raise ValueError("timeouts and holder_poll must be positive")
        self.dsn = dsn
        self.names = Names(schema, prefix)
        self.create_schema = create_schema
        self.sealer = sealer
        self._ttl = float(lease_ttl)
        self.pool_size = pool_size
        self.pool_min_size = pool_min_size
        self.statement_timeout = statement_timeout
        self.acquire_timeout = acquire_timeout
        self.connect_timeout = connect_timeout
        self.holder_poll = holder_poll
        n = self.names
        self._alive = (
            "EXISTS (SELECT 1 FROM pg_catalog.pg_locks l WHERE l.locktype = 'advisory'"
            f" AND l.classid = {n.key}::oid AND l.objid = ({{h}})::oid AND l.objsubid = 2"
            " AND l.granted AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d"
            " WHERE d.datname = current_database()))")
        rescued = f"EXISTS (SELECT 1 FROM {n.rescues} r WHERE r.customer = t.customer)"
        self._row = (f"SELECT t.customer, t.record, t.version, t.holder, t.stamp,"
                     f" t.holder IS NOT NULL AND {self._alive.format(h='t.holder')} AS alive,"
                     f" {rescued} AS rescued FROM {n.tokens} t")
        self._pool: Any = None
        self._presence: Connection | None = None
        self._presence_pid = 0
        self._holder: int | None = None
        self._deadline = 0.0
        self._lost_holders: list[int] = []
        self._listener: Connection | None = None
        self._subscribers: list[Subscriber] = []
        self._waiters: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}
        self._watched: dict[str, int] = {}
        """Customer -> the foreign holder its waiters here wait on."""
        self._known: dict[str, int] = {}
        """Customers this process uses -> the newest database stamp delivered here."""
        self._dirty: set[str] = set()
        self._drainer: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._poll_wake = asyncio.Event()
        self._presence_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False
        self._forked = False

    def __repr__(self) -> str:
        return (f"PostgresStore({redact_dsn(self.dsn)!r}, schema={self.names.schema!r}, "
                f"prefix={self.names.prefix!r}, holder={self._holder})")

    # -- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Connect (pool, presence, listener), create or check the schema, take a
        holder number and its advisory lock."""
        self._check_usable()
        async with self._start_lock:
            if self._started:
                return
            self._check_usable()
            if self.sealer is not None:
                await self.sealer.ready()
            try:
                self._pool = await asyncpg.create_pool(
                    self.dsn, min_size=self.pool_min_size, max_size=self.pool_size,
                    timeout=self.connect_timeout,
                    command_timeout=self.statement_timeout + 1.0,
                    server_settings=self._settings())
                async with self._pool.acquire(timeout=self.acquire_timeout) as conn:
                    await self._prepare_schema(conn)
                await self._open_presence()
                await self._open_listener()
            except BaseException as exc:
                await self._close_connections()
                if isinstance(exc, ConfigurationError | asyncio.CancelledError):
                    raise
                if isinstance(exc, Exception):
                    raise self._error(exc) from None
                raise
            self._started = True
            _OPEN.add(self)
            self._tasks = [asyncio.get_running_loop().create_task(self._keep()),
                           asyncio.get_running_loop().create_task(self._watch_holders())]
            log.info("Postgres store %s open (holder %s)", redact_dsn(self.dsn), self._holder)

    def _settings(self) -> dict[str, str]:
        ms = str(int(self.statement_timeout * 1000))
        return {"application_name": "sfrtr", "statement_timeout": ms, "lock_timeout": ms,
                "idle_in_transaction_session_timeout": str(int(self.statement_timeout * 2000))}

    async def _prepare_schema(self, conn: Connection) -> None:
        n = self.names
        if self.create_schema:
            async with conn.transaction():
                # Serialises concurrent first uses: CREATE ... IF NOT EXISTS races otherwise.
                await conn.execute("SELECT pg_advisory_xact_lock($1::int4, 0)", n.key)
                for statement in schema_sql(n):
                    await conn.execute(statement)
        try:
            version = await conn.fetchval(f"SELECT value FROM {n.meta} WHERE key = 'schema'")
        except asyncpg.UndefinedTableError:
            version = None
        if version != SCHEMA_VERSION:
            raise ConfigurationError(
                f"the Postgres schema {n.schema!r} (prefix {n.prefix!r}) is "
                f"{'missing' if version is None else f'at version {version}'}, this sfrtr "
                f"needs version {SCHEMA_VERSION}: run `sfrtr migrate --postgres DSN` or "
                "let the store create it (create_schema=True)")

    async def __aenter__(self) -> PostgresStore:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def _encode(self, customer: str, record: TokenRecord) -> str:
        return _encode(record, self.sealer, self.names.prefix, customer)

    def _decode(self, customer: str, raw: str | bytes) -> TokenRecord:
        return _decode(raw, self.sealer, self.names.prefix, customer)

    async def aclose(self) -> None:
        """Release the holder's lock (telling other processes at once), close everything.
        A lock this instance still held then reads as free, its intent as an orphan."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        for task in self._tasks:
            task.cancel()
        if self._drainer is not None:
            self._drainer.cancel()
        if not self._forked:
            presence, holder = self._presence, self._holder
            if presence is not None and holder is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await presence.execute(
                            "SELECT pg_advisory_unlock($1::int4, $2::int4),"
                            " pg_notify($3, 'h ' || $2::text)",
                            self.names.key, holder, self.names.channel)
            await self._close_connections()
        self._holder = None
        self._deadline = 0.0
        for event in self._waiters.values():
            event.set()
        self._waiters.clear()

    async def _close_connections(self) -> None:
        presence, self._presence = self._presence, None
        listener, self._listener = self._listener, None
        pool, self._pool = self._pool, None
        for conn in (listener, presence):
            if conn is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await conn.close()
                if not conn.is_closed():
                    conn.terminate()
        if pool is not None:
            try:
                async with asyncio.timeout(5):
                    await pool.close()
            except (Exception, TimeoutError):
                pool.terminate()

    def _check_usable(self) -> None:
        if self._forked:
            raise ConfigurationError(
                "this PostgresStore was opened before the process forked: create one "
                "PostgresStore per process, after the fork (the same DSN in each)")
        if self._closed:
            raise StoreError("the store is closed")

    def _forked_away(self) -> None:
        self._forked = True
        self._holder = None
        self._deadline = 0.0
        conns = [self._presence, self._listener]
        if self._pool is not None:
            conns += [getattr(h, "_con", None) for h in getattr(self._pool, "_holders", [])]
        for conn in conns:
            fd = None if conn is None else _sock_fd(conn)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    async def _ensure(self) -> None:
        if not self._started:
            await self.start()
        self._check_usable()

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback(customer, state)`` after every change to a customer this
        process uses, this process's and others' (``None``: deleted)."""
        self._check_usable()
        self._subscribers.append(callback)

    # -- the presence and its lease --------------------------------------------------

    @property
    def lease_ttl(self) -> float:
        return self._ttl

    @property
    def holder(self) -> int | None:
        """This instance's holder number now (what ``Intent.lease`` records)."""
        return self._holder

    def lease_remaining(self, lease: int | None = None) -> float | None:
        if self._holder is None or (lease is not None and lease != self._holder):
            return 0.0
        return max(0.0, self._deadline - time.monotonic())

    async def _open_presence(self) -> None:
        conn = await asyncpg.connect(
            self.dsn, timeout=self.connect_timeout,
            server_settings={"application_name": "sfrtr-presence",
                             "tcp_keepalives_idle": str(max(1, int(self._ttl / 3))),
                             "tcp_keepalives_interval": str(max(1, int(self._ttl / 6))),
                             "tcp_keepalives_count": "3"})
        try:
            if conn.get_server_version().major >= 14:
                # The server drops a presence that stopped beating (a silent client).
                await conn.execute(f"SET idle_session_timeout = {int(self._ttl * 1000)}")
            n = self.names
            for _ in range(10):
                sent = time.monotonic()
                holder = int(await conn.fetchval(f"SELECT nextval('{n.holders}')"))
                if await conn.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)",
                                       n.key, holder):
                    break
            else:  # pragma: no cover - ten numbers in a row held: the sequence cycled
                raise StoreError("no free holder number in the Postgres store")
            pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._presence_ended)
        self._presence, self._presence_pid = conn, pid
        self._holder, self._deadline = holder, sent + self._ttl

    def _presence_ended(self, conn: Connection) -> None:
        if conn is self._presence:
            self._drop_presence("its connection ended")

    def _drop_presence(self, why: str) -> None:
        conn, self._presence = self._presence, None
        if self._holder is not None:
            log.warning("Postgres store: presence of holder %d lost (%s); its locks are "
                        "gone, nothing more is sent under them", self._holder, why)
            self._lost_holders.append(self._holder)
        self._holder, self._deadline = None, 0.0
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _heartbeat(self) -> None:
        conn = self._presence
        if conn is None:
            async with self._presence_lock:
                if self._presence is None and not self._closed:
                    await self._open_presence()
                    await self._end_lost_holders()
            return
        sent = time.monotonic()
        try:
            async with asyncio.timeout(self._ttl / 3):
                await conn.fetchval("SELECT 1")
        except (Exception, TimeoutError) as exc:
            if conn is self._presence:
                self._drop_presence(f"heartbeat failed: {type(exc).__name__}")
            return
        if conn is self._presence:
            self._deadline = sent + self._ttl

    async def _end_lost_holders(self) -> None:
        """A lost presence the server still keeps (a cut the server has not noticed)
        would keep its customers locked: end it, if this role may."""
        lost, self._lost_holders = self._lost_holders, []
        if not lost or self._pool is None:
            return
        with contextlib.suppress(Exception):
            async with self._pool.acquire(timeout=self.acquire_timeout) as conn:
                await conn.execute(
                    "SELECT pg_terminate_backend(l.pid) FROM pg_catalog.pg_locks l"
                    " WHERE l.locktype = 'advisory' AND l.classid = $1::int8::oid"
                    " AND l.objid = ANY($2::int8[]::oid[]) AND l.objsubid = 2 AND l.granted",
                    self.names.key, lost)
                await conn.execute(
                    "SELECT pg_notify($1, 'h ' || h::text) FROM unnest($2::int8[]) h",
                    self.names.channel, lost)

    async def _ensure_presence(self) -> int:
        if self._presence is None:
            try:
                async with self._presence_lock:
                    if self._presence is None:
                        await self._open_presence()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                raise self._error(exc) from None
        holder = self._holder
        if holder is None or self.lease_remaining(holder) == 0.0:
            raise LeaseLost("this process's presence in Postgres was lost; its locks are gone")
        return holder

    async def _keep(self) -> None:
        """Heartbeat the presence, keep the listener connected (and resynchronised)."""
        delay = self._ttl / 3
        while not self._closed:
            started = time.monotonic()
            try:
                await self._heartbeat()
            except Exception as exc:
                log.warning("Postgres store: presence not re-established (%s)",
                            type(exc).__name__)
            try:
                await self._check_listener()
            except Exception as exc:
                log.warning("Postgres store: listener not re-established (%s)",
                            type(exc).__name__)
            healthy = self._presence is not None and self._listener is not None
            pause = delay if healthy else min(delay, 0.5)
            await asyncio.sleep(max(0.0, started + pause - time.monotonic()))

    # -- listening --------------------------------------------------------------------

    async def _open_listener(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout,
                                     server_settings={"application_name": "sfrtr-listen"})
        try:
            await conn.add_listener(self.names.channel, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._listener_ended)
        self._listener = conn

    def _listener_ended(self, conn: Connection) -> None:
        if conn is self._listener:
            self._listener = None
            log.warning("Postgres store: listening connection lost; reconnecting")
            self._wake_all()  # whatever they wait for, they re-read (or see the outage)

    async def _check_listener(self) -> None:
        conn = self._listener
        if conn is not None:
            try:
                async with asyncio.timeout(self._ttl / 3):
                    await conn.fetchval("SELECT 1")
                return
            except (Exception, TimeoutError):
                if conn is self._listener:
                    self._listener = None
                if not conn.is_closed():
                    conn.terminate()
        if self._closed:
            return
        await self._open_listener()
        # Changes made while nobody listened: re-read every customer in use.
        self._dirty.update(self._known)
        self._kick_drain()
        self._wake_all()

    def _on_notify(self, conn: Connection, pid: int, channel: str, payload: str) -> None:
        head, _, rest = payload.partition(" ")
        if head == "h":
            with contextlib.suppress(ValueError):
                gone = int(rest)
                self._wake_all([c for c, h in self._watched.items() if h == gone])
            return
        try:
            stamp = int(head)
        except ValueError:
            return
        customer = rest
        if stamp <= self._known.get(customer, 0):
            return  # our own write, already delivered
        self._wake(customer)
        if customer in self._known and self._subscribers:
            self._dirty.add(customer)
            self._kick_drain()

    def _kick_drain(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Read the rows other processes changed (one query per batch) for subscribers."""
        while self._dirty and not self._closed:
            batch, self._dirty = sorted(self._dirty), set()
            try:
                rows = await self._run(lambda c, b=batch: c.fetch(  # type: ignore[misc]
                    self._row + " WHERE t.customer = ANY($1::text[])", b))
            except StoreError as exc:
                log.warning("Postgres store: reading changed customers failed (%s)", exc)
                self._dirty.update(batch)
                await asyncio.sleep(1.0)
                continue
            found = {row[0]: row for row in rows}
            for customer in batch:
                row = found.get(customer)
                try:
                    state = self._view(row)
                except StoreError as exc:
                    log.error("customer %s: %s", customer, exc)
                    continue
                self._deliver(customer, row[4] if row is not None else 0, state,
                              force=row is None)

    # -- waking --------------------------------------------------------------------------

    def _deliver(self, customer: str, stamp: int, state: Versioned | None, *,
                 force: bool = False) -> None:
        known = self._known.get(customer, 0)
        if stamp <= known and not force:
            return
        self._known[customer] = max(known, stamp)
        for callback in self._subscribers:
            try:
                callback(customer, state)
            except Exception:
                log.exception("a store subscriber failed")
        self._wake(customer)

    def _wake(self, customer: str) -> None:
        event = self._waiters.pop(customer, None)
        self._watched.pop(customer, None)
        if event is not None:
            event.set()

    def _wake_all(self, customers: list[str] | None = None) -> None:
        for customer in list(self._waiters) if customers is None else customers:
            self._wake(customer)

    async def _watch_holders(self) -> None:
        """While waiters here wait on customers locked by other holders, check those
        holders every ``holder_poll``: a dead one sends no NOTIFY."""
        while not self._closed:
            if not self._watched:
                self._poll_wake.clear()
                await self._poll_wake.wait()
                continue
            await asyncio.sleep(self.holder_poll)
            watched = dict(self._watched)
            if not watched:
                continue
            holders = sorted(set(watched.values()))
            try:
                dead = await self._run(lambda c, hs=holders: c.fetch(  # type: ignore[misc]
                    "SELECT h FROM unnest($1::int8[]) h WHERE NOT "
                    + self._alive.format(h="h"), hs))
            except StoreError:
                continue
            gone = {row[0] for row in dead}
            self._wake_all([c for c, h in watched.items() if h in gone])

    # -- running statements -------------------------------------------------------------

    async def _run(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        await self._ensure()
        pool = self._pool
        if pool is None:
            raise StoreError("the store is closed")
        try:
            async with pool.acquire(timeout=self.acquire_timeout) as conn:
                return await fn(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._error(exc) from None

    def _error(self, exc: BaseException) -> StoreError:
        """A clear error that never carries a bound value (a token): Postgres's detail
        lines can quote values, so only the primary message of a few classes is kept."""
        where = f"Postgres store {redact_dsn(self.dsn)}"
        if isinstance(exc, TimeoutError):
            return StoreError(f"{where}: timed out (no pooled connection within "
                              f"{self.acquire_timeout:g}s, or a statement past "
                              f"{self.statement_timeout:g}s)")
        if isinstance(exc, OSError):
            return StoreError(f"{where}: cannot connect ({exc.strerror or type(exc).__name__})")
        code = getattr(exc, "sqlstate", None) or ""
        name = type(exc).__name__
        if code[:2] in ("08", "53", "57", "40", "42", "28", "3D", "55") or \
                isinstance(exc, asyncpg.InterfaceError):
            first = str(exc).splitlines()[0] if str(exc) else name
            return StoreError(f"{where}: {name} {code}: {first}".replace("  ", " "))
        return StoreError(f"{where}: {name} {code}".rstrip())

    def _view(self, row: Any) -> Versioned | None:
        if row is None or row[1] is None:
            return None
        customer, raw, version, holder, stamp, alive, rescued = row
        dead = holder is not None and not alive
        return Versioned(self._decode(customer, raw), version, bool(alive), stamp=2 * stamp + dead,
                         rescued=bool(rescued))

    def _used(self, customer: str) -> None:
        self._known.setdefault(customer, 0)

    async def _fetch(self, customer: str) -> Any:
        self._used(customer)
        return await self._run(lambda c: c.fetchrow(self._row + " WHERE t.customer = $1",
                                                    customer))

    # -- TokenStore -------------------------------------------------------------------

    async def read(self, customer: str) -> Versioned | None:
        return self._view(await self._fetch(customer))

    async def put(self, customer: str, record: TokenRecord) -> Versioned:
        n = self.names
        self._used(customer)
        row = await self._run(lambda c: c.fetchrow(
            f"WITH s AS (SELECT nextval('{n.seq}') AS v),"
            f" gone AS (DELETE FROM {n.rescues} WHERE customer = $1),"
            f" up AS (INSERT INTO {n.tokens} (customer, record, version, holder, stamp)"
            "  SELECT $1, $2::jsonb, s.v, NULL, s.v FROM s"
            "  ON CONFLICT (customer) DO UPDATE SET record = excluded.record,"
            "  version = excluded.version, holder = NULL, stamp = excluded.stamp"
            "  RETURNING version)"
            " SELECT up.version, pg_notify($3, up.version::text || ' ' || $1) FROM up",
            customer, self._encode(customer, record), n.channel))
        state = Versioned(record, row[0], False, stamp=2 * row[0])
        self._deliver(customer, row[0], state)
        return state

    async def acquire(self, customer: str, expected_version: int,
                      intent: Intent) -> Versioned | None:
        n = self.names
        self._used(customer)
        holder = await self._ensure_presence()
        mine = dataclasses.replace(intent, lease=holder)
        row = await self._run(lambda c: c.fetchrow(
            f"WITH up AS (UPDATE {n.tokens} t SET record = t.record || jsonb_build_object("
            "  'status', 'refreshing', 'intent', $3::jsonb),"
            "  version = s.v, holder = $4, stamp = s.v"
            f"  FROM (SELECT nextval('{n.seq}') AS v) s"
            "  WHERE t.customer = $1 AND t.record IS NOT NULL AND t.version = $2"
            "  AND (t.holder IS NULL OR (t.holder <> $4 AND NOT "
            + self._alive.format(h="t.holder") + "))"
            "  AND " + self._alive.format(h="$4::int8") +
            "  RETURNING t.record, t.version)"
            f" SELECT up.record, up.version, EXISTS (SELECT 1 FROM {n.rescues} r"
            "  WHERE r.customer = $1), pg_notify($5, up.version::text || ' ' || $1) FROM up",
            customer, expected_version, orjson.dumps(dataclasses.asdict(mine)).decode(),
            holder, n.channel))
        if row is not None:
            state = Versioned(self._decode(customer, row[0]), row[1], True, stamp=2 * row[1],
                              rescued=bool(row[2]))
            self._deliver(customer, row[1], state)
            return state
        # Refused: someone moved first, or our own earlier attempt landed, or our
        # presence is gone (then nothing may be sent under it).
        found = await self._run(lambda c: c.fetchrow(
            self._row + " WHERE t.customer = $1", customer))
        if found is not None and found[1] is not None and found[3] == holder and found[5]:
            stored = self._view(found)
            assert stored is not None
            if intent.id and stored.record.intent is not None and \
                    stored.record.intent.id == intent.id:
                return stored  # a retried acquire whose first attempt landed: ours
        if self._holder == holder and self._presence is not None:
            ours_alive = await self._run(lambda c: c.fetchval(
                "SELECT " + self._alive.format(h="$1::int8"), holder))
            if not ours_alive:
                self._drop_presence("its advisory lock is gone")
        if self._holder != holder:
            raise LeaseLost("this process's presence in Postgres was lost; its locks are gone")
        return None

    async def commit(self, customer: str, fence: int, record: TokenRecord) -> Versioned | None:
        n = self.names
        self._used(customer)
        row = await self._run(lambda c: c.fetchrow(
            f"WITH up AS (UPDATE {n.tokens} t SET record = $3::jsonb, version = s.v,"
            "  holder = NULL, stamp = s.v"
            f"  FROM (SELECT nextval('{n.seq}') AS v) s"
            "  WHERE t.customer = $1 AND t.record IS NOT NULL AND t.version = $2"
            "  RETURNING t.version)"
            f" SELECT up.version, EXISTS (SELECT 1 FROM {n.rescues} r WHERE r.customer = $1),"
            "  pg_notify($4, up.version::text || ' ' || $1) FROM up",
            customer, fence, self._encode(customer, record), n.channel))
        if row is None:
            return None
        state = Versioned(record, row[0], False, stamp=2 * row[0], rescued=bool(row[1]))
        self._deliver(customer, row[0], state)
        return state

    async def save_rescue(self, customer: str, fence: int, record: TokenRecord) -> None:
        n = self.names
        self._used(customer)
        stamp = await self._run(lambda c: c.fetchval(
            f"WITH s AS (SELECT nextval('{n.seq}') AS v),"
            f" r AS (INSERT INTO {n.rescues} VALUES ($1, $2, $3::jsonb)"
            "  ON CONFLICT (customer, fence) DO UPDATE SET record = excluded.record),"
            f" up AS (INSERT INTO {n.tokens} (customer, record, version, holder, stamp)"
            "  SELECT $1, NULL, 0, NULL, s.v FROM s"
            "  ON CONFLICT (customer) DO UPDATE SET stamp = excluded.stamp RETURNING stamp)"
            " SELECT up.stamp FROM up, pg_notify($4, up.stamp::text || ' ' || $1) x",
            customer, fence, self._encode(customer, record), n.channel))
        await self._touched(customer, stamp)

    async def _touched(self, customer: str, stamp: int) -> None:
        """Tell this process's subscribers and waiters of a rescue change."""
        if stamp <= self._known.get(customer, 0):
            return
        try:
            state = await self.read(customer)
        except StoreError:
            self._wake(customer)
            return
        self._deliver(customer, stamp, state)

    async def reseal_rescue(self, customer: str, fence: int, record: TokenRecord) -> bool:
        """Write a rescue entry again (sealed with the newest key) only if it still
        exists: rekey must not bring back an entry adopted or dropped meanwhile."""
        n = self.names
        self._used(customer)
        done = await self._run(lambda c: c.fetchval(
            f"UPDATE {n.rescues} SET record = $3::jsonb WHERE customer = $1 AND fence = $2"
            " RETURNING true", customer, fence, self._encode(customer, record)))
        return bool(done)

    async def rescues(self, customer: str) -> list[tuple[int, TokenRecord]]:
        n = self.names
        rows = await self._run(lambda c: c.fetch(
            f"SELECT fence, record FROM {n.rescues} WHERE customer = $1 ORDER BY fence",
            customer))
        found: list[tuple[int, TokenRecord]] = []
        for fence, raw in rows:
            try:
                found.append((fence, self._decode(customer, raw)))
            except sealing.SealingError:
                raise  # a key problem, not damage: skipping would lose a rotated token
            except StoreError:
                log.error("customer %s: unreadable rescue entry skipped", customer)
        return found

    async def drop_rescue(self, customer: str, fence: int) -> None:
        n = self.names
        stamp = await self._run(lambda c: c.fetchval(
            f"WITH gone AS (DELETE FROM {n.rescues} WHERE customer = $1 AND fence = $2"
            "  RETURNING 1),"
            f" up AS (UPDATE {n.tokens} t SET stamp = nextval('{n.seq}')"
            "  WHERE t.customer = $1 AND EXISTS (SELECT 1 FROM gone) RETURNING t.stamp)"
            " SELECT up.stamp FROM up, pg_notify($3, up.stamp::text || ' ' || $1) x",
            customer, fence, n.channel))
        if stamp is not None:
            await self._touched(customer, stamp)

    async def wait_for_change(self, customer: str, after: int,
                              timeout: float) -> Versioned | None:
        deadline = time.monotonic() + timeout
        self._waiting[customer] = self._waiting.get(customer, 0) + 1
        try:
            while True:
                # Registered before the read: a NOTIFY that lands during it is not lost.
                event = self._waiters.get(customer)
                if event is None:
                    event = self._waiters[customer] = asyncio.Event()
                row = await self._fetch(customer)
                state = self._view(row)
                if state is None or state.stamp != after:
                    return state
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                holder = row[3]
                if state.locked and holder is not None and holder != self._holder:
                    self._watched[customer] = holder
                    self._poll_wake.set()
                try:
                    await asyncio.wait_for(event.wait(), left)
                except TimeoutError:
                    return None
                if self._closed:
                    return None
        finally:
            count = self._waiting.pop(customer) - 1
            if count:
                self._waiting[customer] = count
            else:
                self._watched.pop(customer, None)
                event = self._waiters.get(customer)
                if event is not None and not event.is_set():
                    del self._waiters[customer]

    async def delete(self, customer: str, *, version: int | None = None) -> bool:
        n = self.names

        async def job(c: Connection) -> int | bool:
            async with c.transaction():
                row = await c.fetchrow(
                    f"SELECT version, record IS NOT NULL FROM {n.tokens} WHERE customer = $1"
                    " FOR UPDATE", customer)
                if row is None:
                    return True
                if version is not None and row[1] and row[0] != version:
                    return False
                stamp: int = await c.fetchval(
                    f"UPDATE {n.tokens} SET record = NULL, holder = NULL,"
                    f" stamp = nextval('{n.seq}') WHERE customer = $1 RETURNING stamp", customer)
                await c.execute(f"DELETE FROM {n.rescues} WHERE customer = $1", customer)
                await c.execute("SELECT pg_notify($1, $2::int8::text || ' ' || $3)",
                                n.channel, stamp, customer)
                return stamp

        done = await self._run(job)
        if done is True or done is False:
            return done
        self._deliver(customer, done, None)
        return True

    async def customers(self) -> list[str]:
        n = self.names
        rows = await self._run(lambda c: c.fetch(
            f"SELECT customer FROM {n.tokens} WHERE record IS NOT NULL ORDER BY customer"))
        return [row[0] for row in rows]

    async def rescued_customers(self) -> list[str]:
        """Every customer with rescue entries, with a record or not (a refresh fenced
        out by a disconnect leaves its tokens in rescue under no record)."""
        n = self.names
        rows = await self._run(lambda c: c.fetch(
            f"SELECT DISTINCT customer FROM {n.rescues} ORDER BY customer"))
        return [row[0] for row in rows]

    async def scrub(self) -> None:
        """VACUUM the record tables, so replaced record versions (dead tuples) leave
        the table files (after a rekey, or turning sealing on). Postgres's WAL and
        its archives keep them until they are recycled (``docs/security.md``)."""
        n = self.names
        await self._run(lambda c: c.execute(f"VACUUM {n.tokens}, {n.rescues}"))

    async def claim_once(self, key: str, ttl: float) -> bool:
        """True for the first claim of ``key`` within ``ttl`` seconds, in every process
        using this schema (expiry by the database's clock; an expired claim can be made
        again)."""
        n = self.names
        if len(key) > 200:  # a btree key has a size limit: long keys are hashed
            key = "sha256-" + hashlib.sha256(key.encode()).hexdigest()
        now = "extract(epoch from clock_timestamp())"
        made = await self._run(lambda c: c.fetchval(
            f"INSERT INTO {n.claims} AS k VALUES ($1, {now} + $2::float8)"
            f" ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at"
            f" WHERE k.expires_at <= {now} RETURNING true", key, float(ttl)))
        if made and secrets.randbelow(64) == 0:  # now and then, drop the expired
            await self._run(lambda c: c.execute(
                f"DELETE FROM {n.claims} WHERE expires_at <= {now}"))
        return bool(made)


async def migrate(dsn: str, *, schema: str = "public", prefix: str = "sfrtr") -> int:
    """Create or migrate the schema (what ``sfrtr migrate --postgres`` runs); returns
    the schema version now in place."""
    names = Names(schema, prefix)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1::int4, 0)", names.key)
            for statement in schema_sql(names):
                await conn.execute(statement)
        version: int = await conn.fetchval(f"SELECT value FROM {names.meta} WHERE key = 'schema'")
        return version
    finally:
        await conn.close()


__all__ = ["PostgresStore", "migrate", "redact_dsn"]
