"""The idle keeper against the emulator, on shared stores (SQLite, etcd): one pass per
period across workers, only idle valid grants refreshed, each exactly once, paced."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sfrtr import ConfigurationError, RefreshPolicy, SqliteStore, Status, TokenManager
from sfrtr.emulator import Emulator
from sfrtr.keeper import DAY, IdleKeeper
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcd
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio

Factory = Callable[[], Any]


@pytest.fixture(params=["sqlite", "etcd"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path, etcd_server: LocalEtcd,
              namespace: str) -> Factory:
    """Makes store instances on one shared backend: each is another worker to the others
    (each closed by the manager that uses it)."""

    def make() -> Any:
        if request.param == "sqlite":
            return SqliteStore(tmp_path / "tokens.db")
        return EtcdStore(EtcdSettings(endpoints=[etcd_server.endpoint]), namespace=namespace)

    return make


def worker(em: Emulator, store: Any) -> TokenManager:
    return TokenManager(emulator_oauth(em), store, RefreshPolicy())


class Later:
    """A wall clock ``offset`` seconds ahead of the real one (records hold real times)."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_one_pass_per_period_across_workers_refreshes_each_idle_grant_once(
        emulator: Emulator, new_store: Factory):
    first, second = worker(emulator, new_store()), worker(emulator, new_store())
    for c in ("idle-a", "idle-b", "idle-c"):
        await first.connect(c, emulator_grant(emulator, c))
    before = emulator.ledger["redemptions"]
    # Eight days on: every grant is idle past the default threshold (7 days).
    clock = Later(8 * DAY)
    pauses: list[float] = []

    async def no_wait(seconds: float) -> None:
        pauses.append(seconds)

    keepers = [IdleKeeper(m, clock=clock, sleep=no_wait) for m in (first, second)]
    reports = await asyncio.gather(*(k.run_once() for k in keepers))
    try:
        assert sorted(r.claimed for r in reports) == [False, True]
        ran = next(r for r in reports if r.claimed)
        assert sorted(ran.refreshed) == ["idle-a", "idle-b", "idle-c"]
        assert ran.failed == {}
        assert emulator.ledger["redemptions"] - before == 3
        assert emulator.ledger["reuse"] == 0
        # Paced: a pause between two refreshes, none before the first, each within
        # the jitter around 1 / rate.
        assert len(pauses) == 2
        assert all(0.5 <= p <= 1.5 for p in pauses)
        # The same period again: claimed already, nothing refreshed twice.
        again = await asyncio.gather(*(k.run_once() for k in keepers))
        assert [r.claimed for r in again] == [False, False]
        assert emulator.ledger["redemptions"] - before == 3
        # Another period, an hour from now: the grants were just refreshed (issued_at is
        # now), so none is idle any more.
        clock.offset = 3600
        later = await asyncio.gather(*(k.run_once() for k in keepers))
        assert sorted(r.claimed for r in later) == [False, True]
        assert next(r for r in later if r.claimed).refreshed == []
        assert emulator.ledger["redemptions"] - before == 3
    finally:
        await first.aclose()
        await second.aclose()


async def test_fresh_grants_are_left_alone_and_dead_ones_reported(emulator: Emulator,
                                                                  new_store: Factory):
    manager = worker(emulator, new_store())
    try:
        await manager.connect("busy", emulator_grant(emulator, "busy"))
        await manager.connect("gone", emulator_grant(emulator, "gone"))
        # The customer revoked the app in Salesforce: the keeper's refresh finds out.
        for family in emulator.world.families.values():
            if family.org.name == "gone":
                emulator.world.revoke_family(family)
        before = emulator.ledger["redemptions"]
        keeper = IdleKeeper(manager, max_idle=3 * DAY, clock=Later(2 * DAY))
        report = await keeper.run_once()
        assert report.claimed
        assert report.checked == 2
        assert report.refreshed == []
        assert report.failed == {}
        assert emulator.ledger["redemptions"] == before

        keeper = IdleKeeper(manager, max_idle=3 * DAY, clock=Later(4 * DAY))
        report = await keeper.run_once()
        assert report.refreshed == ["busy"]
        assert report.failed == {"gone": "ReauthorizationRequired"}
        assert await manager.status("gone") is Status.REAUTH_REQUIRED
        # A grant known dead is not tried again (it needs the customer, not a refresh).
        keeper = IdleKeeper(manager, max_idle=3 * DAY, clock=Later(30 * DAY))
        report = await keeper.run_once()
        assert report.not_valid == ["gone"]
        assert "gone" not in report.failed
    finally:
        await manager.aclose()


async def test_run_keeps_passing_until_cancelled(emulator: Emulator, tmp_path: Path):
    manager = worker(emulator, SqliteStore(tmp_path / "tokens.db"))
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    sleeps: list[float] = []
    clock = Later(0.0)

    async def tick(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 4:
            raise asyncio.CancelledError  # as a cancel landing in the keeper's sleep
        clock.offset += seconds  # the clock moves on by the keeper's own sleep

    keeper = IdleKeeper(manager, period=600, max_idle=1000, clock=clock, sleep=tick,
                        rng=lambda: 1.0)
    try:
        with pytest.raises(asyncio.CancelledError):
            await keeper.run()
    finally:
        await manager.aclose()
    assert sleeps == [900.0] * 4  # period x (1 + jitter), after each pass
    # Passes at +0, +900, +1800 and +2700 s, each in a period of its own: idle past
    # 1,000 s (by this clock; a refresh stamps the real time) at the last two.
    assert emulator.ledger["redemptions"] == 2
    assert emulator.ledger["reuse"] == 0


def test_settings_are_checked():
    with pytest.raises(ValueError, match="negative"):
        IdleKeeper(None, max_idle=-1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        IdleKeeper(None, period=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="jitter"):
        IdleKeeper(None, jitter=1.0)  # type: ignore[arg-type]


async def test_keep_alive_runs_a_keeper_until_the_manager_closes(emulator: Emulator,
                                                                 tmp_path: Path):
    manager = worker(emulator, SqliteStore(tmp_path / "tokens.db"))
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    await asyncio.sleep(1.1)  # idle past max_idle (1 s) by the time the keeper looks
    task = manager.keep_alive(max_idle=1.0)
    try:
        with pytest.raises(ConfigurationError, match="already"):
            manager.keep_alive()
        for _ in range(200):  # its first pass runs at once
            if emulator.ledger["redemptions"]:
                break
            await asyncio.sleep(0.02)
        assert emulator.ledger["redemptions"] == 1
    finally:
        await manager.aclose()
    assert task.cancelled()
    assert emulator.ledger["reuse"] == 0
