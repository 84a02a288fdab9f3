"""A small aiohttp service on sfrtr, against the built-in emulator.

    python examples/aiohttp_app.py            # then open http://127.0.0.1:8080/

Pages: ``/`` (links), ``/salesforce/connect?customer=acme`` (the OAuth flow; the
emulator approves at once), ``/accounts?customer=acme`` (a query through sfrtr).
"""

from __future__ import annotations

import asyncio
import html

from aiohttp import web

import sfrtr
import sfrtr.aiohttp as sfrtr_aiohttp
from sfrtr.emulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator


async def index(request: web.Request) -> web.Response:
    return web.Response(content_type="text/html", text=(
        "<h1>sfrtr example</h1>"
        '<p><a href="/salesforce/connect?customer=acme&login_hint=acme">Connect acme</a></p>'
        '<p><a href="/accounts?customer=acme">Query acme\'s accounts</a></p>'))


async def accounts(request: web.Request) -> web.Response:
    try:
        salesforce = await sfrtr_aiohttp.client(request)
        page = await salesforce.query("SELECT Id, Name FROM Account ORDER BY Name")
    except sfrtr.NotConnected:
        raise web.HTTPFound("/") from None
    rows = "".join(f"<li>{html.escape(str(r['Name']))}</li>" for r in page.records)
    return web.Response(content_type="text/html",
                        text=f"<h1>{page.total_size} accounts</h1><ul>{rows}</ul>")


def build_app(emulator_url: str) -> web.Application:
    app = web.Application()
    sfrtr_aiohttp.setup(
        app,
        oauth_config=sfrtr.OAuthConfig(
            client_id=DEFAULT_CLIENT_ID, client_secret=sfrtr.Secret(DEFAULT_CLIENT_SECRET),
            login_url=emulator_url, instance_policy=sfrtr.InstanceUrlPolicy.for_emulator()),
        customer_of=lambda request: request.query.get("customer", "acme"),
        state_key=sfrtr.Secret("example-only-state-key-change-me"),
        success_url="/accounts?customer=acme")
    app.router.add_get("/", index)
    app.router.add_get("/accounts", accounts)
    return app


async def main(port: int = 8080) -> None:
    emulator = Emulator()
    async with emulator.serve() as emulator_url:
        emulator.seed("acme", "Account", [{"Name": n} for n in ("Acme", "Globex", "Initech")])
        runner = web.AppRunner(build_app(emulator_url))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"example app on http://127.0.0.1:{port}/ (emulator {emulator_url})")
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
