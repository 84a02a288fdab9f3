"""``sfrtr.Client``: one customer's Salesforce REST API, refresh-transparent.

Cheap to create (thousands per process): it holds a customer name and
shares the token manager and its HTTP session. On ``401 INVALID_SESSION_ID``
it asks the manager for a token newer than the one that failed and retries
the request once, so a session that expires mid-iteration goes unnoticed.

Retries: only idempotent methods (GET, HEAD, PUT, DELETE, OPTIONS) are retried,
on ``503``/``429``, a dropped connection or a timeout, with full-jitter backoff
and never sooner than the answer's ``Retry-After``. ``403
REQUEST_LIMIT_EXCEEDED`` (the org's daily API allowance is spent) is never
retried, and for :attr:`RetryPolicy.limit_cooldown` seconds afterwards calls
for that customer fail at once without being sent, so a fleet of coroutines
does not keep hammering an org that has no calls left.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cached_property
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

from sfrtr.manager import Credentials
from sfrtr.oauth.client import OAuthClient, OAuthConfig
from sfrtr.salesforce.errors import (
    InvalidResponse,
    RequestLimitExceeded,
    SalesforceError,
    ServerUnavailable,
    error_from,
)
from sfrtr.salesforce.limits import (
    MAX_RETRY_AFTER,
    LimitInfo,
    parse_retry_after,
    usage_table,
)
from sfrtr.salesforce.versions import negotiate

if TYPE_CHECKING:
    from sfrtr.salesforce.bulk import Bulk
    from sfrtr.salesforce.collections import Collections

DEFAULT_API_VERSION = "67.0"
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
MAX_BODY = 64 * 1024 * 1024

#: A request body: bytes, or a function returning a fresh async iterable of
#: chunks (called again for each attempt, so a retried upload starts over).
Body = bytes | Callable[[], AsyncIterable[bytes]]


@dataclass(frozen=True, slots=True)
class QueryResult:
    """One page of a SOQL query."""

    records: list[dict[str, Any]]
    total_size: int
    done: bool
    next_records_url: str | None = None


@dataclass(frozen=True, slots=True)
class UpsertResult:
    """What an upsert by external id did: the record's Id, and whether it is new."""

    id: str
    created: bool


@dataclass(frozen=True, slots=True)
class Response:
    """A successful answer: status, headers and the decoded JSON body (or None)."""

    status: int
    headers: dict[str, str]
    body: Any = None


@dataclass
class RetryPolicy:
    """Backoff with full jitter for idempotent calls on 503/429 and connection errors.

    ``limit_cooldown``: after ``REQUEST_LIMIT_EXCEEDED``, seconds during which
    calls for that customer fail locally instead of being sent.
    """

    attempts: int = 3
    base: float = 0.2
    cap: float = 5.0
    rng: random.Random = field(default_factory=random.Random)
    limit_cooldown: float = 30.0

    def delay(self, attempt: int) -> float:
        """The pause before retry number ``attempt`` (1-based)."""
        return self.rng.uniform(0, min(self.cap, self.base * 2 ** attempt))


class TokenSource(Protocol):
    """What :class:`Client` needs from whoever holds the tokens.

    :class:`~sfrtr.TokenManager` (refresh tokens, rotated safely) and
    :class:`~sfrtr.ServerTokenSource` (JWT bearer, client credentials) both are.
    """

    @property
    def oauth(self) -> OAuthClient:
        """The HTTP session, proxy and instance URL policy API calls use."""
        ...

    async def credentials(self, customer: str) -> Credentials:
        """A token believed fresh, and its instance URL."""
        ...

    async def refresh(self, customer: str, *, stale: str) -> Credentials:
        """A token other than ``stale``, which Salesforce refused."""
        ...

    async def reject_session(self, customer: str, access_token: str,
                             reason: str) -> Exception:
        """Note that a just-issued token was refused; return the error to raise."""
        ...


def _name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"invalid {kind} name {value!r}")
    return value


def sobject_name(value: str) -> str:
    """``value`` if it is a valid sObject name, else ``ValueError`` (it goes in a path)."""
    return _name("sObject", value)


def field_name(value: str) -> str:
    """``value`` if it is a valid field name, else ``ValueError``."""
    return _name("field", value)


class Client:
    """The REST API of one customer's org.

    ``api_version="auto"`` negotiates the newest version the instance offers,
    up to ``max_api_version`` (one unauthenticated ``GET /services/data/`` per
    instance and session, cached).

    ``async with Client(...) as client:`` is supported for symmetry with the
    rest of the library; the manager and session belong to the caller, so
    leaving the block closes neither.
    """

    def __init__(self, customer: str, manager: TokenSource, *,
                 session: aiohttp.ClientSession | None = None,
                 api_version: str = DEFAULT_API_VERSION, timeout: float = 30.0,
                 retry: RetryPolicy | None = None,
                 max_api_version: str = DEFAULT_API_VERSION) -> None:
        self._negotiate = api_version == "auto"
        if not self._negotiate and not re.fullmatch(r"\d+\.0", api_version):
            raise ValueError("api_version looks like '67.0' (or is 'auto')")
        if not re.fullmatch(r"\d+\.0", max_api_version):
            raise ValueError("max_api_version looks like '67.0'")
        self.customer = customer
        self.manager = manager
        self._session = session
        self._prefix = ""
        self.api_version = max_api_version if self._negotiate else api_version
        self.max_api_version = max_api_version
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._usage = usage_table(manager)
        self._prepared: _Prepared | None = None
        self._negotiated_for: str | None = None

    def __repr__(self) -> str:
        return f"Client(customer={self.customer!r}, api_version={self.api_version!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        return None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP session: the one given, else the manager's OAuth session."""
        return self._session if self._session is not None else self.manager.oauth.session

    @property
    def api_version(self) -> str:
        """The API version calls go to, ``"67.0"`` (negotiated, with ``"auto"``)."""
        return self._api_version

    @api_version.setter
    def api_version(self, value: str) -> None:
        self._api_version = value
        self._prefix = f"/services/data/v{value}/"

    @property
    def base_path(self) -> str:
        """``/services/data/vNN.0`` for this client's API version."""
        return self._prefix[:-1]

    @property
    def limit_info(self) -> LimitInfo | None:
        """The org's API usage from the last answer for this customer (any client)."""
        return self._usage.get(self.customer)

    @cached_property
    def collections(self) -> Collections:
        """sObject Collections: up to 200 records per call, chunked for you."""
        from sfrtr.salesforce.collections import Collections

        return Collections(self)

    @cached_property
    def bulk(self) -> Bulk:
        """Bulk API 2.0: ingest and query jobs, streamed in constant memory."""
        from sfrtr.salesforce.bulk import Bulk

        return Bulk(self)

    # -- the one request path ------------------------------------------------
    #
    # Every call pays this path, so it does no work a raw aiohttp GET would not
    # do unless that work is the point: headers and proxy options are built
    # once per Credentials object (the manager hands out the same one until the
    # token changes), timeouts once per value, the usage header is kept raw and
    # parsed only when someone reads it, and no context manager or Response is
    # made for a query.

    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                      json: Any = None, headers: dict[str, str] | None = None,
                      timeout: float | None = None, data: Body | None = None,
                      content_type: str | None = None,
                      idempotent: bool | None = None) -> Response:
        """Call ``path`` (``/services/...``, or relative to ``/services/data/vNN.0/``).

        Send ``json`` (encoded for you) or raw ``data`` with its
        ``content_type``. The answer is decoded as JSON. Raises
        :class:`~sfrtr.SalesforceError` (or a subclass) for error answers.
        ``idempotent`` overrides the method's default for retries (a PUT that
        appends, like a Bulk upload, passes False).
        """
        method = method.upper()
        if json is not None:
            data, content_type = orjson.dumps(json), "application/json"
        _check_path(path)
        resp, raw = await self._send(method, path, params, data, content_type, headers,
                                     _total_timeout(timeout or self.timeout), idempotent)
        return Response(resp.status, dict(resp.headers), _decoded(resp.status, raw))

    async def _query_page(self, path: str, params: dict[str, str] | None,
                          headers: dict[str, str] | None = None) -> QueryResult:
        """GET a query page at a path we built or checked."""
        resp, raw = await self._send("GET", path, params, None, None, headers,
                                     _total_timeout(self.timeout), None)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidResponse(resp.status, "INVALID_RESPONSE", "answer is not JSON") from None
        return _page(resp.status, body)

    @asynccontextmanager
    async def stream(self, method: str, path: str, *, params: dict[str, str] | None = None,
                     headers: dict[str, str] | None = None, timeout: float | None = None,
                     data: Body | None = None, content_type: str | None = None,
                     idempotent: bool | None = None
                     ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Like :meth:`request`, but yield the open response to read as a stream.

        Error answers are raised before anything is yielded. ``timeout``
        bounds the connection and each read, not the whole body, so a large
        download is not cut short.
        """
        _check_path(path)
        resp, _ = await self._send(method.upper(), path, params, data, content_type, headers,
                                   _stream_timeout(timeout or self.timeout), idempotent,
                                   read=False)
        try:
            yield resp
        finally:
            resp.release()

    async def _send(self, method: str, path: str, params: dict[str, str] | None,
                    data: Body | None, content_type: str | None,
                    headers: dict[str, str] | None, timeout: aiohttp.ClientTimeout,
                    idempotent: bool | None, read: bool = True
                    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """A successful (2xx) answer and its body, read and released (``read``), or
        the open response and ``b""`` (not ``read``: a stream); error answers raise.

        The body is read inside the retries: a connection that drops or times out
        mid-body is a transport fault like any other (retried for idempotent
        calls, else :class:`ServerUnavailable`), never a raw aiohttp exception.

        On ``401`` it asks the manager for a token newer than the refused one
        and sends once more; a second ``401`` is the manager's to judge. The
        retries of :class:`RetryPolicy` wrap both. One coroutine, not one per
        step: each level costs every call a frame on every suspension.
        """
        held = self._usage.held_back(self.customer)
        if held is not None:
            error = RequestLimitExceeded(
                403, "REQUEST_LIMIT_EXCEEDED",
                "the org's daily API limit was exceeded moments ago; not sent (retry after "
                f"{held:.0f} s)")
            error.limit_info = self.limit_info
            raise error
        manager = self.manager
        failures = 0
        while True:
            try:
                creds = await manager.credentials(self.customer)
                if self._negotiate and self._negotiated_for != creds.instance_url:
                    self.api_version = await negotiate(
                        self.session, creds.instance_url, self.max_api_version,
                        manager.oauth.config.request_options(creds.instance_url))
                    self._negotiated_for = creds.instance_url
                url = creds.instance_url + (
                    path if path.startswith("/services/") else self._prefix + path.lstrip("/"))
                refreshed = False
                while True:
                    prepared, all_headers = self._headers(creds, headers, data, content_type)
                    session = self._session if self._session is not None else \
                        manager.oauth.session
                    body = data() if callable(data) else data
                    if prepared.options:  # a proxy
                        resp = await session.request(
                            method, url, params=params, data=body, headers=all_headers,
                            allow_redirects=False, timeout=timeout, **prepared.options)
                    else:  # no empty ** to merge: a quarter of a microsecond a call
                        resp = await session.request(
                            method, url, params=params, data=body, headers=all_headers,
                            allow_redirects=False, timeout=timeout)
                    self._usage.note(self.customer, resp.headers.get("Sforce-Limit-Info"))
                    status = resp.status
                    if status < 300:
                        if not read:
                            return resp, b""
                        try:  # inlined: every call's path is one coroutine shorter
                            length = resp.content_length
                            if length is not None and length <= MAX_BODY:
                                return resp, await resp.read()  # stops at Content-Length
                            return resp, await _read_bounded(resp)
                        finally:
                            resp.release()
                    if status != 401:
                        raise _answer_error(status, resp.headers, await _discard(resp))
                    if refreshed:
                        # A session newer than the one that failed is refused too: no
                        # refresh cures this, and each one burns a rotation. Stop
                        # refreshing for a while.
                        refused = _error(status, await _discard(resp))
                        raise await manager.reject_session(
                            self.customer, creds.access_token,
                            f"{refused.error_code}: {refused.message}")
                    await _discard(resp)
                    creds = await manager.refresh(self.customer, stale=creds.access_token)
                    refreshed = True
            except (ServerUnavailable, aiohttp.ClientConnectionError,
                    aiohttp.ClientPayloadError, TimeoutError) as exc:
                failures += 1
                await asyncio.sleep(self._pause(exc, failures, method, idempotent))
            except RequestLimitExceeded as exc:
                self._usage.exhausted(self.customer, time.monotonic()
                                      + self.retry.limit_cooldown)
                exc.limit_info = self.limit_info
                raise

    def _headers(self, creds: Credentials, headers: dict[str, str] | None, data: Body | None,
                 content_type: str | None) -> tuple[_Prepared, dict[str, str]]:
        """This token's prepared options, and the headers of one request."""
        config = self.manager.oauth.config
        prepared = self._prepared
        if prepared is None or prepared.credentials is not creds or prepared.config is not config:
            prepared = self._prepared = _Prepared(creds, config)
        if not headers and (data is None or not content_type):
            return prepared, prepared.headers  # aiohttp copies it: shared, never changed
        all_headers = {"Authorization": prepared.authorization, "Accept": "application/json",
                       **(headers or {})}
        if data is not None and content_type:
            all_headers["Content-Type"] = content_type
        all_headers.update(prepared.proxy_headers)
        return prepared, all_headers

    def _pause(self, exc: Exception, failures: int, method: str, idempotent: bool | None
               ) -> float:
        """Seconds before the next try after ``exc``, else raise the error to give up with."""
        pause = self.retry.delay(failures)
        asked = exc.retry_after if isinstance(exc, SalesforceError) else None
        if asked is not None:
            pause = max(pause, asked)
        retryable = method in _IDEMPOTENT if idempotent is None else idempotent
        if not retryable or failures >= self.retry.attempts or \
                (asked is not None and asked > MAX_RETRY_AFTER):
            if isinstance(exc, SalesforceError):
                raise exc
            raise ServerUnavailable(0, "CONNECTION_ERROR",
                                    f"{type(exc).__name__} talking to Salesforce") from None
        return pause

    # -- queries --------------------------------------------------------------

    async def query(self, soql: str) -> QueryResult:
        """The first page of a SOQL query (build it with :func:`sfrtr.format_soql`)."""
        return await self._query_page("query", {"q": soql})

    async def query_all(self, soql: str) -> QueryResult:
        """Like :meth:`query`, including deleted and archived records."""
        return await self._query_page("queryAll", {"q": soql})

    async def query_more(self, next_records_url: str) -> QueryResult:
        """The page at ``next_records_url`` (from a previous :class:`QueryResult`)."""
        if not next_records_url.startswith("/services/data/"):
            raise ValueError("next_records_url is the path Salesforce returned")
        _check_path(next_records_url)
        return await self._query_page(next_records_url, None)

    async def iter_query(self, soql: str, *, include_deleted: bool = False,
                         batch_size: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every record of the query, across pages, fetched as you iterate."""
        headers = {"Sforce-Query-Options": f"batchSize={batch_size}"} if batch_size else None
        page = await self._query_page("queryAll" if include_deleted else "query",
                                      {"q": soql}, headers)
        while True:
            for record in page.records:
                yield record
            if page.done or page.next_records_url is None:
                return
            _check_path(page.next_records_url)
            page = await self._query_page(page.next_records_url, None, headers)

    async def search(self, sosl: str) -> list[dict[str, Any]]:
        """The records a SOSL search finds."""
        body = (await self.request("GET", "search", params={"q": sosl})).body
        records = body.get("searchRecords") if isinstance(body, dict) else body
        if not isinstance(records, list):
            raise InvalidResponse(200, "INVALID_RESPONSE", "search answer has no records")
        return records

    # -- sObjects ------------------------------------------------------------

    async def create(self, sobject: str, fields: dict[str, Any]) -> str:
        """Insert one record; returns its Id. Not retried (not idempotent)."""
        body = (await self.request("POST", f"sobjects/{_name('sObject', sobject)}",
                                   json=fields)).body
        return _str(body, "id")

    async def get(self, sobject: str, record_id: str,
                  fields: list[str] | None = None) -> dict[str, Any]:
        """One record by Id (all fields, or ``fields``); :class:`~sfrtr.NotFound` if none."""
        params = {"fields": ",".join(_name("field", f) for f in fields)} if fields else None
        return _object((await self.request(
            "GET", f"sobjects/{_name('sObject', sobject)}/{quote(record_id, safe='')}",
            params=params)).body)

    async def get_by_external_id(self, sobject: str, field_name: str, value: str,
                                 fields: list[str] | None = None) -> dict[str, Any]:
        """One record by the value of an external id field."""
        params = {"fields": ",".join(_name("field", f) for f in fields)} if fields else None
        return _object((await self.request(
            "GET", f"sobjects/{_name('sObject', sobject)}/{_name('field', field_name)}/"
                   f"{quote(value, safe='')}", params=params)).body)

    async def update(self, sobject: str, record_id: str, fields: dict[str, Any]) -> None:
        """Change fields of one record."""
        await self.request("PATCH", f"sobjects/{_name('sObject', sobject)}/"
                                    f"{quote(record_id, safe='')}", json=fields)

    async def delete(self, sobject: str, record_id: str) -> None:
        """Delete one record (to the recycle bin)."""
        await self.request("DELETE", f"sobjects/{_name('sObject', sobject)}/"
                                     f"{quote(record_id, safe='')}")

    async def upsert(self, sobject: str, field_name: str, value: str,
                     fields: dict[str, Any]) -> UpsertResult:
        """Insert or update the record whose external id ``field_name`` is ``value``."""
        response = await self.request(
            "PATCH", f"sobjects/{_name('sObject', sobject)}/{_name('field', field_name)}/"
                     f"{quote(value, safe='')}", json=fields)
        if response.status == 204:  # API versions before 46.0 answer updates with no body
            return UpsertResult(id="", created=False)
        body = _object(response.body)
        created = body.get("created", response.status == 201)
        return UpsertResult(id=_str(body, "id"), created=bool(created))

    async def describe(self, sobject: str) -> dict[str, Any]:
        """The object's metadata: fields, types, URLs."""
        return _object((await self.request(
            "GET", f"sobjects/{_name('sObject', sobject)}/describe")).body)

    async def describe_global(self) -> dict[str, Any]:
        """Every object of the org, briefly."""
        return _object((await self.request("GET", "sobjects")).body)

    async def limits(self) -> dict[str, Any]:
        """The org's limits (``DailyApiRequests`` and the rest)."""
        return _object((await self.request("GET", "limits")).body)

    async def composite(self, subrequests: list[dict[str, Any]], *,
                        all_or_none: bool = False) -> list[dict[str, Any]]:
        """Run up to 25 subrequests in one call; ``@{ref.field}`` references work."""
        body = _object((await self.request("POST", "composite", json={
            "allOrNone": all_or_none, "compositeRequest": subrequests})).body)
        results = body.get("compositeResponse")
        if not isinstance(results, list):
            raise InvalidResponse(200, "INVALID_RESPONSE", "no compositeResponse list")
        return results

    async def composite_tree(self, sobject: str, records: list[dict[str, Any]]
                             ) -> list[dict[str, Any]]:
        """Insert up to 200 records with their children in one call (all or none).

        Each record carries ``attributes: {type, referenceId}``; children go
        under their relationship name as ``{"records": [...]}``. Returns the
        ``results`` list (``referenceId`` and ``id`` of each inserted record).
        """
        body = _object((await self.request(
            "POST", f"composite/tree/{_name('sObject', sobject)}",
            json={"records": records})).body)
        results = body.get("results")
        if not isinstance(results, list):
            raise InvalidResponse(200, "INVALID_RESPONSE", "no results list")
        return results

    async def composite_graph(self, graphs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run several composite graphs (``{graphId, compositeRequest}``) in one call.

        Each graph is all or none on its own. Returns the ``graphs`` list of
        ``{graphId, isSuccessful, graphResponse}``.
        """
        body = _object((await self.request("POST", "composite/graph",
                                           json={"graphs": graphs})).body)
        results = body.get("graphs")
        if not isinstance(results, list):
            raise InvalidResponse(200, "INVALID_RESPONSE", "no graphs list")
        return results

    async def apex(self, method: str, path: str, *, json: Any = None,
                   params: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        """Call an Apex REST endpoint: ``/services/apexrest/<path>``; returns its JSON."""
        split = urlsplit(path)
        if split.scheme or split.netloc or ".." in path.split("/"):
            raise ValueError("pass the Apex REST path, e.g. 'MyService/items'")
        return (await self.request(method, f"/services/apexrest/{path.lstrip('/')}",
                                   json=json, params=params, headers=headers)).body


class _Prepared:
    """Headers and proxy options for one :class:`Credentials` object and config.

    Built when the token (or the config) changes, not per call. It holds the
    bearer token, so its repr says nothing about it.
    """

    __slots__ = ("authorization", "config", "credentials", "headers", "options",
                 "proxy_headers")

    def __init__(self, credentials: Credentials, config: OAuthConfig) -> None:
        self.credentials = credentials
        self.config = config
        self.authorization = f"Bearer {credentials.access_token}"
        options = config.request_options(credentials.instance_url)
        self.proxy_headers: dict[str, str] = options.pop("headers", {})
        self.options: dict[str, Any] = options
        self.headers = {"Authorization": self.authorization, "Accept": "application/json",
                        **self.proxy_headers}

    def __repr__(self) -> str:
        return "<prepared request headers>"


def _check_path(path: str) -> None:
    split = urlsplit(path)
    if split.scheme or split.netloc:
        raise ValueError("pass a path, not a URL: tokens only go to the instance URL")


@functools.lru_cache(maxsize=64)
def _total_timeout(wait: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=wait)


@functools.lru_cache(maxsize=64)
def _stream_timeout(wait: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(sock_connect=wait, sock_read=wait)


def _decoded(status: int, raw: bytes) -> Any:
    """A 2xx answer's JSON body (None when empty)."""
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidResponse(status, "INVALID_RESPONSE", "answer is not JSON") from None


def _error(status: int, raw: bytes) -> SalesforceError:
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = None
    return error_from(status, body)


def _answer_error(status: int, headers: Mapping[str, str], raw: bytes) -> SalesforceError:
    """The error to raise for a 3xx, 4xx or 5xx answer."""
    if status < 400:
        return InvalidResponse(status, "INVALID_RESPONSE",
                               "Salesforce answered with a redirect; not followed")
    error = _error(status, raw)
    if status in (429, 503) and not isinstance(error, ServerUnavailable):
        error = ServerUnavailable(status, error.error_code, error.message)
    error.retry_after = parse_retry_after(headers.get("Retry-After"))
    return error


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    raw = await resp.content.read(MAX_BODY + 1)
    while len(raw) <= MAX_BODY and (more := await resp.content.read(MAX_BODY)):
        raw += more
    if len(raw) > MAX_BODY:
        raise InvalidResponse(resp.status, "INVALID_RESPONSE", "answer too large")
    return raw


async def _discard(resp: aiohttp.ClientResponse) -> bytes:
    """Read an answer we will not stream (an error), then give the connection back."""
    try:
        return await _read_bounded(resp)
    finally:
        resp.release()


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidResponse(200, "INVALID_RESPONSE", "expected a JSON object")
    return body


def _str(body: Any, key: str) -> str:
    value = _object(body).get(key)
    if not isinstance(value, str):
        raise InvalidResponse(200, "INVALID_RESPONSE", f"answer has no string {key!r}")
    return value


def _page(status: int, body: Any) -> QueryResult:
    if isinstance(body, dict):
        records, total, done = body.get("records"), body.get("totalSize"), body.get("done")
        next_url = body.get("nextRecordsUrl")
        if isinstance(records, list) and isinstance(total, int) and isinstance(done, bool) \
                and (next_url is None or isinstance(next_url, str)):
            return QueryResult(records, total, done, next_url)
    raise InvalidResponse(status, "INVALID_RESPONSE", "not a query result")


__all__ = ["DEFAULT_API_VERSION", "Body", "Client", "LimitInfo", "QueryResult", "Response",
           "RetryPolicy", "TokenSource", "UpsertResult", "field_name", "sobject_name"]
