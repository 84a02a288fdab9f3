"""Secrets, records and the instance URL policy."""

from __future__ import annotations

import pickle

import pytest

from sfrtr import InstanceUrlPolicy, Intent, InvalidTokenResponse, Secret, Status, TokenRecord
from sfrtr.errors import StoreError
from sfrtr.records import Versioned


def test_secret_never_shows_its_value():
    s = Secret("00D!super-secret")
    for shown in (repr(s), str(s), f"{s}", f"{s!r}", f"{s}", str([s]), str({"k": s})):
        assert "super-secret" not in shown
        assert s.fingerprint in shown
    assert s.reveal() == "00D!super-secret"
    assert s == Secret("00D!super-secret")
    assert s != Secret("other")
    with pytest.raises(TypeError):
        pickle.dumps(s)
    with pytest.raises(TypeError):
        Secret("")


RECORD = TokenRecord(access_token=Secret("at-value"), refresh_token=Secret("rt-value"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0, expires_at=2.0,
                     intent=Intent("w", "fp", 3.0, lease=9))


def test_record_repr_has_fingerprints_only():
    for shown in (repr(RECORD), str(RECORD), str([RECORD])):
        assert "at-value" not in shown
        assert "rt-value" not in shown
        assert RECORD.access_token.fingerprint in shown


def test_record_round_trips_through_dict():
    assert TokenRecord.from_dict(RECORD.to_dict()) == RECORD
    dead = RECORD.replace(status=Status.REAUTH_REQUIRED, intent=None, reason="why")
    assert TokenRecord.from_dict(dead.to_dict()) == dead


@pytest.mark.parametrize("broken", [
    None, [], {}, {**RECORD.to_dict(), "status": "zombie"},
    {**RECORD.to_dict(), "generation": "many"}, {**RECORD.to_dict(), "access_token": 5},
    {**RECORD.to_dict(), "intent": {"worker": 1}},
])
def test_malformed_stored_record_is_a_store_error(broken):
    with pytest.raises(StoreError) as info:
        TokenRecord.from_dict(broken)
    assert "at-value" not in str(info.value)


@pytest.mark.parametrize("url", [
    "https://acme.my.salesforce.com", "https://na1.salesforce.com/",
    "https://acme--dev.sandbox.my.salesforce.com", "https://x.force.com",
])
def test_salesforce_instance_urls_are_accepted(url):
    assert InstanceUrlPolicy().validate(url) == url.rstrip("/")


@pytest.mark.parametrize("url", [
    "http://acme.my.salesforce.com", "https://evil.example", "https://salesforce.com.evil.example",
    "https://evilsalesforce.com", "https://user:pw@acme.my.salesforce.com",
    "https://acme.my.salesforce.com/path", "https://acme.my.salesforce.com?x=1",
    "http://127.0.0.1:8080", "", None, 42, "https://[::1", "ftp://x.salesforce.com",
])
def test_other_instance_urls_are_refused(url):
    with pytest.raises(InvalidTokenResponse):
        InstanceUrlPolicy().validate(url)


def test_emulator_policy_admits_loopback_http_only():
    policy = InstanceUrlPolicy.for_emulator()
    assert policy.validate("http://127.0.0.1:8765") == "http://127.0.0.1:8765"
    assert policy.validate("http://localhost:1") == "http://localhost:1"
    with pytest.raises(InvalidTokenResponse):
        policy.validate("http://10.0.0.1:8765")
    with pytest.raises(InvalidTokenResponse):
        policy.validate("https://acme.my.salesforce.com")


# --- What stores keep: every field, the defaults, the checks (issue 19) ------------------

FULL = TokenRecord(
    access_token=Secret("at-full"), refresh_token=Secret("rt-full"),
    instance_url="https://x.my.salesforce.com", issued_at=10.5, expires_at=7210.5,
    generation=4, status=Status.REFRESHING,
    identity_url="https://login.salesforce.com/id/00D/005", scope="api refresh_token",
    intent=Intent("worker-1", "fp-1", 11.25, lease=77, id="nonce-1", limit=12.5),
    reason="why not", grant_id="grant-1", refresh_after=99.5, backoff=30.0)


def test_every_field_survives_a_round_trip_through_a_store():
    """A record a store wrote and read back is the record: the identity URL and scope
    included (callers read them to find the user and what the grant allows)."""
    data = FULL.to_dict()
    back = TokenRecord.from_dict(data)
    assert back == FULL
    assert (back.identity_url, back.scope) == (FULL.identity_url, FULL.scope)
    assert data == {
        "access_token": "at-full", "refresh_token": "rt-full",
        "instance_url": "https://x.my.salesforce.com", "issued_at": 10.5,
        "expires_at": 7210.5, "generation": 4, "status": "refreshing",
        "identity_url": "https://login.salesforce.com/id/00D/005",
        "scope": "api refresh_token", "reason": "why not", "grant_id": "grant-1",
        "refresh_after": 99.5, "backoff": 30.0,
        "intent": {"worker": "worker-1", "refresh_fingerprint": "fp-1", "started_at": 11.25,
                   "lease": 77, "id": "nonce-1", "limit": 12.5}}
    assert "intent" not in FULL.replace(intent=None).to_dict()


def test_the_stored_status_values_are_stable():
    """Stores keep the status as text; other writers and older versions read it."""
    assert [s.value for s in Status] == [
        "valid", "refreshing", "indeterminate", "reauth_required", "suspended"]
    for status in Status:
        assert TokenRecord.from_dict(FULL.replace(status=status).to_dict()).status is status


def test_a_record_written_without_optional_fields_reads_with_their_defaults():
    """Records from older versions, or other writers, carry only the required keys."""
    minimal = {"access_token": "a", "refresh_token": "r", "instance_url": "https://x",
               "issued_at": 1, "expires_at": "2.5", "generation": "3", "status": "valid"}
    record = TokenRecord.from_dict(minimal)
    assert record == TokenRecord(access_token=Secret("a"), refresh_token=Secret("r"),
                                 instance_url="https://x", issued_at=1.0, expires_at=2.5,
                                 generation=3)
    assert (record.identity_url, record.scope, record.reason, record.grant_id) == ("",) * 4
    assert (record.refresh_after, record.backoff, record.intent) == (0.0, 0.0, None)
    assert record.status is Status.VALID
    with_intent = TokenRecord.from_dict(
        {**minimal, "intent": {"worker": "w", "refresh_fingerprint": "f", "started_at": "4"}})
    assert with_intent.intent == Intent("w", "f", 4.0)
    assert with_intent.intent is not None
    assert (with_intent.intent.lease, with_intent.intent.id, with_intent.intent.limit) \
        == (0, "", 0.0)


def test_defaults_of_a_new_record_and_intent():
    record = TokenRecord(access_token=Secret("a"), refresh_token=Secret("r"),
                         instance_url="https://x", issued_at=1.0, expires_at=2.0)
    assert record.to_dict() == {
        "access_token": "a", "refresh_token": "r", "instance_url": "https://x",
        "issued_at": 1.0, "expires_at": 2.0, "generation": 0, "status": "valid",
        "identity_url": "", "scope": "", "reason": "", "grant_id": "",
        "refresh_after": 0.0, "backoff": 0.0}
    intent = Intent("w", "f", 1.0)
    assert (intent.lease, intent.id, intent.limit) == (0, "", 0.0)


@pytest.mark.parametrize(("key", "value"), [
    ("instance_url", 5), ("identity_url", 5), ("scope", ["api"]), ("reason", None),
    ("grant_id", 7), ("issued_at", "soon"), ("expires_at", None), ("generation", None),
    ("refresh_after", "later"), ("backoff", []), ("refresh_token", None),
])
def test_a_field_of_the_wrong_type_is_a_store_error(key, value):
    with pytest.raises(StoreError, match="malformed token record"):
        TokenRecord.from_dict({**FULL.to_dict(), key: value})


@pytest.mark.parametrize(("key", "value"), [
    ("worker", 1), ("refresh_fingerprint", None), ("started_at", "x"), ("lease", "x"),
    ("id", 3), ("limit", "x"),
])
def test_an_intent_field_of_the_wrong_type_is_a_store_error(key, value):
    data = FULL.to_dict()
    with pytest.raises(StoreError, match="malformed token record"):
        TokenRecord.from_dict({**data, "intent": {**data["intent"], key: value}})


@pytest.mark.parametrize("missing", ["access_token", "refresh_token", "instance_url",
                                     "issued_at", "expires_at", "generation", "status"])
def test_a_record_missing_a_required_field_is_a_store_error(missing):
    data = FULL.to_dict()
    del data[missing]
    with pytest.raises(StoreError, match=r"malformed token record in store \(KeyError\)"):
        TokenRecord.from_dict(data)


@pytest.mark.parametrize(("broken", "cause"), [
    ({**RECORD.to_dict(), "intent": []}, "TypeError"),
    ({**RECORD.to_dict(), "intent": "w"}, "TypeError"),
    ({**RECORD.to_dict(), "status": "zombie"}, "ValueError"),
    ("not a mapping", "AttributeError"),
])
def test_a_store_error_names_the_kind_of_damage(broken, cause):
    with pytest.raises(StoreError, match=rf"\({cause}\)") as info:
        TokenRecord.from_dict(broken)
    assert info.value.__cause__ is None  # the original (it may quote a token) is dropped


def test_a_versioned_read_stamps_with_its_version_unless_told():
    assert Versioned(RECORD, 7).stamp == 7
    assert Versioned(RECORD, 7, stamp=9).stamp == 9
    state = Versioned(RECORD, 7)
    assert (state.locked, state.rescued) == (False, False)


def test_replace_changes_only_what_it_names():
    changed = FULL.replace(reason="other", generation=5)
    assert changed.to_dict() == {**FULL.to_dict(), "reason": "other", "generation": 5}
    assert FULL.reason == "why not"


def test_an_intent_is_written_with_every_field_and_read_back_equal():
    """``to_dict`` spells the intent's fields out (``dataclasses.asdict`` cost 30 times
    as much on every acquire): a field added to ``Intent`` must be added there too."""
    import dataclasses

    intent = Intent("w1", "fp", 12.5, lease=7, id="i-1", limit=13.25)
    fields = {f.name for f in dataclasses.fields(Intent)}
    written = RECORD.replace(status=Status.REFRESHING, intent=intent).to_dict()
    assert set(written["intent"]) == fields
    assert TokenRecord.from_dict(written).intent == intent
