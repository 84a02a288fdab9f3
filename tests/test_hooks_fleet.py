"""Hooks across workers: each transition of a grant is told once, by the worker that made it.

Two managers on one SQLite file (two workers, as the store sees them) against the
emulator; the hooks of both are counted together.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sfrtr import (
    ReauthorizationRequired,
    RefreshPolicy,
    SfrtrError,
    SqliteStore,
    TokenManager,
)
from sfrtr.emulator import Emulator
from sfrtr.hooks import Hooks
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio


class Told:
    """Every hook call of every worker, with the worker that made it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, Any]] = []

    def hooks(self, worker: str) -> Hooks:
        def record(kind: str) -> Any:
            def hook(customer: str, detail: Any) -> None:
                self.calls.append((kind, worker, customer, detail))
            return hook

        return Hooks(on_refreshed=record("refreshed"),
                     on_reauth_required=record("reauth_required"),
                     on_lockout_risk=record("lockout_risk"))

    def kinds(self) -> Counter[str]:
        return Counter(kind for kind, *_ in self.calls)


def workers(em: Emulator, db: Path, told: Told, **policy: Any) -> list[TokenManager]:
    policy.setdefault("lease_margin", 0.5)
    return [TokenManager(emulator_oauth(em, timeout=1.0, connect_timeout=0.5,
                                        head_grace=0.1, answer_grace=0.2),
                         SqliteStore(db), RefreshPolicy(**policy), worker_id=name,
                         hooks=told.hooks(name))
            for name in ("w1", "w2")]


async def test_one_refresh_one_on_refreshed_across_workers(emulator: Emulator, tmp_path: Path):
    told = Told()
    w1, w2 = workers(emulator, tmp_path / "t.db", told)
    try:
        await w1.connect("acme", emulator_grant(emulator, "acme"))
        stale = await w1.token("acme")
        assert await w2.token("acme") == stale
        # Both workers see the session die and ask for a newer token at once.
        await asyncio.gather(*(w.refresh("acme", stale=stale) for w in (w1, w2)
                               for _ in range(20)))
        await w1.hooks.drain()
        await w2.hooks.drain()
        assert emulator.ledger["redemptions"] == 1
        refreshed = [c for c in told.calls if c[0] == "refreshed"]
        assert len(refreshed) == 1
        assert refreshed[0][2:] == ("acme", 1)  # customer and generation, no token
    finally:
        await w1.aclose()
        await w2.aclose()


async def test_a_dead_grant_is_told_once_and_the_other_worker_learns_it(emulator: Emulator,
                                                                        tmp_path: Path):
    told = Told()
    w1, w2 = workers(emulator, tmp_path / "t.db", told, recovery="fail_closed")
    try:
        await w1.connect("acme", emulator_grant(emulator, "acme"))
        stale = await w1.token("acme")
        for family in emulator.world.families.values():  # the admin revoked the app
            emulator.world.revoke_family(family)
        results = await asyncio.gather(*(w.refresh("acme", stale=stale) for w in (w1, w2)),
                                       return_exceptions=True)
        assert all(isinstance(r, ReauthorizationRequired) for r in results)
        await w1.hooks.drain()
        await w2.hooks.drain()
        assert told.kinds() == Counter({"reauth_required": 1})
        _, _, customer, reason = told.calls[0]
        assert customer == "acme"
        assert reason
        assert "rt-" not in reason
        assert stale not in reason
    finally:
        await w1.aclose()
        await w2.aclose()


async def test_an_unanswered_refresh_is_a_lockout_risk_told_once(emulator: Emulator,
                                                                 tmp_path: Path):
    told = Told()
    w1, w2 = workers(emulator, tmp_path / "t.db", told, recovery="introspect")
    try:
        await w1.connect("acme", emulator_grant(emulator, "acme"))
        stale = await w1.token("acme")
        # The token endpoint rotates the refresh token, then drops the connection.
        emulator.faults.set("token", drop_after_rotation=1)
        with pytest.raises(SfrtrError):
            await w1.refresh("acme", stale=stale)
        await w1.hooks.drain()
        assert told.kinds() == Counter({"lockout_risk": 1})
        assert told.calls[0][1:3] == ("w1", "acme")
        # The other worker finds the indeterminate record: it does not tell it again.
        with pytest.raises(SfrtrError):
            await w2.refresh("acme", stale=stale)
        await w2.hooks.drain()
        assert told.kinds()["lockout_risk"] == 1
    finally:
        await w1.aclose()
        await w2.aclose()
