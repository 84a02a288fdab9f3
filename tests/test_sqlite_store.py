"""The SQLite store: real processes on one file, the emulator, real faults.

Workers are ``python -m tests.sqlite_worker`` (each its own store instance, so
its own holder lock); the test process serves the emulator and is "another
process" where a scenario needs one. Figures are printed (``-s``) for the notes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from sfrtr import (
    CoordinationTimeout,
    Intent,
    RefreshIndeterminate,
    RefreshPolicy,
    Secret,
    SqliteStore,
    Status,
    StoreError,
    TokenManager,
    TokenRecord,
)
from sfrtr.emulator import Emulator
from sfrtr.store.sqlite import network_filesystem
from tests.conftest import emulator_grant, emulator_oauth
from tests.storm_proof import CI_SIZE, ProofSize, run_proof
from tests.test_multiprocess import ROOT, Worker

pytestmark = pytest.mark.anyio

RECORD = TokenRecord(access_token=Secret("at-secret-1"), refresh_token=Secret("rt-secret-1"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0,
                     expires_at=time.time() + 3600)


async def start_worker(db: Path, em: Emulator, customers: list[str], **options: Any) -> Worker:
    args = [sys.executable, "-m", "tests.sqlite_worker", "--db", str(db),
            "--login-url", str(em.base_url), "--customers", ",".join(customers)]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        args += [flag] if value is True else [flag, str(value)]
    process = await asyncio.create_subprocess_exec(
        *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return Worker(process)


async def connect_all(em: Emulator, db: Path, customers: list[str], **policy: Any
                      ) -> TokenManager:
    """The test's own manager (another process, as the store sees it), grants stored."""
    policy.setdefault("lease_margin", 0.5)
    manager = TokenManager(emulator_oauth(em, timeout=1.2, connect_timeout=0.5),
                           SqliteStore(db), RefreshPolicy(**policy))
    for c in customers:
        await manager.connect(c, emulator_grant(em, c))
    return manager


# -- the multi-process proof ----------------------------------------------------------


async def test_processes_coroutines_customers_and_session_expiries(emulator: Emulator,
                                                                   tmp_path: Path):
    # CI runs 6 x 100 x 30; `nox -s proof` runs the 8 x 200 x 50 (SFRTR_PROOF_SIZE).
    size = ProofSize.from_env(CI_SIZE)
    customers = [f"cust-{i:02d}" for i in range(size.customers)]
    db = tmp_path / "tokens.db"
    mine = await connect_all(emulator, db, customers)
    run = await run_proof(emulator, mine, customers, size, lambda i: start_worker(
        db, emulator, customers, coroutines=size.coroutines, duration=120, pause=0.3,
        production=True, waves=size.expiries))
    print("\n" + run.summary("SQLite"))
    run.check()


# -- a holder killed or stopped mid-refresh ----------------------------------------------


async def test_sigkill_before_the_provider_call_frees_the_lock_and_refreshes(
        emulator: Emulator, tmp_path: Path):
    """The holder dies with its intent written and nothing sent: the kernel frees its
    lock at once, a waiter wakes, and recovery (introspection: still active) refreshes.
    No reuse, no lockout."""
    db = tmp_path / "tokens.db"
    mine = await connect_all(emulator, db, ["acme"])
    stale = await mine.token("acme")
    worker = await start_worker(db, emulator, ["acme"], mode="hold-before-redeem")
    try:
        await worker.expect("EVENT redeeming")  # lock + intent held, never sent
        held = await mine.store.read("acme")
        assert held.locked
        assert held.record.status is Status.REFRESHING
        waiter = asyncio.create_task(mine.store.wait_for_change("acme", held.stamp, 10))
        await asyncio.sleep(0.1)
        worker.signal(signal.SIGKILL)
        killed = time.monotonic()
        woke = await waiter
        noticed = time.monotonic() - killed
        assert woke is not None
        assert not woke.locked  # the lock died with its holder...
        assert woke.record.intent is not None  # ...and its intent is there to recover
        creds = await mine.refresh("acme", stale=stale)
        took = time.monotonic() - killed
        print(f"\nSQLite SIGKILL before redeem: lock seen free after {noticed * 1000:.0f} ms, "
              f"refreshed {took:.2f}s after the kill (grace {mine._grace(orphan=True):.2f}s)")
        assert creds.access_token != stale
        assert (await mine.store.read("acme")).record.status is Status.VALID
        assert emulator.ledger["redemptions"] == 1
        assert emulator.ledger["reuse"] == 0
        assert emulator.ledger["revocations"] == 0
        assert took < mine._grace(orphan=True) + 8  # the grace, and slack for a busy box
    finally:
        await worker.reap()
        await mine.aclose()


async def test_sigkill_after_rotation_is_a_justified_loss(emulator: Emulator, tmp_path: Path):
    """Salesforce rotated, the holder died before storing: introspection proves the old
    token dead, so the re-authorization is justified, and it is never presented again."""
    db = tmp_path / "tokens.db"
    mine = await connect_all(emulator, db, ["acme"])
    stale = await mine.token("acme")
    worker = await start_worker(db, emulator, ["acme"], mode="hold-after-rotation")
    try:
        await worker.expect("EVENT redeemed ok")
        worker.signal(signal.SIGKILL)
        await worker.reap()
        with pytest.raises(RefreshIndeterminate) as info:
            await mine.refresh("acme", stale=stale)
        assert "successor is lost" in str(info.value)
        current = await mine.store.read("acme")
        assert current.record.status is Status.REAUTH_REQUIRED
        assert emulator.ledger["redemptions"] == 1
        assert emulator.ledger["reuse"] == 0
    finally:
        await worker.reap()
        await mine.aclose()


async def test_sigstop_keeps_the_lock_and_sigcont_commits(emulator: Emulator, tmp_path: Path):
    """A stopped holder keeps its lock (it cannot lapse while the process lives): others
    wait and time out, nobody takes over, nothing is presented twice; once continued,
    the holder commits and the waiters get its tokens."""
    db = tmp_path / "tokens.db"
    mine = await connect_all(emulator, db, ["acme"], wait_timeout=1.5)
    stale = await mine.token("acme")
    emulator.faults.set("token", latency=0.5)
    worker = await start_worker(db, emulator, ["acme"], mode="refresh", timeout=4)
    try:
        await worker.expect("EVENT redeeming")
        (family,) = emulator.world.families.values()
        async with asyncio.timeout(5):
            while not family.in_flight:  # noqa: ASYNC110 (the emulator has no event for it)
                await asyncio.sleep(0.001)
        worker.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        await asyncio.sleep(1.0)  # Salesforce answered; the answer waits in the socket
        with pytest.raises(CoordinationTimeout):
            await mine.refresh("acme", stale=stale)
        held = await mine.store.read("acme")
        assert held.locked  # still: a stopped process is not a dead one
        assert emulator.ledger["redemptions"] == 1
        refresher = asyncio.create_task(mine.refresh("acme", stale=stale))
        await asyncio.sleep(0.2)
        worker.signal(signal.SIGCONT)
        resumed = time.monotonic()
        creds = await refresher
        print(f"\nSQLite SIGSTOP: stopped {resumed - stopped:.2f}s; the waiter had the new "
              f"token {(time.monotonic() - resumed) * 1000:.0f} ms after SIGCONT")
        result = await worker.result()
        assert result["ok"] is True, worker.lines
        assert creds.access_token != stale
        current = await mine.store.read("acme")
        assert current.record.status is Status.VALID
        assert current.record.generation == 1
        assert creds.access_token == current.record.access_token.reveal()
        assert emulator.ledger["redemptions"] == 1
        assert emulator.ledger["reuse"] == 0
    finally:
        worker.signal(signal.SIGCONT)
        await worker.reap()
        await mine.aclose()


# -- fork ------------------------------------------------------------------------------

_FORK_SCRIPT = textwrap.dedent("""
    import asyncio, os, sys, time
    from sfrtr import ConfigurationError, Intent, MemoryStore, Secret, SqliteStore, TokenRecord

    record = TokenRecord(access_token=Secret("a"), refresh_token=Secret("r"),
                         instance_url="https://x.my.salesforce.com", issued_at=1.0,
                         expires_at=9e9)
    memory = MemoryStore()
    loop = asyncio.new_event_loop()
    sqlite = SqliteStore(sys.argv[1])
    v = loop.run_until_complete(sqlite.put("acme", record))
    loop.run_until_complete(sqlite.acquire("acme", v.version, Intent("parent", "fp", 1.0)))
    child = os.fork()
    if child == 0:
        answers = []
        for store in (memory, sqlite):
            try:
                asyncio.run(store.read("acme"))
                answers.append("used")
            except ConfigurationError as exc:
                answers.append(str(exc))
        print("CHILD " + " || ".join(answers), flush=True)
        time.sleep(30)  # outlives the parent: its inherited files must not hold the lock
        os._exit(0)
    print(f"PARENT {child}", flush=True)
    time.sleep(30)
""")


async def test_forked_children_refuse_stores_opened_before_the_fork(tmp_path: Path):
    db = tmp_path / "tokens.db"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FORK_SCRIPT, str(db), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    worker = Worker(process)
    child = 0
    watcher = SqliteStore(db)
    try:
        child = int((await worker.expect("PARENT")).split()[1])
        answers = (await worker.expect("CHILD"))[len("CHILD "):].split(" || ")
        memory_error, sqlite_error = answers
        assert "SqliteStore" in memory_error
        assert "EtcdStore" in memory_error
        assert "MemoryStore" in memory_error
        assert "after the fork" in sqlite_error
        assert (await watcher.read("acme")).locked  # the parent holds it
        locked = await watcher.read("acme")
        worker.signal(signal.SIGKILL)
        # The child lives on with the parent's files, but not its lock.
        state = await watcher.wait_for_change("acme", locked.stamp, 10)
        assert state is not None
        assert not state.locked
        assert state.record.status is Status.REFRESHING
        os.kill(child, 0)  # still alive
    finally:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        await worker.reap()
        await watcher.aclose()


# -- the file: locked by others, read-only, full, corrupt, on a network ------------------


async def test_a_long_write_by_another_process_never_blocks_the_loop(tmp_path: Path):
    db = tmp_path / "tokens.db"
    store = SqliteStore(db)
    slow = SqliteStore(db, busy_timeout=0.3)
    v = await store.put("acme", RECORD)
    await slow.read("acme")
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock, as a stuck writer would
    release = threading.Timer(1.0, lambda: other.execute("COMMIT"))
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - before - 0.01)

    tick = asyncio.create_task(ticker())
    try:
        release.start()
        with pytest.raises(StoreError, match=r"longer than 0\.3s"):
            await slow.put("acme", RECORD.replace(generation=9))
        started = time.monotonic()
        held = await store.acquire("acme", v.version, Intent("w", "fp", 1.0))
        waited = time.monotonic() - started
    finally:
        tick.cancel()
        release.join()
        other.close()
        await slow.aclose()
        await store.aclose()
    print(f"\nSQLite write waited {waited:.2f}s for another writer; worst loop lag "
          f"meanwhile {max(lags) * 1000:.1f} ms")
    assert held is not None
    assert max(lags) < 0.25  # the loop kept running: the wait was on the store's thread


async def test_a_corrupt_file_is_a_clear_error_and_left_alone(tmp_path: Path):
    db = tmp_path / "tokens.db"
    garbage = b"this is not a database, and it holds nothing of ours" * 100
    db.write_bytes(garbage)
    store = SqliteStore(db)
    with pytest.raises(StoreError, match="corrupt or is not a SQLite database"):
        await store.read("acme")
    assert db.read_bytes() == garbage
    await store.aclose()
    # A database damaged after it was written: its pages are garbage.
    good = tmp_path / "damaged.db"
    first = SqliteStore(good)
    for i in range(50):
        await first.put(f"c{i}", RECORD)
    await first.aclose()
    raw = bytearray(good.read_bytes())
    raw[4096:len(raw)] = os.urandom(len(raw) - 4096)
    good.write_bytes(bytes(raw))
    damaged = SqliteStore(good)

    async def read_all() -> None:
        for i in range(50):
            await damaged.read(f"c{i}")

    with pytest.raises(StoreError) as info:
        await read_all()
    assert "corrupt" in str(info.value) or "malformed" in str(info.value)
    await damaged.aclose()


def make_read_only(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o444)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True,
                                        check=False).returncode != 0:
        pytest.fail("running as root without chattr +i: cannot make a file read-only")


def make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o600)


async def test_a_read_only_file_is_a_clear_error_and_nothing_is_lost(tmp_path: Path):
    db = tmp_path / "tokens.db"
    first = SqliteStore(db)
    await first.put("acme", RECORD)
    await first.aclose()
    make_read_only(db)
    try:
        store = SqliteStore(db)
        with pytest.raises(StoreError, match="read-only") as info:
            await store.put("acme", RECORD.replace(generation=2))
        assert "secret" not in str(info.value)
        await store.aclose()
    finally:
        make_writable(db)
    again = SqliteStore(db)
    current = await again.read("acme")
    assert current.record == RECORD
    await again.aclose()


_FULL_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, resource, signal, sys
    from sfrtr import Secret, SqliteStore, StoreError, TokenRecord

    async def main():
        path = sys.argv[1]
        store = SqliteStore(path)
        small = TokenRecord(access_token=Secret("a0"), refresh_token=Secret("r0"),
                            instance_url="https://x.my.salesforce.com", issued_at=1.0,
                            expires_at=9e9)
        await store.put("acme", small)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = max(os.path.getsize(path), os.path.getsize(path + "-wal")) + 8192
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        error = ""
        for i in range(1, 200):  # big records until the "disk" is full
            try:
                await store.put("acme", small.replace(scope="x" * 20000, generation=i))
            except StoreError as exc:
                error = str(exc)
                break
        stored = await store.read("acme")
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        await store.put("acme", small.replace(generation=1000))
        after = await store.read("acme")
        print(json.dumps({"error": error, "generation": stored.record.generation,
                          "last_ok": i - 1, "after": after.record.generation}))
        await store.aclose()

    asyncio.run(main())
""")


async def test_a_full_disk_is_a_clear_error_and_nothing_is_lost(tmp_path: Path):
    """A file size limit (RLIMIT_FSIZE) stands in for a full disk: writes past it fail
    for real. The failed write rolls back; the last good record stays; once there is
    room again the store works."""
    db = tmp_path / "tokens.db"
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", _FULL_SCRIPT, str(db)],
                                   cwd=ROOT, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    result = orjson.loads(done.stdout.splitlines()[-1])
    print(f"\nSQLite on a full disk: {result}")
    assert "disk is full" in result["error"] or "I/O error" in result["error"], result
    assert result["generation"] == result["last_ok"]
    assert result["after"] == 1000


def test_network_filesystems_are_recognised():
    mounts = textwrap.dedent("""\
        /dev/vda / ext4 rw,relatime 0 0
        server:/export /mnt/shared nfs4 rw,relatime 0 0
        //nas/share /mnt/smb\\040share cifs rw 0 0
        me@host:/x /home/me/remote fuse.sshfs rw 0 0
        tmpfs /mnt/shared/local tmpfs rw 0 0
    """)
    assert network_filesystem("/var/lib/app/tokens.db", mounts) is None
    assert network_filesystem("/mnt/shared/app/tokens.db", mounts) == "nfs4"
    assert network_filesystem("/mnt/smb share/tokens.db", mounts) == "cifs"
    assert network_filesystem("/home/me/remote/tokens.db", mounts) == "fuse.sshfs"
    assert network_filesystem("/mnt/shared/local/tokens.db", mounts) is None  # a local mount
    assert network_filesystem("/mnt/sharedness/tokens.db", mounts) is None  # not a prefix
    assert network_filesystem(__file__) is None  # this machine's own disk


async def test_no_token_in_reprs_logs_or_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level("DEBUG")
    db = tmp_path / "tokens.db"
    store = SqliteStore(db)
    v = await store.put("acme", RECORD)
    held = await store.acquire("acme", v.version, Intent("w", "fp", 1.0))
    await store.save_rescue("acme", held.version, RECORD)
    await store.aclose()
    db.write_bytes(db.read_bytes()[:100])  # truncated
    broken = SqliteStore(db)
    with pytest.raises(StoreError) as info:
        await broken.read("acme")
    await broken.aclose()
    said = " ".join([repr(store), repr(held), str(info.value), caplog.text])
    assert "secret" not in said


async def test_the_network_filesystem_override_works_on_a_local_disk(tmp_path: Path):
    # No network filesystem here to refuse (the refusal itself is the check above, run
    # by start() before the file is touched); the override must not get in the way.
    store = SqliteStore(tmp_path / "tokens.db", allow_network_filesystem=True)
    await store.put("acme", RECORD)
    assert (await store.read("acme")).record == RECORD
    await store.aclose()
