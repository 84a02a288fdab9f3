"""Signed OAuth states: bound to customer, redirect URI and login host, expiring."""

from __future__ import annotations

import base64

import orjson
import pytest

from sfrtr import InvalidState, Secret
from sfrtr.oauth_state import StateSigner

KEY = Secret("a-state-key-long-enough")
CALLBACK = "https://app.example/callback"


def test_a_state_carries_its_login_host_under_the_signature():
    signer = StateSigner(KEY)
    token, state = signer.sign("acme", CALLBACK, "https://test.salesforce.com")
    checked = signer.check(token, CALLBACK)
    assert checked == state
    assert checked.login_host == "https://test.salesforce.com"
    # Another host in the payload breaks the signature: the browser cannot pick one.
    payload, mac = token.split(".")
    fields = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields[4] = "https://evil.example"
    forged = base64.urlsafe_b64encode(orjson.dumps(fields)).rstrip(b"=").decode()
    with pytest.raises(InvalidState, match="signature"):
        signer.check(f"{forged}.{mac}", CALLBACK)


def test_states_without_a_host_still_verify():
    signer = StateSigner(KEY)
    token, _ = signer.sign("acme", CALLBACK)
    assert signer.check(token, CALLBACK).login_host == ""
    assert len(orjson.loads(base64.urlsafe_b64decode(
        token.split(".")[0] + "=" * (-len(token.split(".")[0]) % 4)))) == 4
    with pytest.raises(InvalidState, match="another redirect"):
        signer.check(token, "https://app.example/other")
