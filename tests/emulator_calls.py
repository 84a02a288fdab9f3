"""Raw HTTP calls to the emulator, so its tests exercise the wire, not our client."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import orjson

from sfrtr.emulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator


def basic_auth(client_id: str = DEFAULT_CLIENT_ID,
               secret: str = DEFAULT_CLIENT_SECRET) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


async def post_token(http: aiohttp.ClientSession, em: Emulator, **form: str
                     ) -> tuple[int, dict[str, Any]]:
    data = {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET, **form}
    async with http.post(f"{em.base_url}/services/oauth2/token", data=data) as resp:
        return resp.status, await resp.json()


async def refresh(http: aiohttp.ClientSession, em: Emulator, refresh_token: str
                  ) -> tuple[int, dict[str, Any]]:
    return await post_token(http, em, grant_type="refresh_token", refresh_token=refresh_token)


async def api_get(http: aiohttp.ClientSession, em: Emulator, access_token: str, path: str,
                  **kwargs: Any) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {access_token}", **kwargs.pop("headers", {})}
    async with http.get(f"{em.base_url}{path}", headers=headers, **kwargs) as resp:
        body = await resp.json() if resp.content_length != 0 else None
        return resp.status, body, resp.headers


async def api_call(http: aiohttp.ClientSession, em: Emulator, access_token: str, method: str,
                   path: str, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {access_token}"}
    async with http.request(method, f"{em.base_url}{path}", headers=headers,
                            json=body) as resp:
        text = await resp.read()
        return resp.status, orjson.loads(text) if text else None
