"""The protocol's decisions, exhaustively, without any I/O."""

from __future__ import annotations

import pytest

from sfrtr import (
    GrantSuspended,
    Intent,
    NotConnected,
    ReauthorizationRequired,
    Secret,
    SessionRefused,
    Status,
    TokenRecord,
)
from sfrtr.oauth.grant import TokenGrant
from sfrtr.protocol import (
    Fail,
    Reclaim,
    Recover,
    Redeem,
    Revive,
    Use,
    Wait,
    adoptable_after_rejection,
    dead_record,
    pick_rescue,
    plan,
    refreshed_record,
    released_record,
    suspended_record,
)
from sfrtr.records import Versioned

NOW = 1_000_000.0
RECORD = TokenRecord(access_token=Secret("at-1"), refresh_token=Secret("rt-1"),
                     instance_url="https://x.my.salesforce.com", issued_at=NOW - 100,
                     expires_at=NOW + 3600, generation=3)
INTENT = Intent(worker="w", refresh_fingerprint="f", started_at=NOW, id="i-1")


def v(record: TokenRecord = RECORD, version: int = 7, locked: bool = False,
      rescued: bool = False) -> Versioned:
    return Versioned(record, version, locked, rescued=rescued)


def decide(current: Versioned | None, stale: str | None = None, margin: float = 300,
           own: tuple[str, ...] = ()):
    return plan("acme", current, stale=stale, now=NOW, margin=margin, own_intents=own)


def test_missing_record_is_not_connected():
    step = decide(None)
    assert isinstance(step, Fail)
    assert isinstance(step.error, NotConnected)


def test_dead_record_fails_with_its_reason():
    step = decide(v(dead_record(RECORD, "revoked")))
    assert isinstance(step, Fail)
    assert isinstance(step.error, ReauthorizationRequired)
    assert step.error.reason == "revoked"


@pytest.mark.parametrize(("status", "locked", "expected"), [
    (Status.REFRESHING, True, Wait(7)),
    (Status.REFRESHING, False, Recover(7, orphan=True)),
    (Status.INDETERMINATE, True, Wait(7)),
    (Status.INDETERMINATE, False, Recover(7, orphan=False)),
    (Status.VALID, True, Wait(7)),
])
def test_in_progress_states(status, locked, expected):
    assert decide(v(RECORD.replace(status=status, intent=INTENT), locked=locked)) == expected


def test_fresh_record_is_used():
    assert decide(v()) == Use(RECORD, 7)


def test_near_expiry_is_redeemed():
    near = RECORD.replace(expires_at=NOW + 100)
    assert decide(v(near)) == Redeem(7)
    assert decide(v(near), margin=50) == Use(near, 7)


def test_a_401_on_the_stored_token_is_final():
    assert decide(v(), stale="at-1") == Redeem(7)


def test_a_401_on_an_older_token_adopts_the_stored_one():
    assert decide(v(), stale="at-0") == Use(RECORD, 7)
    assert decide(v(RECORD.replace(expires_at=NOW)), stale="at-0") == Redeem(7)


def test_refreshed_record_keeps_the_refresh_token_without_rotation():
    grant = TokenGrant(access_token=Secret("at-2"), refresh_token=None,
                       instance_url=RECORD.instance_url, identity_url="id", issued_at=NOW,
                       scope="api")
    new = refreshed_record(RECORD.replace(status=Status.REFRESHING, intent=INTENT), grant,
                           lifetime=7200)
    assert new.refresh_token == RECORD.refresh_token
    assert new.generation == 4
    assert new.expires_at == NOW + 7200
    assert new.status is Status.VALID
    assert new.intent is None


def test_rejection_adopts_only_a_valid_record_with_another_refresh_token():
    assert adoptable_after_rejection(RECORD, None) is None
    assert adoptable_after_rejection(RECORD, v()) is None
    other = RECORD.replace(refresh_token=Secret("rt-9"))
    assert adoptable_after_rejection(RECORD, v(other)) == v(other)
    assert adoptable_after_rejection(RECORD, v(dead_record(other, "x"))) is None


def test_pick_rescue_takes_the_newest_generation_above_the_stored_one():
    r4, r5 = RECORD.replace(generation=4), RECORD.replace(generation=5)
    assert pick_rescue(RECORD, []) is None
    assert pick_rescue(RECORD, [(10, RECORD)]) is None
    assert pick_rescue(RECORD, [(10, r4), (11, r5), (12, r4)]) == (11, r5)
    assert pick_rescue(r5, [(10, r4), (11, r5)]) is None


def test_pick_rescue_never_takes_another_grants_tokens():
    """A re-authorization starts generations again at 0: a late rescue of the old
    grant must not revive it over the new one (issue 10, item 6)."""
    new_grant = RECORD.replace(generation=0, grant_id="new")
    old_late = RECORD.replace(generation=9, grant_id="old")
    assert pick_rescue(new_grant, [(30, old_late)]) is None
    assert pick_rescue(new_grant, [(30, old_late), (31, new_grant.replace(generation=1))]) \
        == (31, new_grant.replace(generation=1))


def test_own_unfinished_intent_is_reclaimed_even_under_our_own_lock():
    """An acquire whose answer was lost leaves our intent under our own live lock;
    waiting on it would wait on ourselves (issue 10, item 4)."""
    mine = RECORD.replace(status=Status.REFRESHING, intent=INTENT)
    assert decide(v(mine, locked=True), own=("i-1",)) == Reclaim(7)
    assert decide(v(mine, locked=True), own=("other",)) == Wait(7)
    assert decide(v(mine, locked=True)) == Wait(7)


def test_dead_record_with_a_rescue_is_revived_not_failed():
    """A rescue saved while a takeover held the lock must not be stranded (item 7)."""
    dead = dead_record(RECORD, "lost")
    assert decide(v(dead, rescued=True)) == Revive(7)
    assert isinstance(decide(v(dead, rescued=True, locked=True)), Fail | Wait)
    assert isinstance(decide(v(dead)), Fail)


def test_suspended_grant_fails_clearly_until_its_backoff_ends():
    held = suspended_record(RECORD, Secret("rt-2"), "bad signature", until=NOW + 60)
    assert held.refresh_token == Secret("rt-2")
    assert held.generation == RECORD.generation + 1
    step = decide(v(held))
    assert isinstance(step, Fail)
    assert isinstance(step.error, GrantSuspended)
    assert "bad signature" in str(step.error)
    assert plan("acme", v(held), stale=None, now=NOW + 61, margin=300) == Redeem(7)
    # Releasing a suspended record (a refresh that was not sent) keeps it suspended.
    assert released_record(held).status is Status.SUSPENDED


def test_a_refused_refreshed_session_is_not_refreshed_again_before_its_backoff():
    refused = RECORD.replace(refresh_after=NOW + 60, reason="INVALID_SESSION_ID: IP")
    step = decide(v(refused), stale="at-1")
    assert isinstance(step, Fail)
    assert isinstance(step.error, SessionRefused)
    assert plan("acme", v(refused), stale="at-1", now=NOW + 61, margin=300) == Redeem(7)
    assert decide(v(refused)) == Use(refused, 7)  # the token itself is still handed out
