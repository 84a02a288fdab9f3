"""A commit whose answer was lost although it landed: the retry finds the version
moved by its own write. The manager recognises its own write, so the transition it
made is reported as made (the hook fires once, the caller gets the outcome), instead
of being taken for a takeover by another worker.

A memory store that applies the first commit of a customer and then raises as if the
answer had been cut; the emulator over a real socket.
"""

from __future__ import annotations

import pytest

from sfrtr import (
    Hooks,
    MemoryStore,
    ReauthorizationRequired,
    RefreshPolicy,
    StoreError,
    TokenManager,
)
from sfrtr.emulator import Emulator
from sfrtr.records import TokenRecord, Versioned
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio


class AnswerLostOnce(MemoryStore):
    """The first commit lands, then its answer is lost (a StoreError); the manager
    retries it against a version its own write has moved."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = 0

    async def commit(self, customer: str, fence: int,
                     record: TokenRecord) -> Versioned | None:
        result = await super().commit(customer, fence, record)
        if result is not None and not self.lost:
            self.lost += 1
            raise StoreError("connection reset after the write (answer lost)")
        return result


def recording_hooks() -> tuple[Hooks, list[tuple[str, object]]]:
    seen: list[tuple[str, object]] = []
    hooks = Hooks(on_refreshed=lambda c, generation: seen.append(("refreshed", generation)),
                  on_reauth_required=lambda c, reason: seen.append(("reauth", reason)),
                  on_lockout_risk=lambda c, reason: seen.append(("risk", reason)))
    return hooks, seen


async def test_a_refresh_whose_commit_answer_was_lost_is_reported_once(emulator: Emulator):
    store = AnswerLostOnce()
    hooks, seen = recording_hooks()
    manager = TokenManager(emulator_oauth(emulator), store,
                           RefreshPolicy(lease_margin=0.5), hooks=hooks)
    try:
        record = await manager.connect("acme", emulator_grant(emulator, "acme"))
        stale = record.access_token.reveal()
        fresh = await manager.refresh("acme", stale=stale)
        await manager.hooks.drain()
        assert store.lost == 1
        assert fresh.access_token != stale
        assert seen == [("refreshed", 1)]
        assert manager.stats.rescued == 0  # not taken for a takeover
        assert await store.rescues("acme") == []
        assert emulator.ledger["redemptions"] == 1
    finally:
        await manager.aclose()


async def test_a_dead_grant_whose_commit_answer_was_lost_is_reported_once(
        emulator: Emulator):
    store = AnswerLostOnce()
    hooks, seen = recording_hooks()
    manager = TokenManager(emulator_oauth(emulator), store,
                           RefreshPolicy(lease_margin=0.5), hooks=hooks)
    try:
        record = await manager.connect("acme", emulator_grant(emulator, "acme"))
        for family in emulator.world.families.values():  # the admin revoked the app
            emulator.world.revoke_family(family)
        with pytest.raises(ReauthorizationRequired):
            await manager.refresh("acme", stale=record.access_token.reveal())
        await manager.hooks.drain()
        assert store.lost == 1
        assert [kind for kind, _ in seen] == ["reauth"]
        assert manager.stats.reauth_marked == 1
    finally:
        await manager.aclose()
