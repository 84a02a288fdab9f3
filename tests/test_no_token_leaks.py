"""No access or refresh token value appears in any log record, repr or exception,
nor, with encryption on, in the raw bytes of a store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest

from sfrtr import MemoryStore, RefreshPolicy, SfrtrError, Status, TokenManager
from sfrtr.emulator import Emulator
from sfrtr.protocol import dead_record
from tests.conftest import emulator_grant, emulator_oauth
from tests.raw_store import SEALED_KINDS, raw_bytes, ring, store_maker

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres_server"]


def issued_tokens(em: Emulator) -> set[str]:
    tokens = set(em.world.refresh_index)
    for family in em.world.families.values():
        tokens.update(t.value for t in family.access_tokens)
    return tokens


async def test_no_token_in_logs_reprs_or_errors(emulator: Emulator, caplog):
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []
    store = MemoryStore()
    manager = TokenManager(emulator_oauth(emulator), store,
                           RefreshPolicy(lease_margin=0.5, busy_backoff=0.01))

    async def attempt(coro) -> None:  # type: ignore[no-untyped-def]
        try:
            result = await coro
            shown.append(repr(result) if not isinstance(result, str) else "")
        except SfrtrError as exc:
            shown.extend([str(exc), repr(exc), repr(exc.__cause__)])

    # success, 401 adoption, rotation
    record = await manager.connect("ok", emulator_grant(emulator, "ok"))
    shown.append(repr(record))
    await attempt(manager.refresh("ok", stale=record.access_token.reveal()))
    await attempt(manager.refresh("ok", stale=record.access_token.reveal()))
    # rejection
    rec = await manager.connect("revoked", emulator_grant(emulator, "revoked"))
    emulator.world.revoke_family(emulator.world.refresh_index[rec.refresh_token.reveal()])
    await attempt(manager.refresh("revoked", stale=rec.access_token.reveal()))
    await attempt(manager.token("revoked"))
    # indeterminate (rotate, then drop)
    rec = await manager.connect("dropped", emulator_grant(emulator, "dropped"))
    emulator.faults.set("token", drop_after_rotation=1)
    await attempt(manager.refresh("dropped", stale=rec.access_token.reveal()))
    # busy
    rec = await manager.connect("busy", emulator_grant(emulator, "busy"))
    emulator.faults.set("token", latency=0.1)
    outsider = TokenManager(emulator_oauth(emulator), MemoryStore())
    await outsider.store.put("busy", rec)
    await asyncio.gather(attempt(outsider.refresh("busy", stale=rec.access_token.reveal())),
                         attempt(manager.refresh("busy", stale=rec.access_token.reveal())))
    emulator.faults.clear()
    # orphan recovery, and a fenced-out commit that revives through its rescue
    rec = await manager.connect("orphan", emulator_grant(emulator, "orphan"))
    await store.put("orphan", rec.replace(status=Status.REFRESHING,
                                          intent=manager._intent(rec)))
    manager._cache.clear()
    await attempt(manager.token("orphan"))
    rec = await manager.connect("fenced", emulator_grant(emulator, "fenced"))
    emulator.faults.set("token", latency=0.1)
    task = asyncio.create_task(attempt(manager.refresh("fenced",
                                                       stale=rec.access_token.reveal())))
    await asyncio.sleep(0.03)
    await store.put("fenced", dead_record(rec, "taken over"))
    await task
    for customer in await store.customers():
        shown.append(repr(await store.read(customer)))
    shown.append(repr(manager.stats))
    await manager.aclose()
    await outsider.aclose()

    secrets = issued_tokens(emulator)
    assert len(secrets) > 12
    haystack = caplog.text + "\n".join(shown)
    assert caplog.records, "the flows above should have logged something"
    leaked = [s[:12] + "..." for s in secrets if s in haystack]
    assert leaked == []


@pytest.fixture(params=SEALED_KINDS)
def sealed_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_sealed_stores_hold_no_token_in_their_raw_bytes(
        emulator: Emulator, request: pytest.FixtureRequest, tmp_path: Path, sealed_kind: str,
        caplog: pytest.LogCaptureFixture):
    """With encryption on, the bytes a backup of the store would hold (the SQLite file
    and its WAL, the Postgres tables' rows, every etcd value) contain no access or
    refresh token: not the records, not the rescues of a fenced-out commit."""
    store = store_maker(request, tmp_path, sealed_kind)(ring("k1", "k2"))
    manager = TokenManager(emulator_oauth(emulator), store,
                           RefreshPolicy(lease_margin=0.5, busy_backoff=0.01))
    try:
        for customer in ("a", "b", "c"):
            record = await manager.connect(customer, emulator_grant(emulator, customer))
            stale = record.access_token.reveal()
            for _ in range(2):  # rotations: every generation is written sealed
                stale = (await manager.refresh(customer, stale=stale)).access_token
        # A commit fenced out by a re-authorization: its tokens go to a rescue entry.
        rec = await manager.connect("fenced", emulator_grant(emulator, "fenced"))
        emulator.faults.set("token", latency=0.2)
        task = asyncio.create_task(manager.refresh("fenced", stale=rec.access_token.reveal()))
        await asyncio.sleep(0.08)
        await store.put("fenced", dead_record(rec, "taken over"))
        with contextlib.suppress(SfrtrError):
            await task
        emulator.faults.clear()
        assert "kept as rescue" in caplog.text
        # And a rescue entry left in place (the one above was adopted), as a crash
        # between the two would leave it.
        current = await store.read("a")
        assert current is not None
        await store.save_rescue("a", 10**6, current.record)
        assert len(await store.rescues("a")) == 1
        raw = await raw_bytes(store)
    finally:
        await manager.aclose()
    secrets = issued_tokens(emulator)
    assert len(secrets) >= 16
    assert raw.count(b"v1.k2.") >= 4
    leaked = [s[:12] + "..." for s in secrets if s.encode() in raw]
    assert leaked == []
