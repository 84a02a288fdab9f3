"""Secrets, records and the instance URL policy."""

from __future__ import annotations

import pickle

import pytest

from sfrtr import InstanceUrlPolicy, Intent, InvalidTokenResponse, Secret, Status, TokenRecord
from sfrtr.errors import StoreError


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
