"""The OAuth web flow in a real headless Chromium.

Two processes of ``examples/aiohttp_app.py`` share a SQLite store behind a small
load balancer (in this process) that sends callbacks to the workers in turn;
the emulator plays Salesforce; another origin plays an attacker's site. Each
test saves screenshots under its ``tmp_path`` and asserts on the pages' text.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from sfrtr.emulator import Emulator
from tests.webdriver import Browser, _free_port, spawn

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length",
              "content-encoding", "host"}


@dataclass
class Balancer:
    """A reverse proxy in front of the workers: callbacks go to each worker in turn
    (a replay lands on another worker), everything else to the first."""

    workers: list[str]
    port: int = field(default_factory=_free_port)
    callbacks: list[tuple[str, str, str]] = field(default_factory=list)
    """(worker, path and query, Cookie header) of each callback proxied."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        worker = self.workers[0]
        if request.path == "/salesforce/callback":
            worker = self.workers[len(self.callbacks) % len(self.workers)]
            self.callbacks.append((worker, request.path_qs, request.headers.get("Cookie", "")))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = request.host  # the workers see the public origin
        async with aiohttp.ClientSession() as http, http.request(
                request.method, worker + request.path_qs, headers=headers,
                data=await request.read(), allow_redirects=False) as answer:
            body = await answer.read()
            response = web.Response(status=answer.status, body=body)
            for name, value in answer.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            return response


@dataclass
class Site:
    balancer: Balancer
    emulator: Emulator
    attacker: str


async def _serve(app: web.Application, port: int, host: str = "127.0.0.1") -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def _wait_up(url: str, process: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            assert process.poll() is None, "the example app exited at start"
            try:
                async with http.get(url, allow_redirects=False) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered")


def _attacker_app(target: str) -> web.Application:
    async def page(request: web.Request) -> web.Response:
        # A page on another site that posts to the app as soon as it loads: the
        # classic cross-site request forgery of a state-changing action.
        return web.Response(content_type="text/html", text=(
            "<h1>You won a prize</h1>"
            f'<form id="f" method="post" action="{target}/salesforce/disconnect?customer=acme">'
            '<input type="hidden" name="csrf_token" value="guessed"></form>'
            "<script>document.getElementById('f').submit()</script>"))

    app = web.Application()
    app.router.add_get("/", page)
    return app


@pytest.fixture(scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    emulator = Emulator(rng_seed=1)
    async with emulator.serve() as emulator_url:
        for customer, names in (("acme", ["Acme", "Globex", "Initech"]),
                                ("globex", ["Hooli"]), ("initech", ["Umbrella", "Wayne"])):
            emulator.seed(customer, "Account", [{"Name": n} for n in names])
        shared = tmp_path_factory.mktemp("browser") / "tokens.db"
        ports = [_free_port(), _free_port()]
        balancer = Balancer([f"http://127.0.0.1:{p}" for p in ports])
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        workers = [spawn(
            [sys.executable, str(ROOT / "examples" / "aiohttp_app.py"), "--port", str(port),
             "--emulator", str(emulator_url), "--sqlite", str(shared),
             "--redirect-uri", f"{balancer.url}/salesforce/callback"], env) for port in ports]
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", balancer.handle)
        front = await _serve(app, balancer.port)
        attacker_port = _free_port()
        attacker = await _serve(_attacker_app(balancer.url), attacker_port)
        try:
            for worker, process in zip(balancer.workers, workers, strict=True):
                await _wait_up(worker + "/", process)
            # "localhost" is another site than "127.0.0.1" to the browser.
            yield Site(balancer, emulator, f"http://localhost:{attacker_port}/")
        finally:
            await front.cleanup()
            await attacker.cleanup()
            for process in workers:
                process.terminate()
            for process in workers:
                process.wait(10)


@pytest.fixture(scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Browser]:
    chromium = Browser(tmp_path_factory.mktemp("chromium-profile"))
    await chromium.start()
    yield chromium
    await chromium.close()


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


async def connect(browser: Browser, site: Site, customer: str) -> str:
    """Index page → Connect → the emulator approves → callback → the accounts page."""
    await browser.get(f"{site.balancer.url}/?customer={customer}")
    await browser.wait_for_text(f"sfrtr example: {customer}")
    await browser.click("#connect")

    async def on_accounts() -> bool:
        return urlsplit(await browser.url()).path == "/accounts"

    await eventually(on_accounts, "the accounts page after the callback")
    return await browser.wait_for_text(" accounts\n")


async def test_connect_authorize_callback_query(browser: Browser, site: Site, tmp_path: Path):
    text = await connect(browser, site, "initech")
    await browser.screenshot(tmp_path / "accounts.png")
    assert "2 accounts" in text
    assert "Umbrella" in text
    assert urlsplit(await browser.url()).path == "/accounts"
    assert (tmp_path / "accounts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert site.emulator.ledger["code_exchanges"] >= 1


async def test_a_forged_state_is_refused(browser: Browser, site: Site, tmp_path: Path):
    await browser.get(f"{site.balancer.url}/salesforce/callback?code=aPrX&state=forged.xx")
    text = await browser.wait_for_text("Invalid authorization state")
    await browser.screenshot(tmp_path / "forged.png")
    assert "malformed state" in text or "does not verify" in text


async def test_a_callback_replayed_to_another_worker_is_refused(browser: Browser, site: Site,
                                                                tmp_path: Path):
    exchanges = site.emulator.ledger["code_exchanges"]
    site.balancer.callbacks.clear()
    text = await connect(browser, site, "globex")  # its callback went to the first worker
    await browser.screenshot(tmp_path / "connected.png")
    assert "1 accounts" in text
    (worker, callback, cookie), = site.balancer.callbacks
    assert worker == site.balancer.workers[0]
    # Replay it from the same browser, with the PKCE cookie the flow used (the app
    # deleted it): the balancer sends it to the second worker, which shares the store.
    name, _, value = next(c for c in cookie.split("; ") if c.startswith("sfrtr_pkce=")
                          ).partition("=")
    await browser.add_cookie({"name": name, "value": value, "path": "/salesforce/callback",
                              "httpOnly": True})
    await browser.get(site.balancer.url + callback)
    text = await browser.wait_for_text("Invalid authorization state")
    await browser.screenshot(tmp_path / "replayed.png")
    assert site.balancer.callbacks[-1][0] == site.balancer.workers[1]
    assert "state already used" in text
    assert site.emulator.ledger["code_exchanges"] == exchanges + 1


async def test_a_cross_site_disconnect_is_refused(browser: Browser, site: Site,
                                                  tmp_path: Path):
    await connect(browser, site, "acme")
    revocations = site.emulator.ledger["revocations"]
    await browser.get(site.attacker)  # its form posts to the app at once
    text = await browser.wait_for_text("Request refused")
    await browser.screenshot(tmp_path / "cross-site.png")
    assert "did not come from this site" in text
    assert site.emulator.ledger["revocations"] == revocations
    await browser.get(f"{site.balancer.url}/accounts?customer=acme")
    assert "3 accounts" in await browser.wait_for_text("accounts")  # still connected
    # The app's own page disconnects (same site, with its CSRF token).
    await browser.get(f"{site.balancer.url}/?customer=acme")
    await browser.wait_for_text("Disconnect acme")
    await browser.click("#disconnect button")

    async def revoked() -> bool:
        return bool(site.emulator.ledger["revocations"] == revocations + 1)

    await eventually(revoked, "the disconnect's revocation")
    await browser.wait_for_text("sfrtr example: acme")
    await browser.screenshot(tmp_path / "disconnected.png")
    assert site.emulator.ledger["revocations"] == revocations + 1
    await browser.get(f"{site.balancer.url}/accounts?customer=acme")
    await browser.wait_for_text("Connect acme")  # not connected: back to the index
