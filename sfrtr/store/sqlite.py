"""The SQLite store: many worker processes on one host, no server.

Files, next to ``path``::

    path              the database, in WAL mode: records, rescues, a change counter
    path-wal, -shm    SQLite's own
    path-holders      one byte per store instance, write-locked for the instance's life

**The lock dies with its holder.** Each store instance takes a number (a
*holder*) when it starts and holds an open-file-description lock
(``F_OFD_SETLK``) on that byte of ``path-holders`` until it closes. The kernel
drops that lock when the process dies, however it dies. A customer's refresh
lock is the ``holder`` column of its row, written in the acquire's transaction
and cleared in the commit's: it is held while that holder's byte is still
locked (one ``F_OFD_GETLK``, about a microsecond). So a lock can neither
outlive its process nor expire while the process lives (a stopped process
keeps its customers until it continues: a lease that cannot lapse).
Classic POSIX ``fcntl`` locks would not do: they belong to the process and
any ``close()`` of the file drops them; OFD locks belong to one open file
description (Linux 3.15+).

**Fencing** is the ``version`` column: a global counter, bumped by every
write, compared inside the ``BEGIN IMMEDIATE`` transaction of acquire and
commit. The acquire rewrites the record as ``refreshing`` with the intent in
the same transaction (the durable intent), and records the holder.

**Stamps** are ``2 * stamp + dead``: ``stamp`` is the counter value of the
last write to anything of the customer (record, lock, rescue), and ``dead``
is 1 when the row names a holder whose lock the kernel has dropped. A holder
is only ever named by a write, so stamps only grow.

**Waking.** All SQLite calls of an instance run on one thread of its own with
its own connection, so the event loop never blocks on the file. While anyone
subscribes or waits, that thread checks ``PRAGMA data_version`` every
``poll_interval`` (a counter in shared memory: microseconds, no disk read);
when another connection committed, it reads the rows whose stamp moved (an
index on ``stamp``) and hands them to subscribers and waiters. It also checks
whether the holders that waiters wait on are still alive, so a waiter on a
killed holder wakes within one interval.

**Durability.** ``synchronous=FULL``: a commit is on disk when it returns (a
rotated token survives a power cut, not only a crash). A write that fails
(read-only file, full disk, corrupt file, a lock held past ``busy_timeout``)
rolls back and raises :class:`~sfrtr.StoreError`: the previous record is
intact and the manager keeps the new tokens in memory and retries.

**Where it refuses to run.** On a network filesystem (NFS, SMB, sshfs...)
SQLite's locking and OFD locks are unreliable or per host: it raises
:class:`~sfrtr.ConfigurationError` unless ``allow_network_filesystem=True``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import queue
import re
import secrets
import sqlite3
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from sfrtr.errors import ConfigurationError, StoreError
from sfrtr.records import Intent, Status, TokenRecord, Versioned
from sfrtr.store import sealing

if TYPE_CHECKING:
    from sfrtr.store.sealing import Sealer

log = logging.getLogger(__name__)

T = TypeVar("T")
Subscriber = Callable[[str, Versioned | None], None]
_Note = tuple[str, int, Versioned | None]
"""(customer, database stamp, state after the change; ``None``: deleted)."""

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph",
    "glusterfs", "lustre", "gpfs", "ocfs2", "gfs2", "davfs", "fuse.sshfs", "fuse.s3fs",
    "fuse.rclone", "fuse.gcsfuse", "fuse.glusterfs", "fuse.cephfs", "fuse.davfs2",
    "fuse.goofys", "fuse.juicefs", "fuse.objectivefs", "fuse.lxcfs"})
"""Filesystem types (``/proc/mounts``) whose locks cannot be trusted across processes."""

_FLOCK = "hhqqi4x"  # struct flock on Linux (x86-64, arm64): type, whence, start, len, pid
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sfrtr_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO sfrtr_meta VALUES ('schema', 1), ('seq', 0), ('holders', 0)",
    # record NULL: deleted (the row stays, so other processes see the delete by its stamp)
    "CREATE TABLE IF NOT EXISTS sfrtr_tokens (customer TEXT PRIMARY KEY, record BLOB,"
    " version INTEGER NOT NULL, holder INTEGER, stamp INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS sfrtr_tokens_stamp ON sfrtr_tokens (stamp)",
    "CREATE TABLE IF NOT EXISTS sfrtr_rescues (customer TEXT NOT NULL, fence INTEGER NOT NULL,"
    " record BLOB NOT NULL, PRIMARY KEY (customer, fence))",
    # claim_once: keys claimed until expires_at (wall-clock seconds; one host's clock)
    "CREATE TABLE IF NOT EXISTS sfrtr_claims (key TEXT PRIMARY KEY, expires_at REAL NOT NULL)",
)
_SEAL_NAMESPACE = "sqlite"
"""The associated data's namespace: a copied database file (a backup) still opens."""
_ROW = ("SELECT customer, record, version, holder, stamp, EXISTS (SELECT 1 FROM sfrtr_rescues r"
        " WHERE r.customer = t.customer) FROM sfrtr_tokens t")
_STOP = object()
_NUDGE = object()
_OCTAL = re.compile(r"\\([0-7]{3})")

_OPEN: weakref.WeakSet[SqliteStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child inherits the holder lock's file description: if it kept it open, a
    # parent that dies would still look alive. Its SQLite connection and thread are
    # not usable either (SQLite forbids carrying a connection across fork()).
    for store in list(_OPEN):
        store._forked_away()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def network_filesystem(path: str, mounts: str | None = None) -> str | None:
    """The type of the network filesystem ``path`` lives on, or ``None`` if local
    (or unknown: no ``/proc/mounts``). ``mounts``: the text of ``/proc/mounts``."""
    if mounts is None:
        try:
            with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
                mounts = f.read()
        except OSError:
            return None
    where = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    best, fstype = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[1])  # \040: a space
        inside = where == point or where.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype if fstype in NETWORK_FILESYSTEMS else None


def _encode(record: TokenRecord, sealer: Sealer | None = None, customer: str = "") -> bytes:
    return orjson.dumps(sealing.encode(sealer, _SEAL_NAMESPACE, customer, record))


def _decode(raw: bytes, sealer: Sealer | None = None, customer: str = "") -> TokenRecord:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise StoreError("malformed token record in the SQLite store (not JSON)") from None
    return sealing.decode(sealer, _SEAL_NAMESPACE, customer, data)


class SqliteStore:
    """A :class:`~sfrtr.store.TokenStore` in one SQLite file, for the worker processes
    of one host. One instance per process (create it after any ``fork()``).

    Starts itself on first use; call :meth:`aclose` (or the manager's) to stop.
    ``busy_timeout``: seconds a write waits for another process's write before
    failing with :class:`~sfrtr.StoreError`. ``poll_interval``: how often the
    store's thread looks for other processes' changes while anyone waits or
    subscribes. ``sealer``: seal records at rest (:mod:`sfrtr.store.sealing`).
    ``async with SqliteStore(path) as store`` starts and closes it.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0,
                 poll_interval: float = 0.01, allow_network_filesystem: bool = False,
                 sealer: Sealer | None = None) -> None:
        if busy_timeout <= 0 or poll_interval <= 0:
            raise ValueError("busy_timeout and poll_interval must be positive")
        self.path = os.fspath(path)
        self.busy_timeout = busy_timeout
        self.poll_interval = poll_interval
        self.allow_network_filesystem = allow_network_filesystem
        self.sealer = sealer
        self._holder: int | None = None
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None  # the thread's alone
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: list[Subscriber] = []
        self._waiters: dict[str, asyncio.Event] = {}
        self._watched: dict[str, int] = {}
        self._watch_snapshot: tuple[tuple[str, int], ...] = ()
        """Customers waited on and the foreign holder each waits for: the thread checks
        these holders are alive. Replaced whole (the thread reads it without a lock)."""
        self._known: dict[str, int] = {}
        """Customer -> the newest database stamp delivered to this process."""
        self._data_version = 0
        self._polled = 0
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False
        self._forked = False

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r}, holder={self._holder})"

    # -- life cycle ------------------------------------------------------------

    async def start(self) -> None:
        """Open the database (creating it and its schema if needed), take a holder
        number and its lock, start the store's thread."""
        self._check_usable()
        async with self._start_lock:
            if self._started:
                return
            self._check_usable()
            if self.sealer is not None:
                await self.sealer.ready()
            if not self.allow_network_filesystem:
                fstype = network_filesystem(self.path)
                if fstype is not None:
                    raise ConfigurationError(
                        f"{self.path} is on a network filesystem ({fstype}): file locks there "
                        "cannot keep two hosts (or even two processes) from refreshing at once. "
                        "Put the SQLite store on a local disk, use EtcdStore for several "
                        "hosts, or pass allow_network_filesystem=True if you know its locks "
                        "are sound")
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name=f"sfrtr-sqlite:{self.path}",
                                            daemon=True)
            self._thread.start()
            try:
                await self._submit(self._open)
            except BaseException:
                self._jobs.put(_STOP)
                raise
            self._started = True
            _OPEN.add(self)

    async def __aenter__(self) -> SqliteStore:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the database; the holder's lock goes with it (a lock on a customer
        this instance still held then reads as free, and its intent as an orphan)."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        if self._thread is not None and not self._forked:
            if self._started:
                with contextlib.suppress(StoreError):
                    await self._submit(self._shut)
            self._jobs.put(_STOP)
            await asyncio.to_thread(self._thread.join, 5.0)
        for event in self._waiters.values():
            event.set()
        self._waiters.clear()

    def _check_usable(self) -> None:
        if self._forked:
            raise ConfigurationError(
                "this SqliteStore was opened before the process forked: create one "
                "SqliteStore per process, after the fork (the same path in each)")
        if self._closed:
            raise StoreError("the store is closed")

    def _forked_away(self) -> None:
        self._forked = True
        self._thread = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    async def _ensure(self) -> None:
        if not self._started:
            await self.start()
        self._check_usable()

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback(customer, state)`` after every change to a customer, this
        process's and others' (``None``: deleted)."""
        self._check_usable()
        self._subscribers.append(callback)
        self._jobs.put(_NUDGE)  # an idle thread starts polling

    # -- the lease (there is none: the lock lives exactly as long as its process) --

    @property
    def lease_ttl(self) -> float:
        return 0.0

    @property
    def holder(self) -> int | None:
        """This instance's holder number (what ``Intent.lease`` records)."""
        return self._holder

    def lease_remaining(self, lease: int | None = None) -> float | None:
        # The kernel lock cannot expire while this process lives: no deadline to count
        # down (``None``), as for a process-local store. A lock taken by another holder
        # (a closed instance of this process, say) is not ours to count on.
        if lease is None:
            return None
        if self._closed or self._forked or lease != self._holder:
            return 0.0
        return None

    # -- the thread --------------------------------------------------------------

    def _run(self) -> None:
        next_poll = time.monotonic() + self.poll_interval
        while True:
            polling = self._conn is not None and bool(self._subscribers or self._watch_snapshot
                                                      or self._waiters)
            try:
                wait = max(0.0, next_poll - time.monotonic()) if polling else None
                job = self._jobs.get(timeout=wait)
            except queue.Empty:
                job = None
            if job is _STOP:
                return
            if job is not None and job is not _NUDGE:
                self._execute(*job)
            if polling and self._conn is not None and time.monotonic() >= next_poll:
                self._poll()
                next_poll = time.monotonic() + self.poll_interval

    def _execute(self, fn: Callable[[list[_Note]], Any], fut: asyncio.Future[Any]) -> None:
        notes: list[_Note] = []
        value: Any = None
        error: BaseException | None = None
        try:
            value = fn(notes)
        except StoreError as exc:
            error = exc
        except sqlite3.Error as exc:
            error = self._error(exc)
        except OSError as exc:
            error = StoreError(f"SQLite store {self.path}: {exc.strerror or exc}")
        except Exception as exc:  # the thread must never die: every caller would hang
            log.exception("SQLite store job failed unexpectedly")
            error = StoreError(f"SQLite store {self.path}: unexpected {type(exc).__name__}")
        self._post(self._finish, fut, value, error, notes)

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self._loop.call_soon_threadsafe(callback, *args)

    def _error(self, exc: sqlite3.Error) -> StoreError:
        """A clear error; SQLite's own messages never carry bound values (tokens)."""
        code = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
        text = str(exc)
        if code.startswith("SQLITE_READONLY") or "readonly" in text:
            why = "the database file (or its directory) is read-only"
        elif code.startswith("SQLITE_FULL") or "full" in text:
            why = "the disk is full"
        elif code.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or "not a database" in text \
                or "malformed" in text:
            why = "the file is corrupt or is not a SQLite database"
        elif code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            why = f"another process held the database longer than {self.busy_timeout:g}s"
        elif code.startswith("SQLITE_CANTOPEN"):
            why = "the file cannot be opened (missing directory or no permission)"
        elif code.startswith("SQLITE_IOERR"):
            why = "an I/O error"
        else:
            why = "a database error"
        return StoreError(f"SQLite store {self.path}: {why} ({code}: {text})")

    async def _submit(self, fn: Callable[[list[_Note]], T]) -> T:
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((fn, fut))
        return await fut

    async def _call(self, fn: Callable[[list[_Note]], T]) -> T:
        await self._ensure()
        return await self._submit(fn)

    def _finish(self, fut: asyncio.Future[Any], value: Any, error: BaseException | None,
                notes: list[_Note]) -> None:
        self._deliver(notes)
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    # -- in the thread: opening and closing ---------------------------------------

    def _open(self, notes: list[_Note]) -> None:
        if not os.path.exists(self.path):
            # Tokens are secrets: the file (and SQLite's -wal and -shm, which copy its
            # mode) readable by its owner only.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"SQLite store {self.path}: cannot switch to WAL mode "
                                 f"(journal_mode is {mode}); is the file read-only?")
            conn.execute("PRAGMA synchronous = FULL")
            # Replaced records (tokens) are zeroed in the file, not left in free space.
            conn.execute("PRAGMA secure_delete = ON")
            with _transaction(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("UPDATE sfrtr_meta SET value = value + 1 WHERE key = 'holders'")
                holder = conn.execute(
                    "SELECT value FROM sfrtr_meta WHERE key = 'holders'").fetchone()[0]
                seq = conn.execute("SELECT value FROM sfrtr_meta WHERE key = 'seq'").fetchone()[0]
            fd = os.open(self.path + "-holders", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                # A fresh number: nobody else can hold it, so this never waits.
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                            struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, holder, 1, 0))
            except BaseException:
                os.close(fd)
                raise
            self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        except BaseException:
            conn.close()
            raise
        self._conn, self._lock_fd, self._holder, self._polled = conn, fd, holder, seq
        log.info("SQLite store %s open (holder %d)", self.path, holder)

    def _shut(self, notes: list[_Note]) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- in the thread: reading -------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the store is closed")
        return self._conn

    def _alive(self, holder: int) -> bool:
        """Whether the store instance numbered ``holder`` still holds its lock."""
        if holder == self._holder:
            return self._lock_fd is not None
        if self._lock_fd is None:
            return False
        got = fcntl.fcntl(self._lock_fd, fcntl.F_OFD_GETLK,
                          struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, holder, 1, 0))
        kind: int = struct.unpack(_FLOCK, got)[0]
        return kind != fcntl.F_UNLCK

    def _fetch(self, customer: str) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._db().execute(
            _ROW + " WHERE customer = ?", (customer,)).fetchone()
        return row

    def _view(self, row: tuple[Any, ...] | None) -> Versioned | None:
        if row is None or row[1] is None:
            return None
        customer, raw, version, holder, stamp, rescued = row
        alive = holder is not None and self._alive(holder)
        dead = holder is not None and not alive
        return Versioned(_decode(raw, self.sealer, customer), version, alive,
                         stamp=2 * stamp + dead, rescued=bool(rescued))

    def _bump(self) -> int:
        db = self._db()
        db.execute("UPDATE sfrtr_meta SET value = value + 1 WHERE key = 'seq'")
        seq: int = db.execute("SELECT value FROM sfrtr_meta WHERE key = 'seq'").fetchone()[0]
        return seq

    def _poll(self) -> None:
        try:
            db = self._db()
            version = db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:
                self._data_version = version
                rows = db.execute(_ROW + " WHERE stamp > ? ORDER BY stamp",
                                  (self._polled,)).fetchall()
                notes: list[_Note] = []
                for row in rows:
                    self._polled = max(self._polled, row[4])
                    try:
                        notes.append((row[0], row[4], self._view(row)))
                    except StoreError as exc:
                        log.error("customer %s: %s", row[0], exc)
                        # Still wake its waiters (they read, and meet the error) and
                        # tell subscribers to drop the replaced record's cached copy.
                        notes.append((row[0], row[4], None))
                if notes:
                    self._post(self._deliver, notes)
            dead = [customer for customer, holder in self._watch_snapshot
                    if not self._alive(holder)]
            if dead:
                self._post(self._wake_all, dead)
        except (sqlite3.Error, StoreError, OSError) as exc:
            log.warning("SQLite store %s: looking for changes failed (%s)", self.path,
                        type(exc).__name__)

    # -- on the loop: telling subscribers and waiters --------------------------------

    def _deliver(self, notes: list[_Note]) -> None:
        for customer, stamp, state in notes:
            if stamp >= self._known.get(customer, 0):
                self._known[customer] = stamp
            for callback in self._subscribers:
                try:
                    callback(customer, state)
                except Exception:
                    log.exception("a store subscriber failed")
            self._wake(customer)

    def _wake(self, customer: str) -> None:
        event = self._waiters.pop(customer, None)
        if self._watched.pop(customer, None) is not None:
            self._watch_snapshot = tuple(self._watched.items())
        if event is not None:
            event.set()

    def _wake_all(self, customers: list[str]) -> None:
        for customer in customers:
            self._wake(customer)

    # -- TokenStore ----------------------------------------------------------------

    async def read(self, customer: str) -> Versioned | None:
        return await self._call(lambda notes: self._view(self._fetch(customer)))

    async def put(self, customer: str, record: TokenRecord) -> Versioned:
        await self._ensure()  # a KMS sealer unwraps its keys when the store starts
        raw = _encode(record, self.sealer, customer)

        def job(notes: list[_Note]) -> Versioned:
            db = self._db()
            with _transaction(db):
                seq = self._bump()
                db.execute("INSERT INTO sfrtr_tokens VALUES (?, ?, ?, NULL, ?) ON CONFLICT"
                           " (customer) DO UPDATE SET record = excluded.record, version ="
                           " excluded.version, holder = NULL, stamp = excluded.stamp",
                           (customer, raw, seq, seq))
                db.execute("DELETE FROM sfrtr_rescues WHERE customer = ?", (customer,))
            state = Versioned(record, seq, False, stamp=2 * seq)
            notes.append((customer, seq, state))
            return state

        return await self._call(job)

    async def acquire(self, customer: str, expected_version: int,
                      intent: Intent) -> Versioned | None:
        def job(notes: list[_Note]) -> Versioned | None:
            db = self._db()
            with _transaction(db):
                row = self._fetch(customer)
                if row is None or row[1] is None:
                    return None
                _, raw, version, holder, _, rescued = row
                stored = _decode(raw, self.sealer, customer)
                if holder is not None and holder == self._holder and intent.id and \
                        stored.intent is not None and stored.intent.id == intent.id:
                    # A retried acquire whose first attempt landed: the lock is ours.
                    return Versioned(stored, version, True, stamp=2 * row[4],
                                     rescued=bool(rescued))
                if version != expected_version or \
                        (holder is not None and (holder == self._holder or self._alive(holder))):
                    return None
                assert self._holder is not None
                record = stored.replace(status=Status.REFRESHING,
                                        intent=dataclasses.replace(intent, lease=self._holder))
                seq = self._bump()
                db.execute("UPDATE sfrtr_tokens SET record = ?, version = ?, holder = ?,"
                           " stamp = ? WHERE customer = ?",
                           (_encode(record, self.sealer, customer), seq, self._holder, seq,
                            customer))
            state = Versioned(record, seq, True, stamp=2 * seq, rescued=bool(rescued))
            notes.append((customer, seq, state))
            return state

        return await self._call(job)

    async def commit(self, customer: str, fence: int, record: TokenRecord) -> Versioned | None:
        await self._ensure()  # a KMS sealer unwraps its keys when the store starts
        raw = _encode(record, self.sealer, customer)

        def job(notes: list[_Note]) -> Versioned | None:
            db = self._db()
            with _transaction(db):
                row = self._fetch(customer)
                if row is None or row[1] is None or row[2] != fence:
                    return None
                seq = self._bump()
                db.execute("UPDATE sfrtr_tokens SET record = ?, version = ?, holder = NULL,"
                           " stamp = ? WHERE customer = ?", (raw, seq, seq, customer))
            state = Versioned(record, seq, False, stamp=2 * seq, rescued=bool(row[5]))
            notes.append((customer, seq, state))
            return state

        return await self._call(job)

    def _touch(self, customer: str, notes: list[_Note]) -> None:
        """Move the customer's stamp (a rescue changed), creating a deleted row if
        there is none, so that other processes see the change too."""
        db = self._db()
        seq = self._bump()
        db.execute("INSERT INTO sfrtr_tokens VALUES (?, NULL, 0, NULL, ?) ON CONFLICT"
                   " (customer) DO UPDATE SET stamp = excluded.stamp", (customer, seq))
        try:
            state = self._view(self._fetch(customer))
        except StoreError:
            # A record this process cannot open (a key it lacks) must not roll the
            # rescue back: the rescue may hold the only copy of a rotated token.
            state = None
        notes.append((customer, seq, state))

    async def save_rescue(self, customer: str, fence: int, record: TokenRecord) -> None:
        await self._ensure()  # a KMS sealer unwraps its keys when the store starts
        raw = _encode(record, self.sealer, customer)

        def job(notes: list[_Note]) -> None:
            db = self._db()
            with _transaction(db):
                db.execute("INSERT OR REPLACE INTO sfrtr_rescues VALUES (?, ?, ?)",
                           (customer, fence, raw))
                self._touch(customer, notes)

        await self._call(job)

    async def reseal_rescue(self, customer: str, fence: int, record: TokenRecord) -> bool:
        """Write a rescue entry again (sealed with the newest key) only if it still
        exists: rekey must not bring back an entry adopted or dropped meanwhile."""
        await self._ensure()
        raw = _encode(record, self.sealer, customer)

        def job(notes: list[_Note]) -> bool:
            db = self._db()
            with _transaction(db):
                done: bool = db.execute(
                    "UPDATE sfrtr_rescues SET record = ? WHERE customer = ? AND fence = ?",
                    (raw, customer, fence)).rowcount == 1
            return done

        return await self._call(job)

    async def rescues(self, customer: str) -> list[tuple[int, TokenRecord]]:
        def job(notes: list[_Note]) -> list[tuple[int, TokenRecord]]:
            found: list[tuple[int, TokenRecord]] = []
            for fence, raw in self._db().execute(
                    "SELECT fence, record FROM sfrtr_rescues WHERE customer = ? ORDER BY fence",
                    (customer,)):
                try:
                    found.append((fence, _decode(raw, self.sealer, customer)))
                except sealing.SealingError:
                    raise  # a key problem, not damage: skipping would lose a rotated token
                except StoreError:
                    log.error("customer %s: unreadable rescue entry skipped", customer)
            return found

        return await self._call(job)

    async def drop_rescue(self, customer: str, fence: int) -> None:
        def job(notes: list[_Note]) -> None:
            db = self._db()
            with _transaction(db):
                gone = db.execute("DELETE FROM sfrtr_rescues WHERE customer = ? AND fence = ?",
                                  (customer, fence)).rowcount
                if gone:
                    self._touch(customer, notes)

        await self._call(job)

    async def wait_for_change(self, customer: str, after: int,
                              timeout: float) -> Versioned | None:
        deadline = time.monotonic() + timeout

        def job(notes: list[_Note]) -> tuple[Versioned | None, int, int | None]:
            row = self._fetch(customer)
            holder = row[3] if row is not None and row[1] is not None else None
            return self._view(row), (row[4] if row is not None else 0), holder

        while True:
            state, stamp, holder = await self._call(job)
            if state is None or state.stamp != after:
                return state
            if self._known.get(customer, 0) > stamp:
                continue  # changed while our answer was on its way: look again
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            event = self._waiters.get(customer)
            if event is None:
                event = self._waiters[customer] = asyncio.Event()
            if state.locked and holder is not None and holder != self._holder:
                self._watched[customer] = holder
                self._watch_snapshot = tuple(self._watched.items())
            self._jobs.put(_NUDGE)  # a thread idle without a poll to run starts polling
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                return None
            if self._closed:
                return None

    async def delete(self, customer: str, *, version: int | None = None) -> bool:
        def job(notes: list[_Note]) -> bool:
            db = self._db()
            with _transaction(db):
                row = self._fetch(customer)
                if row is None:
                    return True
                if version is not None and row[1] is not None and row[2] != version:
                    return False
                seq = self._bump()
                db.execute("UPDATE sfrtr_tokens SET record = NULL, holder = NULL, stamp = ?"
                           " WHERE customer = ?", (seq, customer))
                db.execute("DELETE FROM sfrtr_rescues WHERE customer = ?", (customer,))
            notes.append((customer, seq, None))
            return True

        return await self._call(job)

    async def customers(self) -> list[str]:
        def job(notes: list[_Note]) -> list[str]:
            return [c for (c,) in self._db().execute(
                "SELECT customer FROM sfrtr_tokens WHERE record IS NOT NULL ORDER BY customer")]

        return await self._call(job)

    async def rescued_customers(self) -> list[str]:
        """Every customer with rescue entries, with a record or not (a refresh fenced
        out by a disconnect leaves its tokens in rescue under no record)."""
        def job(notes: list[_Note]) -> list[str]:
            return [c for (c,) in self._db().execute(
                "SELECT DISTINCT customer FROM sfrtr_rescues ORDER BY customer")]

        return await self._call(job)

    async def scrub(self) -> None:
        """Make the file forget replaced record versions (after a rekey, or turning
        sealing on): rebuild it and empty the WAL, which still holds old pages."""
        def job(notes: list[_Note]) -> None:
            db = self._db()
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        await self._call(job)

    async def claim_once(self, key: str, ttl: float) -> bool:
        """True for the first claim of ``key`` within ``ttl`` seconds, in every process
        using this file (an expired claim can be made again)."""
        def job(notes: list[_Note]) -> bool:
            db = self._db()
            now = time.time()
            with _transaction(db):
                db.execute("DELETE FROM sfrtr_claims WHERE key = ? AND expires_at <= ?",
                           (key, now))
                made: bool = db.execute("INSERT OR IGNORE INTO sfrtr_claims VALUES (?, ?)",
                                        (key, now + ttl)).rowcount == 1
                if made and secrets.randbelow(64) == 0:  # now and then, drop the expired
                    db.execute("DELETE FROM sfrtr_claims WHERE expires_at <= ?", (now,))
            return made

        return await self._call(job)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE``: take the write lock first, so a read inside sees what the
    write compares against (no other writer can slip in between)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    try:
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


__all__ = ["NETWORK_FILESYSTEMS", "SqliteStore", "network_filesystem"]
