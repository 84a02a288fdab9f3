"""Signed, expiring OAuth ``state`` values, bound to a customer and a redirect URI.

The state travels through the browser and Salesforce; it carries no secret,
only what the callback must check, under an HMAC the server alone can make.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import orjson

from sfrtr.errors import SfrtrError
from sfrtr.secret import Secret


class InvalidState(SfrtrError):
    """The ``state`` is forged, expired, replayed or for another redirect."""


@dataclass(frozen=True, slots=True)
class State:
    customer: str
    redirect_uri: str
    nonce: str
    expires_at: float
    login_host: str = ""
    """The login host the flow started at (a sandbox, a My Domain): the code is
    exchanged there. Empty: the app's own."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StateSigner:
    """Makes and checks ``state`` values. :meth:`verify` also refuses a second use in
    this process; :meth:`check` leaves replay protection to the caller (the aiohttp
    integration claims the nonce in the shared store, so every worker refuses it)."""

    def __init__(self, key: Secret, ttl: float = 600.0) -> None:
        if len(key.reveal()) < 16:
            raise ValueError("the state key needs at least 16 characters")
        self._key = key.reveal().encode()
        self.ttl = ttl
        self._used: dict[str, float] = {}

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def sign(self, customer: str, redirect_uri: str,
             login_host: str = "") -> tuple[str, State]:
        state = State(customer, redirect_uri, secrets.token_urlsafe(16), time.time() + self.ttl,
                      login_host)
        fields: list[object] = [state.customer, state.redirect_uri, state.nonce,
                                state.expires_at]
        if login_host:
            fields.append(login_host)
        payload = orjson.dumps(fields)
        return f"{_b64(payload)}.{_b64(self._mac(payload))}", state

    def mac(self, text: str) -> str:
        """An HMAC of arbitrary text (binds the PKCE cookie to the state's nonce)."""
        return _b64(self._mac(text.encode()))

    def mac_matches(self, text: str, mac: str) -> bool:
        """Whether ``mac`` is :meth:`mac` of ``text`` (compared in constant time)."""
        return hmac.compare_digest(mac.encode(), self.mac(text).encode())

    def verify(self, token: str, redirect_uri: str) -> State:
        """The state, once: a second verification of the same state is refused."""
        state = self.check(token, redirect_uri)
        if not self.claim_locally(state.nonce, state.expires_at):
            raise InvalidState("state already used")
        return state

    def claim_locally(self, nonce: str, expires_at: float) -> bool:
        """Remember ``nonce`` until ``expires_at`` in this process; False if it was."""
        self._forget_expired(time.time())
        if nonce in self._used:
            return False
        self._used[nonce] = expires_at
        return True

    def check(self, token: str, redirect_uri: str) -> State:
        """The state if its signature, expiry and redirect URI hold (replay not checked)."""
        try:
            payload_part, mac_part = token.split(".")
            payload = _unb64(payload_part)
            mac = _unb64(mac_part)
        except ValueError:
            raise InvalidState("malformed state") from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise InvalidState("state signature does not verify")
        try:
            # Four fields, or five with a login host (states signed before hosts were
            # recorded still verify).
            customer, bound_uri, nonce, expires_at, *rest = orjson.loads(payload)
            login_host = rest[0] if len(rest) == 1 else "" if not rest else None
        except (orjson.JSONDecodeError, ValueError, TypeError):
            raise InvalidState("malformed state") from None
        now = time.time()
        if not isinstance(expires_at, int | float) or now > expires_at:
            raise InvalidState("state expired")
        if bound_uri != redirect_uri:
            raise InvalidState("state was issued for another redirect URI")
        if not isinstance(customer, str) or not isinstance(nonce, str) or \
                not isinstance(login_host, str):
            raise InvalidState("malformed state")
        return State(customer, bound_uri, nonce, float(expires_at), login_host)

    def _forget_expired(self, now: float) -> None:
        if len(self._used) > 1000:
            self._used = {n: t for n, t in self._used.items() if t > now}
