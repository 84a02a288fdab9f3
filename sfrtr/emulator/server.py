"""The emulator object: its Python API, its admin endpoints, its web app."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web

from sfrtr.emulator import bulk_routes, oauth_routes, rest_routes
from sfrtr.emulator.bulk_jobs import BulkJobs
from sfrtr.emulator.faults import FaultBoard
from sfrtr.emulator.ledger import Ledger
from sfrtr.emulator.records import OrgData
from sfrtr.emulator.server_grants import ServerGrants
from sfrtr.emulator.state import ConnectedApp, Org, World, new_org_id, new_user_id
from sfrtr.emulator.token_state import TokenState, TokenStates, normalize_fingerprint
from sfrtr.emulator.wire import api_error, json_response, oauth_error
from sfrtr.secret import fingerprint as fingerprint_of

EMULATOR_KEY: web.AppKey[Emulator] = web.AppKey("sfrtr_emulator")

DEFAULT_CLIENT_ID = "sfrtr-emulator-client"
DEFAULT_CLIENT_SECRET = "sfrtr-emulator-secret"  # a test fixture, not a credential
BUSY_DESCRIPTION = oauth_routes.BUSY


class Emulator:
    """A Salesforce stand-in that punishes refresh-token reuse as Salesforce does.

    Create one, optionally add apps, customers and data, then serve
    :meth:`app` (or use :meth:`serve`). Tests read :attr:`ledger`, switch
    :attr:`faults` and call :meth:`expire_sessions` while it runs.
    """

    def __init__(self, *, session_timeout: float = 7200.0, instance_url: str | None = None,
                 api_limit: int = 15_000, rng_seed: int | None = None,
                 default_customer: str | None = None) -> None:
        self.world = World(session_timeout=session_timeout)
        self.faults = FaultBoard()
        self.ledger = Ledger()
        self.cursors = rest_routes.Cursors()
        self.bulk = BulkJobs()
        """Bulk API 2.0 jobs, and their knobs (upload limit, processing pace)."""
        self.server_grants = ServerGrants()
        """Apps allowed the JWT bearer and client credentials grants."""
        self.rng = random.Random(rng_seed)
        self.instance_url = instance_url
        """Instance URL put in token answers; ``None``: the URL the request came to."""
        self.api_limit = api_limit
        self.default_customer = default_customer
        self.busy_description = BUSY_DESCRIPTION
        self.redirect_uris: dict[str, tuple[str, ...]] = {}
        self.base_url: str | None = None
        """Where :meth:`serve` listens, once it does."""
        self._token_states = TokenStates(self.world)
        self.add_app(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)

    # -- Python API -------------------------------------------------------

    def add_app(self, client_id: str, client_secret: str, *, rotation: bool = True,
                reuse_window: float = 0.0, confidential: bool = True,
                redirect_uris: tuple[str, ...] = ()) -> ConnectedApp:
        """Register a connected app. ``redirect_uris`` empty accepts any callback."""
        app = ConnectedApp(client_id, client_secret, rotation=rotation,
                           reuse_window=reuse_window, confidential=confidential)
        self.world.apps[client_id] = app
        self.redirect_uris[client_id] = tuple(redirect_uris)
        return app

    def ensure_customer(self, name: str) -> Org:
        """The org called ``name``, created on first use."""
        org = self.world.orgs.get(name)
        if org is None:
            org = Org(org_id=new_org_id(), name=name, user_id=new_user_id(), data=OrgData(),
                      api_limit=self.api_limit, username=f"admin@{name}.example")
            self.world.orgs[name] = org
        return org

    def grant(self, customer: str, client_id: str = DEFAULT_CLIENT_ID,
              scope: str = "api refresh_token") -> dict[str, Any]:
        """Authorize ``customer`` for an app without the browser dance.

        Returns the token answer the code exchange would have returned.
        """
        app = self.world.apps[client_id]
        org = self.ensure_customer(customer)
        family = self.world.new_family(app, org, scope)
        access = self.world.issue_access(family, time.time())
        refresh = self.world.issue_refresh(family)
        self.ledger.count("code_exchanges", family.family_id)
        base = self.instance_url or self.base_url or "http://127.0.0.1"
        return self.world.token_answer(family, access, refresh, base)

    def expire_sessions(self, customer: str | None = None) -> int:
        """Expire the live access tokens of one customer (or all). Returns how many."""
        return self.world.expire_sessions(customer)

    def seed(self, customer: str, sobject: str, rows: list[dict[str, Any]]) -> list[str]:
        """Add records to a customer's org; returns their Ids."""
        return self.ensure_customer(customer).data.seed(sobject, rows)

    def family_revoked(self, customer: str) -> bool:
        """Whether any grant of ``customer`` has been revoked."""
        return any(f.revoked for f in self.world.families.values() if f.org.name == customer)

    def refresh_token_state(self, refresh_token: str | None = None, *,
                            fingerprint: str | None = None) -> TokenState:
        """Whether a refresh token is live, rotated, revoked or unknown here.

        Give the token's value or its :func:`sfrtr.secret.fingerprint` (a
        longer SHA-256 hex prefix works too; a malformed one is ``ValueError``).
        Asking never presents the token: its state does not change.
        """
        if (refresh_token is None) == (fingerprint is None):
            raise TypeError("give exactly one of refresh_token and fingerprint")
        if self._token_states.world is not self.world:
            self._token_states = TokenStates(self.world)
        if refresh_token is not None:
            return self._token_states.of_token(refresh_token)
        assert fingerprint is not None
        return self._token_states.of_fingerprint(fingerprint)

    # -- web app ----------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_no_tracebacks], client_max_size=8 * 1024 * 1024)
        app[EMULATOR_KEY] = self
        r = app.router
        r.add_get("/services/oauth2/authorize", oauth_routes.authorize)
        r.add_post("/services/oauth2/token", oauth_routes.token)
        r.add_post("/services/oauth2/introspect", oauth_routes.introspect)
        r.add_post("/services/oauth2/revoke", oauth_routes.revoke)
        r.add_get("/services/oauth2/revoke", oauth_routes.revoke)
        r.add_get("/services/data", rest_routes.versions)
        r.add_get("/services/data/", rest_routes.versions)
        r.add_route("*", "/services/data/{version}/jobs/{tail:.*}", bulk_routes.jobs)
        r.add_route("*", "/services/data/{version}/{tail:.*}", rest_routes.data_api)
        r.add_route("*", "/services/data/{version}", rest_routes.data_api)
        r.add_get("/_emulator/ledger", self._admin_ledger)
        r.add_post("/_emulator/ledger/reset", self._admin_ledger_reset)
        r.add_get("/_emulator/faults", self._admin_faults)
        r.add_post("/_emulator/faults", self._admin_set_faults)
        r.add_delete("/_emulator/faults", self._admin_clear_faults)
        r.add_post("/_emulator/expire", self._admin_expire)
        r.add_post("/_emulator/customers", self._admin_customer)
        r.add_post("/_emulator/seed", self._admin_seed)
        r.add_get("/_emulator/refresh-token-state", self._admin_token_state_query)
        r.add_post("/_emulator/refresh-token-state", self._admin_token_state)
        return app

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve on ``host:port`` (0: a free port) and yield the base URL."""
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        self.base_url = f"http://{host}:{bound}"
        try:
            yield self.base_url
        finally:
            await runner.cleanup()

    # -- admin endpoints ----------------------------------------------------

    async def _admin_ledger(self, request: web.Request) -> web.Response:
        return json_response(self.ledger.snapshot())

    async def _admin_ledger_reset(self, request: web.Request) -> web.Response:
        self.ledger.reset()
        return json_response(self.ledger.snapshot())

    async def _admin_faults(self, request: web.Request) -> web.Response:
        return json_response(self.faults.as_dict())

    async def _admin_set_faults(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        try:
            for endpoint, changes in body.items():
                if not isinstance(changes, dict):
                    raise ValueError(f"faults of {endpoint!r} must be an object")
                self.faults.set(endpoint, **changes)
        except ValueError as exc:
            return api_error(400, "INVALID_FAULT", str(exc))
        return json_response(self.faults.as_dict())

    async def _admin_clear_faults(self, request: web.Request) -> web.Response:
        self.faults.clear()
        return json_response(self.faults.as_dict())

    async def _admin_expire(self, request: web.Request) -> web.Response:
        body = await _json_object(request, allow_empty=True)
        if isinstance(body, web.Response):
            return body
        customer = body.get("customer")
        if customer is not None and not isinstance(customer, str):
            return api_error(400, "INVALID_FIELD", "customer must be a string")
        return json_response({"expired": self.expire_sessions(customer)})

    async def _admin_customer(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        name, client_id = body.get("name"), body.get("client_id", DEFAULT_CLIENT_ID)
        if not isinstance(name, str) or not name or not isinstance(client_id, str):
            return api_error(400, "INVALID_FIELD", "name (a non-empty string) is required")
        if client_id not in self.world.apps:
            return oauth_error("invalid_client_id", "client identifier invalid")
        if self.base_url is None:
            self.base_url = f"{request.scheme}://{request.host}"
        return json_response(self.grant(name, client_id), 201)

    async def _admin_token_state_query(self, request: web.Request) -> web.Response:
        """``GET ?fingerprint=...`` (repeatable): token values never go in a URL."""
        fingerprints = request.query.getall("fingerprint", [])
        if not fingerprints:
            return api_error(400, "INVALID_FIELD", "fingerprint is required")
        return self._token_states_answer(fingerprints, [])

    async def _admin_token_state(self, request: web.Request) -> web.Response:
        """``POST {"refresh_token": v}``, ``{"fingerprint": f}`` or ``{"fingerprints": [...]}``.

        Answers ``{"states": {fingerprint: state}}`` (and ``"state"`` when one
        token was asked about), keyed by fingerprint so no token value is echoed.
        """
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        values: list[str] = []
        fingerprints: list[str] = []
        token, fp, many = body.get("refresh_token"), body.get("fingerprint"), \
            body.get("fingerprints")
        if token is not None:
            values.append(token)
        if fp is not None:
            fingerprints.append(fp)
        if many is not None:
            if not isinstance(many, list):
                return api_error(400, "INVALID_FIELD", "fingerprints must be a list of strings")
            fingerprints += many
        if not values and not fingerprints:
            return api_error(400, "INVALID_FIELD",
                             "refresh_token, fingerprint or fingerprints is required")
        return self._token_states_answer(fingerprints, values)

    def _token_states_answer(self, fingerprints: Sequence[object], values: Sequence[object]
                             ) -> web.Response:
        states: dict[str, str] = {}
        try:
            for value in values:
                if not isinstance(value, str) or not value:
                    raise ValueError("refresh_token must be a non-empty string")
                states[fingerprint_of(value)] = self.refresh_token_state(value).value
            for fp in fingerprints:
                if not isinstance(fp, str):
                    raise ValueError("a fingerprint must be a string")
                states[normalize_fingerprint(fp)] = \
                    self.refresh_token_state(fingerprint=fp).value
        except ValueError as exc:
            return api_error(400, "INVALID_FIELD", str(exc))
        answer: dict[str, object] = {"states": states}
        if len(values) + len(fingerprints) == 1:
            answer["state"] = next(iter(states.values()))
        return json_response(answer)

    async def _admin_seed(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        customer, sobject, rows = body.get("customer"), body.get("sobject"), body.get("records")
        if not isinstance(customer, str) or not isinstance(sobject, str) or \
                not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            return api_error(400, "INVALID_FIELD",
                             "customer, sobject (strings) and records (objects) are required")
        return json_response({"ids": self.seed(customer, sobject, rows)}, 201)


async def _json_object(request: web.Request, *, allow_empty: bool = False
                       ) -> dict[str, Any] | web.Response:
    raw = await request.read()
    if not raw and allow_empty:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return api_error(400, "JSON_PARSER_ERROR", "The request body is not valid JSON.")
    if not isinstance(body, dict):
        return api_error(400, "JSON_PARSER_ERROR", "The request body must be a JSON object.")
    return body


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _no_tracebacks(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn a bug in the emulator into Salesforce's error shape, not a traceback page."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:  # the emulator must answer in Salesforce's shape whatever broke
        request.app.logger.exception("emulator handler failed")
        return api_error(500, "UNKNOWN_EXCEPTION", "An unexpected error occurred.")
