"""One contract, one suite: every store against the same semantics.

Each test runs on the memory store, the SQLite store (a file in a temporary
directory), the Postgres store (the session's real server, a schema per test)
and the etcd store (the session's real etcd). ``Backend.other()``
is "another process": a second instance on the same data (the memory store
has only one process, so it returns the same instance; tests that need two
live holders skip it). Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sfrtr import (
    Credentials,
    Intent,
    MemoryStore,
    RefreshPolicy,
    Secret,
    SqliteStore,
    Status,
    TokenEndpointUnavailable,
    TokenManager,
    TokenRecord,
    TokenStore,
)
from sfrtr.emulator import Emulator
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.postgres import PostgresStore
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres_server"]  # the postgres_server and pg_schema fixtures

RECORD = TokenRecord(access_token=Secret("at-1"), refresh_token=Secret("rt-1"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0,
                     expires_at=time.time() + 3600, grant_id="g1")
PATIENCE = 10.0  # seconds another process's change may take to show (a loaded machine)


def intent(worker: str = "w1", nonce: str = "") -> Intent:
    return Intent(worker, RECORD.refresh_token.fingerprint, 1.0, id=nonce or f"id-{worker}")


@dataclass
class Backend:
    kind: str
    first: TokenStore
    make: Any
    opened: list[TokenStore] = field(default_factory=list)

    @property
    def shared(self) -> bool:
        """Whether ``other()`` is a separate instance (a process of its own)."""
        return self.kind != "memory"

    async def other(self) -> TokenStore:
        if not self.shared:
            return self.first
        store: TokenStore = self.make()
        self.opened.append(store)
        await store.read("nobody")  # started, and its watch or poll running
        return store


STORES = ["memory", "sqlite", "postgres", "etcd", "etcd-served"]
SHARED = [kind for kind in STORES if kind != "memory"]
"""Stores that several processes share (a memory store is one process's alone)."""


@pytest.fixture(params=STORES)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async for made in _backend(request, tmp_path, request.param):
        yield made


@pytest.fixture(params=SHARED)
async def shared_backend(request: pytest.FixtureRequest,
                         tmp_path: Path) -> AsyncIterator[Backend]:
    """The contract of a store shared by processes: holders that end, answers lost."""
    async for made in _backend(request, tmp_path, request.param):
        yield made


async def _backend(request: pytest.FixtureRequest, tmp_path: Path,
                   kind: str) -> AsyncIterator[Backend]:
    if kind == "memory":
        memory = MemoryStore()

        def make() -> TokenStore:
            return memory
    elif kind == "sqlite":
        path = tmp_path / "tokens.db"

        def make() -> TokenStore:
            return SqliteStore(path)
    elif kind == "postgres":
        dsn = request.getfixturevalue("postgres_server").dsn
        schema = request.getfixturevalue("pg_schema")

        def make() -> TokenStore:
            return PostgresStore(dsn, schema=schema, lease_ttl=3, pool_size=4)
    else:
        server = request.getfixturevalue("etcd_server")
        namespace = request.getfixturevalue("namespace")

        def make() -> TokenStore:
            return EtcdStore(EtcdSettings(endpoints=[server.endpoint]), namespace=namespace,
                             lease_ttl=3,
                             mirror="served" if kind == "etcd-served" else "namespace")
    first = make()
    await first.read("nobody")
    backend = Backend(kind, first, make, [first])
    yield backend
    for store in backend.opened:
        await store.aclose()


class Changes:
    """What a subscriber was told, and a way to wait for a given change."""

    def __init__(self, store: TokenStore) -> None:
        self.seen: list[tuple[str, int | None]] = []
        self._changed = asyncio.Event()
        store.subscribe(self._on_change)

    def _on_change(self, customer: str, state: Any) -> None:
        self.seen.append((customer, None if state is None else state.record.generation))
        self._changed.set()

    async def until(self, change: tuple[str, int | None], timeout: float = PATIENCE) -> None:
        async with asyncio.timeout(timeout):
            while change not in self.seen:
                self._changed.clear()
                await self._changed.wait()


async def eventually(store: TokenStore, customer: str, check: Any,
                     timeout: float = PATIENCE) -> Any:
    """Wait (on the store's own change notifications) until ``check(state)`` holds."""
    deadline = time.monotonic() + timeout
    state = await store.read(customer)
    while not check(state):
        left = deadline - time.monotonic()
        assert left > 0, f"never happened; last state {state}"
        if state is None:
            await asyncio.sleep(0.02)
            state = await store.read(customer)
            continue
        moved = await store.wait_for_change(customer, state.stamp, left)
        state = moved if moved is not None else await store.read(customer)
    return state


async def test_put_read_customers_and_missing(backend: Backend):
    store = backend.first
    assert await store.read("acme/eu west") is None
    written = await store.put("acme/eu west", RECORD)
    got = await store.read("acme/eu west")
    assert got is not None
    assert got.record == RECORD
    assert got.version == written.version
    assert not got.locked
    assert not got.rescued
    assert got.stamp > 0
    await store.put("beta", RECORD)
    assert sorted(await store.customers()) == ["acme/eu west", "beta"]
    other = await backend.other()
    seen = await eventually(other, "beta", lambda s: s is not None)
    assert seen.record == RECORD


async def test_acquire_writes_the_intent_and_is_exclusive(backend: Backend):
    store = backend.first
    v0 = await store.put("acme", RECORD)
    other = await backend.other()
    await eventually(other, "acme", lambda s: s is not None)
    won = await store.acquire("acme", v0.version, intent("w1"))
    assert won is not None
    assert won.locked
    assert won.version != v0.version
    assert won.record.status is Status.REFRESHING
    assert won.record.intent is not None
    assert won.record.intent.id == "id-w1"
    assert won.record.refresh_token == RECORD.refresh_token
    # Durable: another process reads the intent, and the lock as held.
    seen = await eventually(other, "acme", lambda s: s is not None and s.version == won.version)
    assert seen.locked
    assert seen.record.intent is not None
    # Nobody else gets it: not at the old version, not at the new one.
    assert await other.acquire("acme", v0.version, intent("w2")) is None
    assert await other.acquire("acme", won.version, intent("w2")) is None


async def test_a_stale_version_never_acquires(backend: Backend):
    store = backend.first
    v0 = await store.put("acme", RECORD)
    v1 = await store.put("acme", RECORD.replace(generation=1))
    assert v1.version != v0.version
    assert await store.acquire("acme", v0.version, intent()) is None
    assert await store.acquire("missing", v0.version, intent()) is None
    assert (await store.read("acme")).locked is False


async def test_concurrent_acquires_exactly_one_wins(shared_backend: Backend):
    backend = shared_backend
    stores = [backend.first, await backend.other(), await backend.other()]
    for round_ in range(5):
        v = await backend.first.put("acme", RECORD.replace(generation=round_))
        for s in stores:
            await eventually(s, "acme", lambda st, v=v: st is not None and st.version == v.version)
        got = await asyncio.gather(*(s.acquire("acme", v.version, intent(f"w{i}"))
                                     for i, s in enumerate(stores)))
        assert sum(g is not None for g in got) == 1, got


async def test_commit_is_fenced_on_the_version(backend: Backend):
    store = backend.first
    v0 = await store.put("acme", RECORD)
    held = await store.acquire("acme", v0.version, intent())
    assert held is not None
    assert await store.commit("acme", v0.version, RECORD.replace(generation=9)) is None
    assert await store.commit("missing", held.version, RECORD) is None
    done = await store.commit("acme", held.version, RECORD.replace(generation=1))
    assert done is not None
    assert not done.locked
    current = await store.read("acme")
    assert current.version == done.version
    assert current.record.generation == 1
    assert current.record.intent is None
    assert not current.locked
    # The fence is spent: a second commit at it loses.
    assert await store.commit("acme", held.version, RECORD.replace(generation=2)) is None


async def test_put_fences_out_a_refresh_in_flight(backend: Backend):
    store = backend.first
    v0 = await store.put("acme", RECORD)
    held = await store.acquire("acme", v0.version, intent())
    await store.save_rescue("acme", 1, RECORD)
    regrant = await store.put("acme", RECORD.replace(grant_id="g2"))
    assert not regrant.locked
    assert await store.commit("acme", held.version, RECORD.replace(generation=1)) is None
    current = await store.read("acme")
    assert current.record.grant_id == "g2"
    assert not current.locked
    assert not current.rescued
    assert await store.rescues("acme") == []


async def test_rescues_are_kept_sorted_and_dropped(backend: Backend):
    store = backend.first
    await store.put("acme", RECORD)
    other = await backend.other()
    await other.save_rescue("acme", 30, RECORD.replace(generation=3))
    await other.save_rescue("acme", 7, RECORD.replace(generation=2))
    got = await store.rescues("acme")
    assert [(f, r.generation) for f, r in got] == [(7, 2), (30, 3)]
    assert await eventually(store, "acme", lambda s: s is not None and s.rescued)
    await store.drop_rescue("acme", 7)
    await store.drop_rescue("acme", 7)  # already gone: nothing happens
    assert [f for f, _ in await other.rescues("acme")] == [30]
    await store.drop_rescue("acme", 30)
    assert await eventually(other, "acme", lambda s: s is not None and not s.rescued)


async def test_rescued_customers_include_those_without_a_record(backend: Backend):
    """What rekey walks besides customers(): a refresh fenced out by a disconnect
    leaves its tokens in rescue under no record."""
    store = backend.first
    await store.put("kept", RECORD)
    v0 = await store.put("gone", RECORD)
    held = await store.acquire("gone", v0.version, intent())
    assert held is not None
    assert await store.delete("gone")
    assert await store.commit("gone", held.version, RECORD.replace(generation=1)) is None
    await store.save_rescue("gone", held.version, RECORD.replace(generation=1))
    await store.save_rescue("kept", 5, RECORD.replace(generation=2))
    assert await store.customers() == ["kept"]
    assert await store.rescued_customers() == ["gone", "kept"]  # type: ignore[attr-defined]


async def test_stamps_move_on_record_lock_and_rescue(backend: Backend):
    store = backend.first
    stamps = [(await store.put("acme", RECORD)).stamp]
    held = await store.acquire("acme", stamps[0] and (await store.read("acme")).version,
                               intent())
    assert held is not None
    stamps.append((await store.read("acme")).stamp)
    await store.save_rescue("acme", 5, RECORD)
    stamps.append((await store.read("acme")).stamp)
    await store.drop_rescue("acme", 5)
    stamps.append((await store.read("acme")).stamp)
    await store.commit("acme", held.version, RECORD)
    stamps.append((await store.read("acme")).stamp)
    assert stamps == sorted(set(stamps)), stamps  # every change moves it, forward


async def test_wait_returns_at_once_only_if_the_stamp_moved(backend: Backend):
    store = backend.first
    v0 = await store.put("acme", RECORD)
    now = await store.read("acme")
    assert (await store.wait_for_change("acme", now.stamp - 1, 5)).stamp == now.stamp
    started = time.monotonic()
    assert await store.wait_for_change("acme", now.stamp, 0.3) is None
    assert time.monotonic() - started >= 0.25
    assert v0.version == now.version


async def test_a_waiter_wakes_on_another_process_commit(backend: Backend):
    store = backend.first
    v0 = await store.put("acme", RECORD)
    other = await backend.other()
    seen = await eventually(other, "acme", lambda s: s is not None)
    held = await store.acquire("acme", v0.version, intent())
    locked = await eventually(other, "acme", lambda s: s.locked)

    async def commit_soon() -> float:
        await asyncio.sleep(0.3)
        await store.commit("acme", held.version, RECORD.replace(generation=1))
        return time.monotonic()

    committer = asyncio.create_task(commit_soon())
    got = await other.wait_for_change("acme", locked.stamp, PATIENCE)
    woke = time.monotonic()
    committed = await committer
    if got is not None and got.locked is False:
        assert got.record.generation == 1
    final = await eventually(other, "acme", lambda s: not s.locked)
    assert final.record.generation == 1
    assert woke - committed < PATIENCE / 2
    assert seen.stamp != final.stamp


async def test_a_waiter_wakes_on_a_rescue(backend: Backend):
    store = backend.first
    await store.put("acme", RECORD)
    other = await backend.other()
    seen = await eventually(other, "acme", lambda s: s is not None)
    waiter = asyncio.create_task(other.wait_for_change("acme", seen.stamp, PATIENCE))
    await asyncio.sleep(0.1)
    await store.save_rescue("acme", 3, RECORD)
    got = await waiter
    assert got is not None
    assert got.stamp != seen.stamp


async def test_delete_with_and_without_version(backend: Backend):
    store = backend.first
    v0 = await store.put("acme", RECORD)
    await store.save_rescue("acme", 4, RECORD)
    other = await backend.other()
    changes = Changes(other)
    await eventually(other, "acme", lambda s: s is not None)
    assert await store.delete("acme", version=v0.version + 1000) is False
    assert (await store.read("acme")) is not None
    assert await store.delete("acme", version=v0.version) is True
    assert await store.read("acme") is None
    assert await store.rescues("acme") == []
    assert await store.customers() == []
    assert await store.delete("acme") is True  # already gone
    await changes.until(("acme", None))
    again = await store.put("acme", RECORD.replace(generation=5))
    assert (await eventually(other, "acme", lambda s: s is not None)).version == again.version


async def test_subscribers_see_other_processes_changes(backend: Backend):
    store = backend.first
    other = await backend.other()
    changes = Changes(other)
    v0 = await store.put("acme", RECORD)
    await eventually(other, "acme", lambda s: s is not None)  # a customer it uses
    held = await store.acquire("acme", v0.version, intent())
    await store.commit("acme", held.version, RECORD.replace(generation=7))
    await changes.until(("acme", 7))


async def test_a_closed_holder_frees_the_lock_and_leaves_its_intent(shared_backend: Backend):
    """The holder goes away mid-refresh (closed here; killed in the process tests): the
    lock reads as free, the intent stays for recovery, and a waiter wakes."""
    backend = shared_backend
    holder = await backend.other()
    watcher = backend.first
    v0 = await holder.put("acme", RECORD)
    held = await holder.acquire("acme", v0.version, intent("dying"))
    assert held is not None
    locked = await eventually(watcher, "acme", lambda s: s is not None and s.locked)
    waiter = asyncio.create_task(watcher.wait_for_change("acme", locked.stamp, PATIENCE))
    await asyncio.sleep(0.1)
    await holder.aclose()
    got = await waiter
    assert got is not None, "the waiter slept through the holder's end"
    orphan = await eventually(watcher, "acme", lambda s: not s.locked)
    assert orphan.record.status is Status.REFRESHING
    assert orphan.record.intent is not None
    assert orphan.record.intent.worker == "dying"
    assert orphan.stamp != locked.stamp
    took = await watcher.acquire("acme", orphan.version, intent("recoverer"))
    assert took is not None
    assert took.locked


async def test_a_retried_acquire_that_landed_is_recognised(shared_backend: Backend):
    backend = shared_backend
    store = backend.first
    v0 = await store.put("acme", RECORD)
    first = await store.acquire("acme", v0.version, intent("w1", nonce="n-1"))
    assert first is not None
    again = await store.acquire("acme", v0.version, intent("w1", nonce="n-1"))
    # Recognised as ours (SQLite), or refused at once by a store that already saw its
    # own write (etcd's mirror; the manager then reclaims by the nonce): never a
    # second acquisition.
    assert again is None or (again.version == first.version and again.locked)
    if backend.kind in ("sqlite", "postgres"):
        assert again is not None
    assert await store.acquire("acme", v0.version, intent("w1", nonce="n-2")) is None


async def test_lease_api(backend: Backend):
    store = backend.first
    v0 = await store.put("acme", RECORD)
    held = await store.acquire("acme", v0.version, intent())
    assert held is not None
    assert held.record.intent is not None
    lease = held.record.intent.lease or None
    left = store.lease_remaining(lease)
    # No deadline (None), or one that covers at least part of the TTL.
    assert left is None or 0 < left <= store.lease_ttl
    if lease is not None:
        assert store.lease_remaining(lease + 12345) == 0.0


async def test_a_manager_refreshes_once_on_every_store(backend: Backend, emulator: Emulator):
    """The protocol end to end on each store: two managers (two processes where the
    store has them), a stale token, one redemption between them."""
    policy = RefreshPolicy(lease_margin=0.5, busy_backoff=0.05)
    # As long as a 3 s lease allows (a request of 1.15 s with its graces, plus the
    # margin, inside two thirds of it).
    oauth = {"timeout": 1.0, "connect_timeout": 0.9, "head_grace": 0.05, "answer_grace": 0.1}
    one = TokenManager(emulator_oauth(emulator, **oauth), backend.first, policy)
    two = TokenManager(emulator_oauth(emulator, **oauth), await backend.other(), policy)
    await one.connect("acme", emulator_grant(emulator, "acme"))
    stale = await one.token("acme")
    assert await two.token("acme") == stale

    async def refreshed(manager: TokenManager) -> Credentials:
        # What an application does with "could not reach the token endpoint" (nothing
        # was sent: a loaded machine's emulator slow to accept): ask again.
        for _ in range(3):
            try:
                return await manager.refresh("acme", stale=stale)
            except TokenEndpointUnavailable:
                await asyncio.sleep(0.2)
        return await manager.refresh("acme", stale=stale)

    a, b = await asyncio.gather(refreshed(one), refreshed(two))
    assert a.access_token == b.access_token != stale
    assert emulator.ledger["redemptions"] == 1
    assert emulator.ledger["reuse"] == 0
    assert (await backend.first.read("acme")).record.status is Status.VALID
    await one.oauth.aclose()
    await two.oauth.aclose()
