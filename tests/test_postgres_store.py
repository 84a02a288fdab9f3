"""The Postgres store: real processes on a real server, the emulator, real faults.

Workers are ``python -m tests.postgres_worker`` (each its own store instance, so its
own presence and holder number); the test process serves the emulator and is
"another process" where a scenario needs one. Figures are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from sfrtr import (
    CoordinationTimeout,
    Intent,
    LeaseLost,
    RefreshPolicy,
    Secret,
    Status,
    StoreError,
    TokenManager,
    TokenRecord,
)
from sfrtr.emulator import Emulator
from sfrtr.store.postgres import PostgresStore, migrate, redact_dsn
from tests.conftest import emulator_grant, emulator_oauth
from tests.storm_proof import CI_SIZE, ProofSize, run_proof
from tests.test_multiprocess import ROOT, Worker

if TYPE_CHECKING:
    from tests.postgres_server import LocalPostgres

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres_server"]  # the postgres_server and pg_schema fixtures

RECORD = TokenRecord(access_token=Secret("at-secret-1"), refresh_token=Secret("rt-secret-1"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0,
                     expires_at=time.time() + 3600)
TTL = 4.0  # the workers' lease: > 1.5 x their request limit (2.2 s)


async def start_worker(dsn: str, schema: str, em: Emulator, customers: list[str],
                       **options: Any) -> Worker:
    args = [sys.executable, "-m", "tests.postgres_worker", "--dsn", dsn, "--schema", schema,
            "--login-url", str(em.base_url), "--customers", ",".join(customers)]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        args += [flag] if value is True else [flag, str(value)]
    process = await asyncio.create_subprocess_exec(
        *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return Worker(process)


async def connect_all(em: Emulator, dsn: str, schema: str, customers: list[str],
                      lease_ttl: float = TTL, **policy: Any) -> TokenManager:
    """The test's own manager (another process, as the store sees it), grants stored."""
    policy.setdefault("lease_margin", 0.5)
    manager = TokenManager(emulator_oauth(em, timeout=1.2, connect_timeout=0.5),
                           PostgresStore(dsn, schema=schema, lease_ttl=lease_ttl),
                           RefreshPolicy(**policy))
    for c in customers:
        await manager.connect(c, emulator_grant(em, c))
    return manager


async def terminate(dsn: str, pid: int) -> None:
    """End a backend from the server side, as an operator (or a failover) would."""
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


@pytest.fixture
async def own_server() -> AsyncIterator[LocalPostgres]:
    """A server of the test's own, for tests that restart it."""
    from tests.postgres_server import LocalPostgres

    server = LocalPostgres()
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.close)


# -- the multi-process proof ------------------------------------------------------------

async def test_processes_coroutines_customers_and_session_expiries(
        emulator: Emulator, postgres_server: LocalPostgres, pg_schema: str):
    # CI runs 6 x 100 x 30; `nox -s proof` runs the 8 x 200 x 50 (SFRTR_PROOF_SIZE).
    size = ProofSize.from_env(CI_SIZE)
    customers = [f"cust-{i:02d}" for i in range(size.customers)]
    dsn = postgres_server.dsn
    mine = await connect_all(emulator, dsn, pg_schema, customers, lease_ttl=20)
    run = await run_proof(emulator, mine, customers, size, lambda i: start_worker(
        dsn, pg_schema, emulator, customers, coroutines=size.coroutines, duration=120,
        pause=0.3, lease_ttl=30, production=True, waves=size.expiries))
    print("\n" + run.summary("Postgres"))
    run.check()


# -- a holder killed, stopped or cut off mid-refresh ----------------------------------------

async def test_sigkill_before_the_provider_call_frees_the_lock_and_refreshes(
        emulator: Emulator, postgres_server: LocalPostgres, pg_schema: str):
    """The holder dies with its intent written and nothing sent: Postgres drops its
    presence's advisory lock, a waiter wakes, and recovery (introspection: still
    active) refreshes after the grace. No reuse, no lockout."""
    dsn = postgres_server.dsn
    mine = await connect_all(emulator, dsn, pg_schema, ["acme"])
    stale = await mine.token("acme")
    worker = await start_worker(dsn, pg_schema, emulator, ["acme"], mode="hold-before-redeem")
    try:
        await worker.expect("EVENT redeeming")
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
        assert not woke.locked
        assert woke.record.intent is not None
        creds = await mine.refresh("acme", stale=stale)
        took = time.monotonic() - killed
        print(f"\nPostgres SIGKILL before redeem: lock seen free after {noticed * 1000:.0f} ms,"
              f" refreshed {took:.2f}s after the kill (grace {mine._grace(orphan=True):.2f}s)")
        assert creds.access_token != stale
        assert (await mine.store.read("acme")).record.status is Status.VALID
        assert emulator.ledger["redemptions"] == 1
        assert emulator.ledger["reuse"] == 0
        assert emulator.ledger["revocations"] == 0
        assert took < mine._grace(orphan=True) + 8
    finally:
        await worker.reap()
        await mine.aclose()


async def test_sigstop_within_the_lease_keeps_the_lock_and_sigcont_commits(
        emulator: Emulator, postgres_server: LocalPostgres, pg_schema: str):
    """A holder stopped for less than its lease keeps its lock: others wait and time
    out, nobody takes over; continued, it commits and the waiters get its tokens."""
    dsn = postgres_server.dsn
    mine = await connect_all(emulator, dsn, pg_schema, ["acme"], wait_timeout=1.0)
    stale = await mine.token("acme")
    emulator.faults.set("token", latency=0.5)
    worker = await start_worker(dsn, pg_schema, emulator, ["acme"], mode="refresh", timeout=1.5,
                                lease_ttl=8)
    try:
        await worker.expect("EVENT redeeming")
        (family,) = emulator.world.families.values()
        async with asyncio.timeout(5):
            while not family.in_flight:  # noqa: ASYNC110 (the emulator has no event for it)
                await asyncio.sleep(0.001)
        worker.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        with pytest.raises(CoordinationTimeout):
            await mine.refresh("acme", stale=stale)
        held = await mine.store.read("acme")
        assert held.locked  # stopped ~1 s of an 8 s lease: still held
        refresher = asyncio.create_task(mine.refresh("acme", stale=stale))
        await asyncio.sleep(0.2)
        worker.signal(signal.SIGCONT)
        resumed = time.monotonic()
        creds = await refresher
        print(f"\nPostgres SIGSTOP: stopped {resumed - stopped:.2f}s; the waiter had the new "
              f"token {(time.monotonic() - resumed) * 1000:.0f} ms after SIGCONT")
        result = await worker.result()
        assert result["ok"] is True, worker.lines
        assert creds.access_token != stale
        current = await mine.store.read("acme")
        assert current.record.status is Status.VALID
        assert current.record.generation == 1
        assert emulator.ledger["redemptions"] == 1
        assert emulator.ledger["reuse"] == 0
    finally:
        worker.signal(signal.SIGCONT)
        await worker.reap()
        await mine.aclose()


async def test_sigstop_past_the_lease_the_server_drops_the_lock(
        emulator: Emulator, postgres_server: LocalPostgres, pg_schema: str):
    """Stopped past its lease, the holder's presence is ended by the server
    (idle_session_timeout): its lock reads free. Continued before anyone took over
    (the grace is lease + request limit), its commit still lands: one redemption."""
    dsn = postgres_server.dsn
    mine = await connect_all(emulator, dsn, pg_schema, ["acme"])
    await mine.token("acme")
    emulator.faults.set("token", latency=0.5)
    worker = await start_worker(dsn, pg_schema, emulator, ["acme"], mode="refresh", timeout=1.5,
                                lease_ttl=4)
    try:
        await worker.expect("EVENT redeeming")
        (family,) = emulator.world.families.values()
        async with asyncio.timeout(5):
            while not family.in_flight:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        worker.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        held = await mine.store.read("acme")
        assert held.locked
        freed = await mine.store.wait_for_change("acme", held.stamp, 15)
        assert freed is not None
        assert not freed.locked, "the server kept a stopped holder's presence"
        gone = time.monotonic() - stopped
        worker.signal(signal.SIGCONT)
        result = await worker.result()
        print(f"\nPostgres SIGSTOP past a 4 s lease: lock free {gone:.2f}s after the stop")
        assert result["ok"] is True, worker.lines
        current = await mine.store.read("acme")
        assert current.record.status is Status.VALID
        assert current.record.generation == 1
        assert emulator.ledger["redemptions"] == 1
        assert emulator.ledger["reuse"] == 0
    finally:
        worker.signal(signal.SIGCONT)
        await worker.reap()
        await mine.aclose()


async def test_presence_killed_server_side_stops_the_holder_before_sending(
        emulator: Emulator, postgres_server: LocalPostgres, pg_schema: str):
    """pg_terminate_backend on a live holder's presence: its lock goes at once, its
    process learns it lost the lease and does not send; recovery refreshes."""
    dsn = postgres_server.dsn
    mine = await connect_all(emulator, dsn, pg_schema, ["acme"])
    stale = await mine.token("acme")
    worker = await start_worker(dsn, pg_schema, emulator, ["acme"], mode="pause-before-redeem")
    try:
        ready = await worker.expect("READY")
        pid = int(ready.split()[-1])
        await worker.expect("EVENT paused")
        held = await mine.store.read("acme")
        assert held.locked
        await terminate(dsn, pid)
        cut = time.monotonic()
        freed = await mine.store.wait_for_change("acme", held.stamp, 10)
        assert freed is not None
        assert not freed.locked
        print(f"\nPostgres presence terminated: lock seen free after "
              f"{(time.monotonic() - cut) * 1000:.0f} ms")
        await asyncio.sleep(0.3)
        worker.signal(signal.SIGUSR1)  # it goes on to the lease check: lost, nothing sent
        result = await worker.result()
        assert result["ok"] is False
        assert result["error"] == "LeaseLost", worker.lines
        assert result["redemptions"] == 0
        assert emulator.ledger["redemptions"] == 0
        creds = await mine.refresh("acme", stale=stale)  # recovery: active, refreshed
        assert creds.access_token != stale
        assert emulator.ledger["redemptions"] == 1
        assert emulator.ledger["reuse"] == 0
    finally:
        await worker.reap()
        await mine.aclose()


async def test_a_late_commit_after_the_presence_was_killed_is_fenced(
        postgres_server: LocalPostgres, pg_schema: str):
    """In one process, step by step: the holder's presence is terminated from the
    server; another store sees the lock free and takes over; the old holder's lease
    reads 0 and its late commit fails its compare (its tokens would go to a rescue)."""
    dsn = postgres_server.dsn
    old = PostgresStore(dsn, schema=pg_schema, lease_ttl=TTL)
    other = PostgresStore(dsn, schema=pg_schema, lease_ttl=TTL)
    try:
        v0 = await old.put("acme", RECORD)
        held = await old.acquire("acme", v0.version, Intent("old", "fp", 1.0, id="a"))
        assert held is not None
        assert held.record.intent is not None
        lease = held.record.intent.lease
        assert old.lease_remaining(lease) > 0
        await terminate(dsn, old._presence_pid)
        for _ in range(100):
            if old.lease_remaining(lease) == 0.0:
                break
            await asyncio.sleep(0.02)
        assert old.lease_remaining(lease) == 0.0  # it knows at once: sends nothing more
        seen = await other.read("acme")
        assert not seen.locked
        took = await other.acquire("acme", seen.version, Intent("new", "fp", 1.0, id="b"))
        assert took is not None
        late = await old.commit("acme", held.version, RECORD.replace(generation=1))
        assert late is None  # fenced
        await old.save_rescue("acme", held.version, RECORD.replace(generation=1))
        assert [f for f, _ in await other.rescues("acme")] == [held.version]
        # The old store carries on under a new presence (a new holder number).
        await asyncio.sleep(0.1)
        again = await old.read("acme")
        assert again.locked  # the taker's lock
        for _ in range(100):
            if old.holder is not None:
                break
            await asyncio.sleep(0.05)
        assert old.holder not in (None, lease)
        assert old.lease_remaining(lease) == 0.0
    finally:
        await old.aclose()
        await other.aclose()


# -- the server restarted -------------------------------------------------------------------

async def test_postgres_restarted_mid_run(emulator: Emulator, own_server: LocalPostgres,
                                          pg_schema: str):
    dsn = own_server.dsn
    emulator.api_limit = 10**9
    customers = [f"c{i}" for i in range(10)]
    mine = await connect_all(emulator, dsn, pg_schema, customers)
    workers = [await start_worker(dsn, pg_schema, emulator, customers, coroutines=30,
                                  duration=16, wait_timeout=5) for _ in range(3)]
    try:
        for w in workers:
            await w.expect("READY")
        await asyncio.sleep(1)
        emulator.expire_sessions()  # round 1: all up
        await asyncio.sleep(2)
        await asyncio.to_thread(own_server.stop, "immediate")  # a crash
        down = time.monotonic()
        emulator.expire_sessions()  # round 2: while Postgres is away
        await asyncio.sleep(2.0)
        await asyncio.to_thread(own_server.start)
        print(f"\nPostgres was down {time.monotonic() - down:.1f}s")
        await asyncio.sleep(4)  # reconnect, new presences, refresh round 2
        emulator.expire_sessions()  # round 3: after the restart
        await asyncio.sleep(3)
        results = [await w.result(timeout=60) for w in workers]
        print(f"Postgres restart: max loop stall per worker {[r['max_stall'] for r in results]}"
              f", failures during the outage {[r['failures'] for r in results]}, redemptions "
              f"{emulator.ledger['redemptions']}")
        assert max(r["max_stall"] for r in results) < 1.0
        for c in customers:  # nothing lost: every grant still works
            current = await mine.store.read(c)
            assert current.record.status is Status.VALID, (c, current.record.reason)
            assert current.record.access_token.reveal() in emulator.world.access_index
        kinds = {kind for r in results for kind in r["failures"]}
        assert kinds <= {"StoreError", "CoordinationTimeout", "LeaseLost",
                         "TokenEndpointUnavailable"}
        assert emulator.ledger["reuse"] == 0
        assert emulator.ledger["revocations"] == 0
        assert emulator.ledger["redemptions"] <= 3 * len(customers)
        assert emulator.ledger["redemptions"] >= 2 * len(customers)
    finally:
        for w in workers:
            await w.reap()
        await mine.aclose()


# -- schema, errors, secrets ----------------------------------------------------------------

async def test_schema_migrate_and_refusal_without_it(postgres_server: LocalPostgres,
                                                     pg_schema: str):
    dsn = postgres_server.dsn
    bare = PostgresStore(dsn, schema=pg_schema, create_schema=False)
    with pytest.raises(Exception, match="sfrtr migrate"):
        await bare.read("acme")
    await bare.aclose()
    assert await migrate(dsn, schema=pg_schema) == 1
    assert await migrate(dsn, schema=pg_schema) == 1  # idempotent
    store = PostgresStore(dsn, schema=pg_schema, create_schema=False)
    await store.put("acme", RECORD)
    assert (await store.read("acme")).record == RECORD
    await store.aclose()


async def test_errors_and_reprs_never_carry_secrets(postgres_server: LocalPostgres,
                                                    pg_schema: str):
    dsn = postgres_server.dsn.replace("sfrtr@", "sfrtr:hunter2@")
    store = PostgresStore(dsn, schema=pg_schema)
    await store.put("acme", RECORD)
    assert "hunter2" not in repr(store)
    assert redact_dsn("host=x password=hunter2 user=u") == "host=x password=*** user=u"
    down = PostgresStore("postgresql://u:hunter2@127.0.0.1:1/db", connect_timeout=1)
    with pytest.raises(StoreError) as info:
        await down.read("acme")
    assert "hunter2" not in str(info.value)
    await down.aclose()
    conn = await asyncpg.connect(postgres_server.dsn)
    try:  # a statement past the timeout: a clear error, nothing of the record in it
        async with conn.transaction():
            await conn.execute(f'LOCK TABLE "{pg_schema}".sfrtr_tokens')
            slow = PostgresStore(postgres_server.dsn, schema=pg_schema, statement_timeout=0.3,
                                 create_schema=False)
            with pytest.raises(StoreError) as info:
                await slow.put("acme", RECORD.replace(generation=2))
            await slow.aclose()
        message = str(info.value)
        assert "secret" not in message
        assert "canceling statement" in message or "timed out" in message
    finally:
        await conn.close()
    assert (await store.read("acme")).record == RECORD
    await store.aclose()


async def test_a_lost_presence_refuses_acquires_until_renewed(postgres_server: LocalPostgres,
                                                              pg_schema: str):
    store = PostgresStore(postgres_server.dsn, schema=pg_schema, lease_ttl=TTL)
    try:
        v0 = await store.put("acme", RECORD)
        first = store.holder
        await terminate(postgres_server.dsn, store._presence_pid)
        for _ in range(100):
            if store.holder != first:
                break
            await asyncio.sleep(0.02)
        # The next acquire takes a new presence (a new holder number) or refuses.
        try:
            held = await store.acquire("acme", v0.version, Intent("w", "fp", 1.0, id="x"))
        except LeaseLost:
            held = await store.acquire("acme", v0.version, Intent("w", "fp", 1.0, id="y"))
        assert held is not None
        assert held.record.intent is not None
        assert held.record.intent.lease not in (0, first)
        assert store.lease_remaining(held.record.intent.lease) > 0
    finally:
        await store.aclose()


async def test_the_migrate_command(postgres_server: LocalPostgres, pg_schema: str,
                                   capsys: pytest.CaptureFixture[str]):
    from sfrtr.cli import main

    assert main(["migrate", "--postgres", "unused", "--schema", pg_schema, "--print-sql"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("BEGIN;")
    assert f'"{pg_schema}"."sfrtr_tokens"' in script
    dsn = postgres_server.dsn.replace("sfrtr@", "sfrtr:hunter2@")
    assert await asyncio.to_thread(main, ["migrate", "--postgres", dsn, "--schema",
                                          pg_schema]) == 0
    out = capsys.readouterr().out
    assert "at version 1" in out
    assert "hunter2" not in out
    store = PostgresStore(postgres_server.dsn, schema=pg_schema, create_schema=False)
    await store.put("acme", RECORD)
    await store.aclose()
