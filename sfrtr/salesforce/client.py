"""``sfrtr.Client``: one customer's Salesforce REST API, refresh-transparent.

Cheap to create (thousands per process): it holds a customer name and
shares the token manager and its HTTP session. On ``401 INVALID_SESSION_ID``
it asks the manager for a token newer than the one that failed and retries
the request once, so a session that expires mid-iteration goes unnoticed.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

from sfrtr.manager import Credentials, TokenManager
from sfrtr.salesforce.errors import InvalidResponse, SalesforceError, ServerUnavailable, error_from

DEFAULT_API_VERSION = "67.0"
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_LIMIT_INFO = re.compile(r"api-usage=(\d+)/(\d+)")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LimitInfo:
    """The org's API usage, from the last ``Sforce-Limit-Info`` header."""

    used: int
    limit: int

    @property
    def remaining(self) -> int:
        return self.limit - self.used


@dataclass(frozen=True, slots=True)
class QueryResult:
    records: list[dict[str, Any]]
    total_size: int
    done: bool
    next_records_url: str | None = None


@dataclass(frozen=True, slots=True)
class UpsertResult:
    id: str
    created: bool


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: Any = None


@dataclass
class RetryPolicy:
    """Backoff with full jitter for idempotent calls on 503 and connection errors."""

    attempts: int = 3
    base: float = 0.2
    cap: float = 5.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        return self.rng.uniform(0, min(self.cap, self.base * 2 ** attempt))


def _name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"invalid {kind} name {value!r}")
    return value


class Client:
    """The REST API of one customer's org."""

    def __init__(self, customer: str, manager: TokenManager, *,
                 session: aiohttp.ClientSession | None = None,
                 api_version: str = DEFAULT_API_VERSION, timeout: float = 30.0,
                 retry: RetryPolicy | None = None) -> None:
        if not re.fullmatch(r"\d+\.0", api_version):
            raise ValueError("api_version looks like '67.0'")
        self.customer = customer
        self.manager = manager
        self._session = session
        self.api_version = api_version
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.limit_info: LimitInfo | None = None

    def __repr__(self) -> str:
        return f"Client(customer={self.customer!r}, api_version={self.api_version!r})"

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session if self._session is not None else self.manager.oauth.session

    @property
    def base_path(self) -> str:
        return f"/services/data/v{self.api_version}"

    # -- the one request path ------------------------------------------------

    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                      json: Any = None, headers: dict[str, str] | None = None,
                      timeout: float | None = None) -> Response:
        """Call ``path`` (``/services/...``, or relative to ``/services/data/vNN.0/``).

        Raises :class:`~sfrtr.SalesforceError` (or a subclass) for error answers.
        """
        method = method.upper()
        path = self._path(path)
        body = orjson.dumps(json) if json is not None else None
        attempt = 0
        while True:
            try:
                return await self._authorized(method, path, params, body, headers or {},
                                              timeout or self.timeout)
            except (ServerUnavailable, aiohttp.ClientConnectionError, TimeoutError) as exc:
                attempt += 1
                if method not in _IDEMPOTENT or attempt >= self.retry.attempts:
                    if isinstance(exc, SalesforceError):
                        raise
                    raise ServerUnavailable(0, "CONNECTION_ERROR",
                                            f"{type(exc).__name__} talking to Salesforce"
                                            ) from None
                await asyncio.sleep(self.retry.delay(attempt))

    def _path(self, path: str) -> str:
        split = urlsplit(path)
        if split.scheme or split.netloc:
            raise ValueError("pass a path, not a URL: tokens only go to the instance URL")
        if path.startswith("/services/"):
            return path
        return f"{self.base_path}/{path.lstrip('/')}"

    async def _authorized(self, method: str, path: str, params: dict[str, str] | None,
                          body: bytes | None, headers: dict[str, str],
                          timeout: float) -> Response:
        creds = await self.manager.credentials(self.customer)
        status, answer_headers, raw = await self._send(creds, method, path, params, body,
                                                       headers, timeout)
        if status == 401:
            creds = await self.manager.refresh(self.customer, stale=creds.access_token)
            status, answer_headers, raw = await self._send(creds, method, path, params, body,
                                                           headers, timeout)
            if status == 401:
                # A session newer than the one that failed is refused too: no refresh
                # cures this, and each one burns a rotation. Stop refreshing for a while.
                refused = self._answer_error(status, raw)
                raise await self.manager.reject_session(
                    self.customer, creds.access_token, f"{refused.error_code}: {refused.message}")
        return self._answer(status, answer_headers, raw)

    @staticmethod
    def _answer_error(status: int, raw: bytes) -> SalesforceError:
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        return error_from(status, body)

    async def _send(self, creds: Credentials, method: str, path: str,
                    params: dict[str, str] | None, body: bytes | None,
                    headers: dict[str, str], timeout: float
                    ) -> tuple[int, dict[str, str], bytes]:
        all_headers = {"Authorization": f"Bearer {creds.access_token}",
                       "Accept": "application/json", **headers}
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        options = self.manager.oauth.config.request_options(creds.instance_url)
        all_headers.update(options.pop("headers", {}))
        async with self.session.request(
                method, creds.instance_url + path, params=params, data=body,
                headers=all_headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout), **options) as resp:
            raw = await resp.content.read(MAX_BODY + 1)
            while len(raw) <= MAX_BODY and (more := await resp.content.read(MAX_BODY)):
                raw += more
            if len(raw) > MAX_BODY:
                raise InvalidResponse(resp.status, "INVALID_RESPONSE", "answer too large")
            limit = _LIMIT_INFO.search(resp.headers.get("Sforce-Limit-Info", ""))
            if limit:
                self.limit_info = LimitInfo(int(limit.group(1)), int(limit.group(2)))
            return resp.status, dict(resp.headers), raw

    def _answer(self, status: int, headers: dict[str, str], raw: bytes) -> Response:
        if 300 <= status < 400:
            raise InvalidResponse(status, "INVALID_RESPONSE",
                                  "Salesforce answered with a redirect; not followed")
        body: Any = None
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                if status < 400:
                    raise InvalidResponse(status, "INVALID_RESPONSE",
                                          "answer is not JSON") from None
                body = None
        if status >= 400:
            raise error_from(status, body)
        return Response(status, headers, body)

    # -- queries --------------------------------------------------------------

    async def query(self, soql: str) -> QueryResult:
        return _page(await self.request("GET", "query", params={"q": soql}))

    async def query_all(self, soql: str) -> QueryResult:
        """Like :meth:`query`, including deleted and archived records."""
        return _page(await self.request("GET", "queryAll", params={"q": soql}))

    async def query_more(self, next_records_url: str) -> QueryResult:
        if not next_records_url.startswith("/services/data/"):
            raise ValueError("next_records_url is the path Salesforce returned")
        return _page(await self.request("GET", next_records_url))

    async def iter_query(self, soql: str, *, include_deleted: bool = False,
                         batch_size: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every record of the query, across pages, fetched as you iterate."""
        headers = {"Sforce-Query-Options": f"batchSize={batch_size}"} if batch_size else None
        page = _page(await self.request("GET", "queryAll" if include_deleted else "query",
                                        params={"q": soql}, headers=headers))
        while True:
            for record in page.records:
                yield record
            if page.done or page.next_records_url is None:
                return
            page = _page(await self.request("GET", page.next_records_url, headers=headers))

    async def search(self, sosl: str) -> list[dict[str, Any]]:
        body = (await self.request("GET", "search", params={"q": sosl})).body
        records = body.get("searchRecords") if isinstance(body, dict) else body
        if not isinstance(records, list):
            raise InvalidResponse(200, "INVALID_RESPONSE", "search answer has no records")
        return records

    # -- sObjects ------------------------------------------------------------

    async def create(self, sobject: str, fields: dict[str, Any]) -> str:
        body = (await self.request("POST", f"sobjects/{_name('sObject', sobject)}",
                                   json=fields)).body
        return _str(body, "id")

    async def get(self, sobject: str, record_id: str,
                  fields: list[str] | None = None) -> dict[str, Any]:
        params = {"fields": ",".join(_name("field", f) for f in fields)} if fields else None
        return _object((await self.request(
            "GET", f"sobjects/{_name('sObject', sobject)}/{quote(record_id, safe='')}",
            params=params)).body)

    async def get_by_external_id(self, sobject: str, field_name: str, value: str,
                                 fields: list[str] | None = None) -> dict[str, Any]:
        params = {"fields": ",".join(_name("field", f) for f in fields)} if fields else None
        return _object((await self.request(
            "GET", f"sobjects/{_name('sObject', sobject)}/{_name('field', field_name)}/"
                   f"{quote(value, safe='')}", params=params)).body)

    async def update(self, sobject: str, record_id: str, fields: dict[str, Any]) -> None:
        await self.request("PATCH", f"sobjects/{_name('sObject', sobject)}/"
                                    f"{quote(record_id, safe='')}", json=fields)

    async def delete(self, sobject: str, record_id: str) -> None:
        await self.request("DELETE", f"sobjects/{_name('sObject', sobject)}/"
                                     f"{quote(record_id, safe='')}")

    async def upsert(self, sobject: str, field_name: str, value: str,
                     fields: dict[str, Any]) -> UpsertResult:
        response = await self.request(
            "PATCH", f"sobjects/{_name('sObject', sobject)}/{_name('field', field_name)}/"
                     f"{quote(value, safe='')}", json=fields)
        if response.status == 204:  # API versions before 46.0 answer updates with no body
            return UpsertResult(id="", created=False)
        body = _object(response.body)
        created = body.get("created", response.status == 201)
        return UpsertResult(id=_str(body, "id"), created=bool(created))

    async def describe(self, sobject: str) -> dict[str, Any]:
        return _object((await self.request(
            "GET", f"sobjects/{_name('sObject', sobject)}/describe")).body)

    async def describe_global(self) -> dict[str, Any]:
        return _object((await self.request("GET", "sobjects")).body)

    async def limits(self) -> dict[str, Any]:
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


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidResponse(200, "INVALID_RESPONSE", "expected a JSON object")
    return body


def _str(body: Any, key: str) -> str:
    value = _object(body).get(key)
    if not isinstance(value, str):
        raise InvalidResponse(200, "INVALID_RESPONSE", f"answer has no string {key!r}")
    return value


def _page(response: Response) -> QueryResult:
    body = _object(response.body)
    records, total, done = body.get("records"), body.get("totalSize"), body.get("done")
    next_url = body.get("nextRecordsUrl")
    if not isinstance(records, list) or not isinstance(total, int) or \
            not isinstance(done, bool) or (next_url is not None and not isinstance(next_url, str)):
        raise InvalidResponse(response.status, "INVALID_RESPONSE", "not a query result")
    return QueryResult(records, total, done, next_url)
