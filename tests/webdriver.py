"""A headless Chromium for the tests, driven by chromedriver's W3C WebDriver HTTP API
over aiohttp (no selenium). Debian's ``chromium`` and ``chromium-driver`` packages
(``.ci/install-servers`` installs them)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,700"]


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists()
                                       else None)
        if found:
            return found
    raise RuntimeError(f"none of {names} is installed: apt-get install chromium "
                       "chromium-driver (.ci/install-servers does)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A helper process, quiet (started from sync code: it does not block)."""
    return subprocess.Popen(args, env=env if env is not None else dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class WebDriverError(Exception):
    pass


class Browser:
    """One chromedriver and one Chromium session with a fresh profile."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._driver: subprocess.Popen[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None
        self.session = ""

    async def start(self) -> None:
        self._driver = spawn([_binary("chromedriver"), f"--port={self.port}"])
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        deadline = time.monotonic() + 15
        while True:
            try:
                status = await self._call("GET", "/status")
                if status.get("ready"):
                    break
            except (aiohttp.ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise WebDriverError("chromedriver did not start")
            await asyncio.sleep(0.1)
        options = {"binary": _binary("chromium", "chromium-browser"),
                   "args": [*CHROMIUM_ARGS, f"--user-data-dir={self.profile}"]}
        answer = await self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}})
        self.session = answer["sessionId"]

    async def close(self) -> None:
        if self.session:
            with contextlib.suppress(WebDriverError, aiohttp.ClientError, OSError):
                await self._call("DELETE", f"/session/{self.session}")
        if self._http is not None:
            await self._http.close()
        if self._driver is not None:
            self._driver.terminate()
            try:
                self._driver.wait(10)
            except subprocess.TimeoutExpired:
                self._driver.kill()
                self._driver.wait()

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        assert self._http is not None
        async with self._http.request(method, self.base + path, json=body) as r:
            answer = await r.json(content_type=None)
        value = answer.get("value") if isinstance(answer, dict) else None
        if r.status >= 400:
            raise WebDriverError(f"{method} {path}: {r.status} {value}")
        if path == "/session" and isinstance(value, dict):
            return value
        return value

    async def _do(self, method: str, path: str, body: Any = None) -> Any:
        return await self._call(method, f"/session/{self.session}{path}", body)

    async def get(self, url: str) -> None:
        await self._do("POST", "/url", {"url": url})

    async def url(self) -> str:
        return str(await self._do("GET", "/url"))

    async def text(self) -> str:
        return str(await self.script("return document.body ? document.body.innerText : ''"))

    async def script(self, source: str, *args: Any) -> Any:
        return await self._do("POST", "/execute/sync", {"script": source, "args": list(args)})

    async def click(self, css: str) -> None:
        found = await self._do("POST", "/element", {"using": "css selector", "value": css})
        element = next(iter(found.values()))
        await self._do("POST", f"/element/{element}/click", {})

    async def wait_for_text(self, fragment: str, timeout: float = 10.0) -> str:
        """The page's text once it contains ``fragment``."""
        deadline = time.monotonic() + timeout
        while True:
            text = await self.text()
            if fragment in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{fragment!r} never showed; the page says {text!r} "
                                     f"at {await self.url()}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        png = base64.b64decode(await self._do("GET", "/screenshot"))
        await asyncio.to_thread(path.write_bytes, png)

    async def cookies(self) -> list[dict[str, Any]]:
        """Every cookie of the page's site (HttpOnly ones included)."""
        return list(await self._do("GET", "/cookie"))

    async def add_cookie(self, cookie: dict[str, Any]) -> None:
        await self._do("POST", "/cookie", {"cookie": cookie})

    async def clear_cookies(self) -> None:
        await self._do("DELETE", "/cookie")
