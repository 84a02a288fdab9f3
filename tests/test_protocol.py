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
    grant_record,
    held_back_record,
    indeterminate_record,
    needs_refresh,
    pick_rescue,
    plan,
    refreshed_record,
    refused_record,
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


# --- Records the protocol writes, the errors it names, its boundaries (issue 19) ----------

GRANT = TokenGrant(access_token=Secret("at-2"), refresh_token=Secret("rt-2"),
                   instance_url="https://y.my.salesforce.com",
                   identity_url="https://login.salesforce.com/id/00D/005B",
                   issued_at=NOW + 5, scope="api refresh_token")
LIVE = RECORD.replace(grant_id="grant-a", identity_url="old-id", scope="old-scope")


def test_a_grant_without_a_refresh_token_cannot_become_a_record():
    """A first grant must carry a refresh token: storing one without would strand the
    customer at the first expiry."""
    bare = TokenGrant(access_token=Secret("at"), refresh_token=None,
                      instance_url=RECORD.instance_url, identity_url="id", issued_at=NOW,
                      scope="api")
    with pytest.raises(ValueError, match="refresh token"):
        grant_record(bare, lifetime=60)
    assert grant_record(bare, lifetime=60, refresh_token=Secret("rt-0")).refresh_token \
        == Secret("rt-0")
    # A rotated token in the grant wins over the one it replaces.
    assert grant_record(GRANT, lifetime=60, refresh_token=Secret("rt-0")).refresh_token \
        == Secret("rt-2")


def test_a_grant_record_holds_everything_the_grant_said():
    record = grant_record(GRANT, lifetime=7200, grant_id="grant-b")
    assert record == TokenRecord(
        access_token=Secret("at-2"), refresh_token=Secret("rt-2"),
        instance_url="https://y.my.salesforce.com", issued_at=NOW + 5,
        expires_at=NOW + 5 + 7200, generation=0, status=Status.VALID,
        identity_url="https://login.salesforce.com/id/00D/005B", scope="api refresh_token",
        grant_id="grant-b")


def test_a_refreshed_record_is_the_new_grant_of_the_same_authorization():
    held = LIVE.replace(status=Status.REFRESHING, intent=INTENT, reason="x",
                        refresh_after=NOW + 9, backoff=9.0)
    new = refreshed_record(held, GRANT, lifetime=600)
    assert new == TokenRecord(
        access_token=Secret("at-2"), refresh_token=Secret("rt-2"),
        instance_url="https://y.my.salesforce.com", issued_at=NOW + 5, expires_at=NOW + 605,
        generation=RECORD.generation + 1, status=Status.VALID,
        identity_url="https://login.salesforce.com/id/00D/005B", scope="api refresh_token",
        grant_id="grant-a")


@pytest.mark.parametrize("status", [Status.REFRESHING, Status.INDETERMINATE, Status.VALID])
def test_a_released_record_is_usable_again(status):
    """A recovery or a refresh that was not sent releases the record: left ``refreshing``
    (or ``indeterminate``), the next caller would wait out a grace period for nothing."""
    held = LIVE.replace(status=status, intent=INTENT, reason="a refresh got no answer")
    released = released_record(held)
    assert released == LIVE
    assert decide(v(released)) == Use(LIVE, 7)


def test_a_released_suspended_record_keeps_its_reason():
    held = suspended_record(LIVE, Secret("rt-2"), "bad signature", until=NOW + 60, backoff=60)
    released = released_record(held.replace(intent=INTENT))
    assert released == held
    assert released.reason == "bad signature"


def test_rescues_of_equal_generation_go_to_the_latest_fence():
    """Two rescues can carry the same generation (two fenced-out commits of one token);
    the later fence wins, and records are never compared with each other."""
    r4a = RECORD.replace(generation=4, access_token=Secret("at-a"))
    r4b = RECORD.replace(generation=4, access_token=Secret("at-b"))
    assert pick_rescue(RECORD, [(10, r4a), (12, r4b)]) == (12, r4b)
    assert pick_rescue(RECORD, [(12, r4b), (10, r4a)]) == (12, r4b)
    assert pick_rescue(RECORD, [(10, r4a), (11, RECORD.replace(generation=3))]) == (10, r4a)


def test_every_failure_names_its_customer():
    errors = [
        plan("globex", None, stale=None, now=NOW, margin=0),
        plan("globex", v(dead_record(RECORD, "revoked")), stale=None, now=NOW, margin=0),
        plan("globex", v(suspended_record(RECORD, Secret("rt-2"), "sig", until=NOW + 5)),
             stale=None, now=NOW, margin=0),
        plan("globex", v(refused_record(RECORD, "IP", until=NOW + 5)), stale="at-1",
             now=NOW, margin=0),
    ]
    for step in errors:
        assert isinstance(step, Fail)
        assert step.error.customer == "globex"  # type: ignore[attr-defined]
        assert "globex" in str(step.error)


def test_a_backoff_ends_at_its_instant_and_holds_while_this_worker_holds_back():
    suspended = suspended_record(RECORD, Secret("rt-2"), "sig", until=NOW, backoff=30)
    assert decide(v(suspended)) == Redeem(7)
    step = plan("acme", v(suspended), stale=None, now=NOW, margin=0, held_back=True)
    assert isinstance(step, Fail)
    assert isinstance(step.error, GrantSuspended)
    assert step.error.retry_at == NOW
    assert step.error.reason == "sig"
    refused = refused_record(RECORD, "IP", until=NOW, backoff=30)
    assert decide(v(refused), stale="at-1") == Redeem(7)
    step = plan("acme", v(refused), stale="at-1", now=NOW, margin=300, held_back=True)
    assert isinstance(step, Fail)
    assert isinstance(step.error, SessionRefused)
    assert (step.error.reason, step.error.retry_at) == ("IP", NOW)
    # A worker holding back never blocks a token that did not fail.
    assert plan("acme", v(refused), stale=None, now=NOW, margin=300, held_back=True) \
        == Use(refused, 7)


def test_expiry_margin_boundary():
    assert needs_refresh(RECORD, RECORD.expires_at - 300, 300)
    assert not needs_refresh(RECORD, RECORD.expires_at - 300.5, 300)
    assert decide(v(RECORD.replace(expires_at=NOW + 300))) == Redeem(7)


def test_an_intent_without_an_id_is_never_taken_for_ours():
    anonymous = RECORD.replace(status=Status.REFRESHING, intent=Intent(
        worker="w", refresh_fingerprint="f", started_at=NOW))
    assert decide(v(anonymous, locked=True), own=("",)) == Wait(7)
    assert decide(v(anonymous), own=("",)) == Recover(7, orphan=True)


def test_a_dead_record_under_a_lock_waits_for_no_rescue():
    dead = dead_record(RECORD.replace(intent=INTENT), "lost")
    assert dead.intent is None
    step = decide(v(dead, locked=True, rescued=True))
    assert isinstance(step, Fail)
    assert isinstance(step.error, ReauthorizationRequired)
    assert step.error.reason == "lost"


def test_the_records_written_after_each_answer():
    held = LIVE.replace(status=Status.REFRESHING, intent=INTENT)
    assert suspended_record(held, Secret("rt-9"), "sig", until=NOW + 60, backoff=60) == \
        held.replace(refresh_token=Secret("rt-9"), generation=held.generation + 1,
                     status=Status.SUSPENDED, intent=None, reason="sig",
                     refresh_after=NOW + 60, backoff=60, expires_at=0.0)
    assert suspended_record(held, Secret("rt-9"), "sig", until=NOW).backoff == 0.0
    assert held_back_record(held, "login hours", until=NOW + 60, backoff=60) == \
        held.replace(status=Status.SUSPENDED, intent=None, reason="login hours",
                     refresh_after=NOW + 60, backoff=60, expires_at=0.0)
    assert held_back_record(held, "login hours", until=NOW).backoff == 0.0
    assert refused_record(LIVE, "IP", until=NOW + 60, backoff=60) == \
        LIVE.replace(reason="IP", refresh_after=NOW + 60, backoff=60)
    assert refused_record(LIVE, "IP", until=NOW).backoff == 0.0
    assert dead_record(held, "revoked") == \
        held.replace(status=Status.REAUTH_REQUIRED, intent=None, reason="revoked")
    assert indeterminate_record(held, "no answer") == \
        held.replace(status=Status.INDETERMINATE, reason="no answer")


def test_after_a_rejection_only_a_valid_record_is_adopted():
    other = RECORD.replace(refresh_token=Secret("rt-9"))
    for status in (Status.REFRESHING, Status.SUSPENDED, Status.INDETERMINATE):
        assert adoptable_after_rejection(RECORD, v(other.replace(status=status))) is None


def test_a_suspended_grant_never_hands_out_its_access_token():
    """Once its backoff ends a suspended grant is redeemed, whatever expiry its record
    claims (one written by another writer, or an older version, may claim one)."""
    suspended = RECORD.replace(status=Status.SUSPENDED, reason="sig", refresh_after=NOW - 1)
    assert decide(v(suspended)) == Redeem(7)
    assert grant_record(GRANT, lifetime=60).grant_id == ""
    assert grant_record(GRANT, lifetime=60).generation == 0
