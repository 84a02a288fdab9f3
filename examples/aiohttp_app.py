"""A small aiohttp service on sfrtr, against the built-in emulator.

    python examples/aiohttp_app.py --port 8080    # then open http://127.0.0.1:8080/

Pages: ``/?customer=acme`` (links, and a button that disconnects),
``/salesforce/connect?customer=acme`` (the OAuth flow; the emulator approves at
once), ``/accounts?customer=acme`` (a query through sfrtr).

``--emulator URL`` uses an emulator already running instead of starting one;
``--sqlite PATH`` keeps the tokens in a SQLite file that several copies of this
app (several worker processes) share; ``--redirect-uri URL`` is the public
callback URL when they sit behind one load balancer.

The app is told of each grant's transitions once across its workers (sfrtr's
hooks): here they are logged for the admin (``tell_admin``; swap in your mailer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import logging
from collections.abc import AsyncIterator
from urllib.parse import quote

from aiohttp import web

import sfrtr
import sfrtr.aiohttp as sfrtr_aiohttp
from sfrtr.emulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator

admin_log = logging.getLogger("example.admin")


async def tell_admin(customer: str, reason: str) -> None:
    """The customer must authorize the app again: one message per lost grant, sent by
    the one worker that found out (in a real app: an email, a ticket, a webhook)."""
    admin_log.warning("customer %s must re-authorize the Salesforce app: %s", customer, reason)


def at_risk(customer: str, reason: str) -> None:
    admin_log.info("customer %s: a refresh has an unknown outcome, recovering: %s",
                   customer, reason)


def _customer(request: web.Request) -> str:
    return request.query.get("customer", "acme")


async def index(request: web.Request) -> web.Response:
    customer = _customer(request)
    c = quote(customer)
    token = await sfrtr_aiohttp.csrf_token(request)
    return web.Response(content_type="text/html", text=(
        f"<h1>sfrtr example: {html.escape(customer)}</h1>"
        f'<p><a id="connect" href="/salesforce/connect?customer={c}&login_hint={c}">'
        f"Connect {html.escape(customer)}</a></p>"
        f'<p><a id="accounts" href="/accounts?customer={c}">'
        f"Query {html.escape(customer)}'s accounts</a></p>"
        f'<form id="disconnect" method="post" action="/salesforce/disconnect?customer={c}">'
        f'<input type="hidden" name="csrf_token" value="{html.escape(token)}">'
        f'<button type="submit">Disconnect {html.escape(customer)}</button></form>'))


async def accounts(request: web.Request) -> web.Response:
    customer = _customer(request)
    try:
        salesforce = await sfrtr_aiohttp.client(request)
        page = await salesforce.query("SELECT Id, Name FROM Account ORDER BY Name")
    except sfrtr.NotConnected:
        raise web.HTTPFound(f"/?customer={quote(customer)}") from None
    except sfrtr.ReauthorizationRequired:
        # The grant is dead (revoked, expired): the customer must connect again.
        return web.Response(status=409, content_type="text/html", text=(
            f"<h1>{html.escape(customer)} must connect again</h1>"
            f'<p><a href="/salesforce/connect?customer={quote(customer)}">Connect</a></p>'))
    rows = "".join(f"<li>{html.escape(str(r['Name']))}</li>" for r in page.records)
    return web.Response(content_type="text/html", text=(
        f"<h1>{page.total_size} accounts</h1><ul>{rows}</ul>"
        f'<p><a href="/?customer={quote(customer)}">Back</a></p>'))


def build_app(emulator_url: str, *, sqlite: str | None = None,
              redirect_uri: str | None = None) -> web.Application:
    app = web.Application()
    sfrtr_aiohttp.setup(
        app,
        oauth_config=sfrtr.OAuthConfig(
            client_id=DEFAULT_CLIENT_ID, client_secret=sfrtr.Secret(DEFAULT_CLIENT_SECRET),
            login_url=emulator_url, instance_policy=sfrtr.InstanceUrlPolicy.for_emulator()),
        customer_of=_customer,
        state_key=sfrtr.Secret("example-only-state-key-change-me"),
        store_factory=(lambda: sfrtr.SqliteStore(sqlite)) if sqlite else sfrtr.MemoryStore,
        redirect_uri=redirect_uri,
        success_url=lambda customer: f"/accounts?customer={quote(customer)}",
        disconnected_url=lambda customer: f"/?customer={quote(customer)}",
        hooks=sfrtr.Hooks(on_reauth_required=tell_admin, on_lockout_risk=at_risk))
    app.router.add_get("/", index)
    app.router.add_get("/accounts", accounts)
    return app


@contextlib.asynccontextmanager
async def _emulator(url: str | None) -> AsyncIterator[str]:
    if url:
        yield url
        return
    emulator = Emulator()
    async with emulator.serve() as emulator_url:
        emulator.seed("acme", "Account", [{"Name": n} for n in ("Acme", "Globex", "Initech")])
        yield str(emulator_url)


async def main(port: int = 8080, *, emulator_url: str | None = None,
               sqlite: str | None = None, redirect_uri: str | None = None) -> None:
    async with _emulator(emulator_url) as url:
        runner = web.AppRunner(build_app(url, sqlite=sqlite, redirect_uri=redirect_uri))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"example app on http://127.0.0.1:{port}/ (emulator {url})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1-65535)")
    return port


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="sfrtr's aiohttp example app")
    parser.add_argument("--port", type=_port, default=8080, help="port (default 8080)")
    parser.add_argument("--emulator", help="URL of a running emulator (default: start one)")
    parser.add_argument("--sqlite", help="SQLite file shared by several app processes")
    parser.add_argument("--redirect-uri", help="the public callback URL (behind a proxy)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.port, emulator_url=args.emulator, sqlite=args.sqlite,
                         redirect_uri=args.redirect_uri))
