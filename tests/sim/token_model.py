"""A model of Salesforce's token endpoint, behind ``OAuthClient._exchange``.

Everything of the real client above the HTTP exchange runs: the concurrency
queue and deadline of ``_post``, the answer classification of ``refresh``,
signature and instance-URL validation, ``introspect``. The model rotates on
every refresh, answers "token request is already being processed" to a
concurrent request with the same refresh token, revokes the family on reuse
(unless a reuse window applies), and can lose an answer after rotating, answer
slowly, answer 5xx, or reset before processing; answer a refresh 2xx the client
must refuse (signed with another secret, or naming an unknown instance); and
refuse every API call of a customer for a while, whatever its token.

A request is processed on the model's own timer: once it has reached the
model, a client that gave up (timeout, pause, kill) does not stop the
rotation, exactly as with a real server.

The :class:`Ledger` records every presentation of every refresh token (by
fingerprint: no token value is ever traced) and answers the state query of
a refresh token: live, rotated, revoked or unknown.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import hmac
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.client_reqrep import ConnectionKey

from sfrtr.oauth.client import OAuthClient, OAuthConfig
from sfrtr.secret import fingerprint

from .clock import EPOCH

BUSY = "token request is already being processed"
EXPIRED = "expired access/refresh token"
INSTANCE_URL = "https://sim0.my.salesforce.com"


@dataclass
class Family:
    """One grant: the chain of refresh tokens of one authorization."""

    family_id: int
    customer: str
    current: str
    rotated: dict[str, float] = field(default_factory=dict)
    """refresh token -> virtual time it was rotated (answered 2xx)."""
    revoked: str = ""
    in_flight: set[str] = field(default_factory=set)


@dataclass
class Presentation:
    at: float
    worker: str
    token: str
    """A fingerprint."""
    verdict: str
    customer: str = ""


@dataclass
class Ledger:
    presentations: list[Presentation] = field(default_factory=list)
    answered: dict[str, float] = field(default_factory=dict)
    """fingerprint -> time its redemption was answered 2xx (rotated)."""
    reuse: list[Presentation] = field(default_factory=list)
    concurrent: list[Presentation] = field(default_factory=list)
    revoked_by_reuse: list[tuple[float, str]] = field(default_factory=list)
    reuse_in_window: int = 0
    redemptions: int = 0


@dataclass
class Faults:
    """The token-endpoint faults in force; probabilities per request at time ``now``."""

    refused: Callable[[float], float] = lambda now: 0.0
    reset_before: Callable[[float], float] = lambda now: 0.0
    error_5xx: Callable[[float], float] = lambda now: 0.0
    error_after: Callable[[float], float] = lambda now: 0.0
    """5xx from a gateway after the rotation happened."""
    drop_after: Callable[[float], float] = lambda now: 0.0
    slow: Callable[[float], float] = lambda now: 0.0
    introspect_error: Callable[[float], float] = lambda now: 0.0
    invalid: Callable[[float], float] = lambda now: 0.0
    """A 2xx refresh answer the client must refuse (bad signature, unknown instance)."""
    reauth_race: Callable[[float], float] = lambda now: 0.0
    """The customer re-authorizes as a refresh of its grant is accepted."""
    pause_rotated: Callable[[float], float] = lambda now: 0.0
    """The presenting worker stops right after its token was rotated."""
    api_refused: Callable[[str, float], bool] = lambda customer, now: False
    """The customer's API calls are refused (401) whatever the token."""


@dataclass
class Hooks:
    """What the world does when the provider reaches a point some faults hang on."""

    sent: Callable[[str, str], None] = lambda worker, refresh_token: None
    """A refresh request left ``worker``'s client (called before it is processed)."""
    accepted: Callable[[str, str], None] = lambda worker, customer: None
    """``reauth_race`` struck: ``customer`` re-authorizes now."""
    rotated: Callable[[str, str], None] = lambda worker, customer: None
    """``pause_rotated`` struck: ``worker``'s token for ``customer`` was just rotated."""


class TokenEndpoint:
    """Salesforce's ``/services/oauth2/{token,introspect,revoke}`` for one connected app."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rng: random.Random,
                 client_secret: str, trace: Callable[[str | None, str], None], *,
                 reuse_window: float = 0.0, session_timeout: float = 7200.0,
                 timeout: float = 5.0) -> None:
        self.loop = loop
        self.rng = rng
        self.secret = client_secret
        self.trace = trace
        self.reuse_window = reuse_window
        self.session_timeout = session_timeout
        self.timeout = timeout
        """The client's deadline: "slow" answers take longer than this."""
        self.faults = Faults()
        self.hooks = Hooks()
        self.ledger = Ledger()
        self.families: list[Family] = []
        self.by_refresh: dict[str, Family] = {}
        self.access: dict[str, tuple[Family, float]] = {}
        self.current: dict[str, Family] = {}
        """customer -> the family of its latest authorization."""
        self._ctx = contextvars.Context()
        self._serial = 0

    # -- tokens ----------------------------------------------------------------

    def _token(self, kind: str) -> str:
        self._serial += 1
        return f"{kind}{self._serial:06d}{self.rng.getrandbits(64):016x}"

    def _answer(self, family: Family, refresh: str | None, forged: str = "") -> bytes:
        """A 2xx body; ``forged``: "signature" (signed with another secret) or
        "instance" (an instance URL the client must not trust)."""
        now = EPOCH + self.loop.time()
        access = self._token("00Dsim!AQ")
        self.access[access] = (family, self.loop.time())
        issued = str(int(now * 1000))
        identity = f"https://login.salesforce.com/id/00Dsim{family.family_id:09d}/005sim"
        secret = "rotated-client-secret" if forged == "signature" else self.secret
        mac = hmac.new(secret.encode(), (identity + issued).encode(), hashlib.sha256)
        instance = "https://sim0.salesforce.example.net" if forged == "instance" else INSTANCE_URL
        body: dict[str, str] = {
            "access_token": access, "signature": base64.b64encode(mac.digest()).decode(),
            "scope": "api refresh_token", "instance_url": instance, "id": identity,
            "token_type": "Bearer", "issued_at": issued}
        if refresh is not None:
            body["refresh_token"] = refresh
        return orjson.dumps(body)

    def authorize(self, customer: str) -> bytes:
        """A new authorization of ``customer``: a new family (what a code exchange returns)."""
        family = Family(len(self.families) + 1, customer, self._token("5Aep"))
        self.families.append(family)
        self.by_refresh[family.current] = family
        self.current[customer] = family
        self.trace(None, f"provider: {customer} authorized, family {family.family_id} "
                         f"refresh {fingerprint(family.current)}")
        return self._answer(family, family.current)

    def state(self, refresh_token: str) -> str:
        """live / rotated / revoked / unknown: the admin query of the ledger."""
        family = self.by_refresh.get(refresh_token)
        if family is None:
            return "unknown"
        if family.revoked:
            return "revoked"
        return "live" if refresh_token == family.current else "rotated"

    def family_of(self, refresh_token: str) -> Family | None:
        return self.by_refresh.get(refresh_token)

    def access_valid(self, access_token: str) -> bool:
        """Whether an API call with this bearer token would be accepted (else a 401)."""
        found = self.access.get(access_token)
        if found is None:
            return False
        family, issued = found
        return not family.revoked and self.loop.time() < issued + self.session_timeout

    def api_valid(self, access_token: str) -> bool:
        """Whether an API call with this bearer token succeeds: a valid token of a
        customer whose calls are not all being refused."""
        found = self.access.get(access_token)
        if found is None or self.faults.api_refused(found[0].customer, self.loop.time()):
            return False
        return self.access_valid(access_token)

    # -- the exchange ------------------------------------------------------------

    async def exchange(self, worker: str, url: str, form: dict[str, str],
                       answered: asyncio.Event) -> tuple[int, bytes]:
        path = urlsplit(url).path
        if form.get("grant_type") == "refresh_token":
            self.hooks.sent(worker, form.get("refresh_token", ""))
        now = self.loop.time()
        f = self.faults
        if self.rng.random() < f.refused(now):
            raise aiohttp.ClientConnectorError(
                ConnectionKey("login.salesforce.com", 443, True, True, None, None, None, None),
                OSError(111, "Connection refused"))
        # The request is written when the exchange starts (the client checks its
        # lease budget with no await before it): from here it travels, and reaches
        # the provider, on the network's timer, not the worker's, so pausing the
        # worker no longer holds it back. (A pause *during a real TCP connect*,
        # before the bytes are written, is a documented limit: docs/protocol.md.)
        delay = 0.01 + self.rng.random() * 0.03  # connect and send
        reset = self.rng.random() < f.reset_before(now + delay)
        error = self.rng.random() < f.error_5xx(now + delay)
        done: asyncio.Future[tuple[int, bytes, str]] = self.loop.create_future()

        def arrive() -> None:
            if done.done():
                return
            if reset:
                done.set_exception(aiohttp.ClientOSError(104, "Connection reset by peer"))
            elif error:
                done.set_result((503, b"<html>Service Unavailable</html>", "5xx"))
            elif path.endswith("/token"):
                self._token_request(worker, form, done)
            elif path.endswith("/introspect"):
                self._introspect(form, done)
            elif path.endswith("/revoke"):
                self._revoke(form, done)
            else:
                done.set_result((404, b"", ""))

        self._later(delay, arrive)
        status, body, after = await done
        if after == "5xx":
            answered.set()
            return status, body
        await asyncio.sleep(0.005 + self.rng.random() * 0.02)  # the answer travels back
        if after == "drop":
            raise aiohttp.ServerDisconnectedError()
        answered.set()
        return status, body

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        self.loop.call_at(self.loop.time() + delay, fn, context=self._ctx)

    @staticmethod
    def _error(status: int, error: str, description: str) -> bytes:
        return orjson.dumps({"error": error, "error_description": description})

    def _token_request(self, worker: str, form: dict[str, str],
                       done: asyncio.Future[tuple[int, bytes, str]]) -> None:
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            done.set_result((200, self.authorize(form.get("code", "")), ""))
            return
        if grant_type != "refresh_token":
            done.set_result((400, self._error(400, "unsupported_grant_type", "grant type not "
                                              "supported"), ""))
            return
        presented = form.get("refresh_token", "")
        fp = fingerprint(presented)
        now = self.loop.time()
        family = self.by_refresh.get(presented)
        ledger = self.ledger

        def verdict(v: str) -> Presentation:
            p = Presentation(now, worker, fp, v, family.customer if family else "")
            ledger.presentations.append(p)
            self.trace(worker, f"provider: refresh {fp} presented -> {v}")
            return p

        def reject(v: str, description: str) -> None:
            verdict(v)
            done.set_result((400, self._error(400, "invalid_grant", description), ""))

        if family is None:
            return reject("unknown", EXPIRED)
        if presented in family.in_flight:
            ledger.concurrent.append(verdict("busy"))
            done.set_result((400, self._error(400, "invalid_grant", BUSY), ""))
            return
        if family.revoked:
            return reject("revoked", EXPIRED)
        reissue = False
        if presented != family.current:
            rotated_at = family.rotated[presented]
            if self.reuse_window > 0 and now - rotated_at <= self.reuse_window:
                ledger.reuse_in_window += 1
                reissue = True
                verdict("reuse-in-window")
            else:
                ledger.reuse.append(verdict("REUSE"))
                family.revoked = "reuse"
                ledger.revoked_by_reuse.append((now, family.customer))
                done.set_result((400, self._error(400, "invalid_grant", EXPIRED), ""))
                return
        else:
            verdict("accepted")
            race = self.faults.reauth_race(now)
            if race and self.rng.random() < race:
                self.trace(None, f"provider: {family.customer} re-authorizes while {fp} "
                                 "is being redeemed")
                self.hooks.accepted(worker, family.customer)
        family.in_flight.add(presented)
        f = self.faults
        slow = self.rng.random() < f.slow(now)
        delay = self.timeout * (1.0 + self.rng.random()) if slow else \
            0.02 + self.rng.random() * 0.2
        drop = self.rng.random() < f.drop_after(now)
        gateway = self.rng.random() < f.error_after(now)
        invalid = f.invalid(now)
        forged = self.rng.choice(["signature", "instance"]) \
            if invalid and self.rng.random() < invalid else ""
        stop = f.pause_rotated(now)
        stop_worker = not reissue and bool(stop) and self.rng.random() < stop

        def finish() -> None:
            family.in_flight.discard(presented)
            if family.revoked:
                _settle(done, (400, self._error(400, "invalid_grant", EXPIRED), ""))
                return
            refresh = family.current
            if not reissue:
                refresh = self._token("5Aep")
                family.rotated[presented] = self.loop.time()
                family.current = refresh
                self.by_refresh[refresh] = family
                ledger.answered[fp] = self.loop.time()
            ledger.redemptions += 1
            self.trace(None, f"provider: {fp} rotated -> {fingerprint(refresh)}"
                             + (" (answer dropped)" if drop else "")
                             + (" (gateway 502)" if gateway else "")
                             + (f" (forged {forged})" if forged else ""))
            body = self._answer(family, refresh, forged)
            if stop_worker:
                self.hooks.rotated(worker, family.customer)
            if gateway:
                _settle(done, (502, b"<html>Bad Gateway</html>", ""))
            else:
                _settle(done, (200, body, "drop" if drop else ""))

        self._later(delay, finish)

    def _introspect(self, form: dict[str, str],
                    done: asyncio.Future[tuple[int, bytes, str]]) -> None:
        now = self.loop.time()
        if self.rng.random() < self.faults.introspect_error(now):
            done.set_result((503, b"", ""))
            return
        value = form.get("token", "")
        access = self.access.get(value)
        if access is not None:
            _, issued = access
            active = self.access_valid(value)
            body: dict[str, object] = {"active": active}
            if active:
                body.update(token_type="access_token",
                            exp=int(EPOCH + issued + self.session_timeout),
                            iat=int(EPOCH + issued))
        else:
            # A token whose redemption is still being processed reads active:
            # Salesforce rotates only when it answers.
            body = {"active": self.state(value) == "live"}
            if body["active"]:
                body["token_type"] = "refresh_token"
        self._later(0.01 + self.rng.random() * 0.05,
                    lambda: _settle(done, (200, orjson.dumps(body), "")))

    def _revoke(self, form: dict[str, str],
                done: asyncio.Future[tuple[int, bytes, str]]) -> None:
        family = self.by_refresh.get(form.get("token", ""))
        if family is None:
            done.set_result((400, self._error(400, "invalid_token", "Token was invalid"), ""))
            return
        family.revoked = family.revoked or "revoked by the customer's disconnect"
        done.set_result((200, b"", ""))


def _settle(done: asyncio.Future[tuple[int, bytes, str]], value: tuple[int, bytes, str]) -> None:
    """Answer a request whose client may have given up (its wait was cancelled)."""
    if not done.done():
        done.set_result(value)


class SimOAuthClient(OAuthClient):
    """The real OAuth client with only its HTTP exchange replaced by the model."""

    def __init__(self, config: OAuthConfig, endpoint: TokenEndpoint, worker: str) -> None:
        super().__init__(config)
        self.endpoint = endpoint
        self.worker = worker
        self.calls = 0

    async def _exchange(self, url: str, form: dict[str, str],
                        answered: asyncio.Event) -> tuple[int, bytes]:
        self.calls += 1
        return await self.endpoint.exchange(self.worker, url, form, answered)

    async def aclose(self) -> None:
        return None
