"""Answer shapes the emulator shares between its OAuth and REST halves."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from sfrtr.emulator.faults import Faults


def json_response(body: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status,
                        content_type="application/json", headers=headers)


def oauth_error(error: str, description: str, status: int = 400) -> web.Response:
    """Salesforce's token-endpoint error shape."""
    return json_response({"error": error, "error_description": description}, status)


def api_error(status: int, code: str, message: str, fields: list[str] | None = None,
              headers: dict[str, str] | None = None) -> web.Response:
    """Salesforce's REST error shape: a JSON array of ``{message, errorCode}``."""
    item: dict[str, Any] = {"message": message, "errorCode": code}
    if fields:
        item["fields"] = fields
    return json_response([item], status, headers)


def drop_connection(request: web.Request) -> web.Response:
    """Close the client's connection without an answer.

    The returned response is never delivered: the transport is gone. aiohttp
    needs a return value all the same.
    """
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=599)


async def drip(request: web.Request, response: web.Response, delay: float) -> web.StreamResponse:
    """Send ``response`` a few bytes at a time, ``delay`` seconds apart."""
    body = response.body
    assert isinstance(body, bytes)
    stream = web.StreamResponse(status=response.status, headers={
        "Content-Type": response.content_type, "Content-Length": str(len(body))})
    await stream.prepare(request)
    for i in range(0, len(body), 16):
        await stream.write(body[i:i + 16])
        await asyncio.sleep(delay)
    await stream.write_eof()
    return stream


async def finish(request: web.Request, response: web.Response,
                 faults: Faults) -> web.StreamResponse:
    """Deliver an answer, dripping it when that fault is on."""
    if faults.drip_delay > 0:
        return await drip(request, response, faults.drip_delay)
    return response
