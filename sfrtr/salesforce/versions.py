"""API version negotiation: the newest version an instance offers, up to a cap.

``GET /services/data/`` needs no token and lists the versions an instance
serves. The answer is cached per (session, instance URL): one call per
instance however many clients and coroutines ask, coalesced while in flight.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import aiohttp
import orjson

from sfrtr.salesforce.errors import InvalidResponse, ServerUnavailable

_CACHE: weakref.WeakKeyDictionary[aiohttp.ClientSession,
                                  dict[str, asyncio.Future[list[float]]]] = \
    weakref.WeakKeyDictionary()


async def _fetch(session: aiohttp.ClientSession, instance_url: str,
                 options: dict[str, Any]) -> list[float]:
    options = dict(options)
    headers = {"Accept": "application/json", **options.pop("headers", {})}
    try:
        async with session.get(f"{instance_url}/services/data/", headers=headers,
                               allow_redirects=False, timeout=aiohttp.ClientTimeout(total=30),
                               **options) as resp:
            raw = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ServerUnavailable(0, "CONNECTION_ERROR",
                                f"{type(exc).__name__} listing API versions") from None
    if status != 200:
        raise InvalidResponse(status, "INVALID_RESPONSE", "could not list API versions")
    try:
        body = orjson.loads(raw)
        return sorted(float(item["version"]) for item in body)
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        raise InvalidResponse(status, "INVALID_RESPONSE", "not a list of versions") from None


async def offered(session: aiohttp.ClientSession, instance_url: str,
                  options: dict[str, Any] | None = None) -> list[float]:
    """The versions ``instance_url`` serves, ascending (cached; a failure is not)."""
    per_session = _CACHE.setdefault(session, {})
    future = per_session.get(instance_url)
    if future is None:
        future = asyncio.ensure_future(_fetch(session, instance_url, options or {}))
        per_session[instance_url] = future

        def forget_failure(done: asyncio.Future[list[float]]) -> None:
            failed = done.cancelled() or done.exception() is not None
            if failed and per_session.get(instance_url) is done:
                del per_session[instance_url]

        future.add_done_callback(forget_failure)
    # shield: one caller giving up must not cancel the lookup the others wait for
    return await asyncio.shield(future)


async def negotiate(session: aiohttp.ClientSession, instance_url: str, maximum: str,
                    options: dict[str, Any] | None = None) -> str:
    """The highest version ``instance_url`` offers that is at most ``maximum``."""
    cap = float(maximum)
    usable = [v for v in await offered(session, instance_url, options) if v <= cap]
    if not usable:
        raise InvalidResponse(200, "UNSUPPORTED_API_VERSION",
                              f"the instance offers no API version at or below {maximum}")
    return f"{int(max(usable))}.0"
