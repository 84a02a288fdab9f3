"""The lockout audit tells a needless re-authorization from a justified one."""

from __future__ import annotations

import pytest

from sfrtr import MemoryStore, Status, TokenManager
from sfrtr.emulator import Emulator, TokenState
from sfrtr.emulator.audit import audit_lockouts
from sfrtr.secret import Secret
from tests.conftest import emulator_grant, emulator_oauth
from tests.emulator_calls import refresh

pytestmark = pytest.mark.anyio


async def test_counts_only_lockouts_with_a_live_token(emulator: Emulator, http):
    store = MemoryStore()
    manager = TokenManager(emulator_oauth(emulator), store)
    for c in ("fine", "needless", "justified", "rotated-away", "stranded"):
        await manager.connect(c, emulator_grant(emulator, c))
    dead = Status.REAUTH_REQUIRED

    async def mark(customer: str, **changes: object) -> None:
        current = await store.read(customer)
        assert current is not None
        await store.put(customer, current.record.replace(**changes))

    await mark("needless", status=dead, reason="fail_closed")
    # justified: the stored token was rotated and its successor lost.
    rec = (await store.read("justified")).record
    status, _ = await refresh(http, emulator, rec.refresh_token.reveal())
    assert status == 200
    await mark("justified", status=dead)
    # valid but dead: the store holds a token the provider already rotated.
    rec = (await store.read("rotated-away")).record
    await refresh(http, emulator, rec.refresh_token.reveal())
    # stranded: dead in the store, but a rescue holds the family's live token.
    rec = (await store.read("stranded")).record
    _, answer = await refresh(http, emulator, rec.refresh_token.reveal())
    await mark("stranded", status=dead)
    current = await store.read("stranded")
    await store.save_rescue("stranded", current.version + 1, current.record.replace(
        status=Status.VALID, refresh_token=Secret(answer["refresh_token"])))

    audit = await audit_lockouts(store, emulator, [
        "fine", "needless", "justified", "rotated-away", "stranded", "never-stored"])
    assert sorted(audit.unjustified_lockouts) == ["needless", "stranded"]
    assert sorted(audit.reauth_required) == ["justified", "needless", "stranded"]
    assert audit.valid_but_dead == ["rotated-away"]
    assert sorted(audit.unsettled) == ["needless", "never-stored", "rotated-away", "stranded"]
    assert not audit.settled
    summary = audit.summary()
    assert summary["unjustified_lockouts"] == 2
    assert summary["by_status"] == {"valid": 2, "reauth_required": 3, "missing": 1}
    for v in audit.verdicts:
        assert isinstance(v.token_state, TokenState)
    assert audit.stale_access == []
    emulator.expire_sessions("fine")
    assert (await audit_lockouts(store, emulator, ["fine"])).stale_access == ["fine"]
    await manager.aclose()


async def test_every_customer_by_default_and_a_lookup_function(emulator: Emulator):
    store = MemoryStore()
    manager = TokenManager(emulator_oauth(emulator), store)
    for c in ("a", "b"):
        await manager.connect(c, emulator_grant(emulator, c))
    asked: list[str] = []

    def lookup(fp: str) -> TokenState:
        asked.append(fp)
        return TokenState.LIVE

    audit = await audit_lockouts(store, lookup)
    assert audit.settled
    assert len(asked) == 2
    assert audit.summary()["customers"] == 2
    await manager.aclose()
