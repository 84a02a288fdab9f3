"""``sfrtr demo``: a refresh storm against the emulator, with and without sfrtr.

Starts the emulator in-process, connects N customers, and runs M coroutines
that call the REST API (``client.query()``) for a while as the emulator expires every session
every few seconds. Each 401 asks for a newer token. With sfrtr, each expiry
costs one redemption per customer and nobody is revoked; ``--naive`` does
what an unprotected worker pool does (every coroutine that sees a 401
redeems the refresh token itself) and shows reuse and revocations appear.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import oauth_config, token_grant
from sfrtr.errors import SfrtrError
from sfrtr.loop_stall import LoopStallMonitor
from sfrtr.manager import Credentials, TokenManager
from sfrtr.oauth import OAuthClient, OutcomeKind
from sfrtr.salesforce import Client
from sfrtr.secret import Secret
from sfrtr.store.memory import MemoryStore

QUERY_PATH = "/services/data/v67.0/query"
SOQL = "SELECT Id, Name FROM Account LIMIT 5"


@dataclass
class DemoConfig:
    customers: int = 20
    concurrency: int = 200
    duration: float = 10.0
    expire_every: float = 2.0
    naive: bool = False
    token_latency: float = 0.05


@dataclass
class Tally:
    calls: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)


class SessionExpired(Exception):
    """A 401 on the retry too: the session died again between refresh and retry."""


async def _query(http: aiohttp.ClientSession, creds: Credentials) -> None:
    headers = {"Authorization": f"Bearer {creds.access_token}"}
    async with http.get(creds.instance_url + QUERY_PATH, params={"q": SOQL},
                        headers=headers) as resp:
        if resp.status == 401:
            raise SessionExpired
        resp.raise_for_status()
        await resp.read()


class _NaiveTokens:
    """What workers do without coordination: whoever sees a 401 refreshes."""

    def __init__(self, oauth: OAuthClient) -> None:
        self.oauth = oauth
        self.tokens: dict[str, tuple[Credentials, Secret]] = {}

    async def credentials(self, customer: str) -> Credentials:
        return self.tokens[customer][0]

    async def refresh(self, customer: str, *, stale: str) -> Credentials:
        _, refresh_token = self.tokens[customer]
        outcome = await self.oauth.refresh(refresh_token)
        if outcome.kind is not OutcomeKind.OK or outcome.grant is None:
            raise SfrtrError(f"naive refresh failed: {outcome.kind.value}")
        grant = outcome.grant
        self.tokens[customer] = (Credentials(grant.access_token.reveal(), grant.instance_url),
                                 grant.refresh_token or refresh_token)
        return self.tokens[customer][0]


async def _worker(http: aiohttp.ClientSession, tokens: TokenManager | _NaiveTokens,
                  customers: list[str], index: int, stop_at: float, tally: Tally) -> None:
    i = index
    while time.monotonic() < stop_at:
        customer = customers[i % len(customers)]
        i += 1
        started = time.perf_counter()
        try:
            if isinstance(tokens, TokenManager):
                await Client(customer, tokens, session=http).query(SOQL)
            else:  # what an application without sfrtr writes
                creds = await tokens.credentials(customer)
                try:
                    await _query(http, creds)
                except SessionExpired:
                    creds = await tokens.refresh(customer, stale=creds.access_token)
                    await _query(http, creds)
            tally.latencies.append(time.perf_counter() - started)
        except (SfrtrError, SessionExpired, aiohttp.ClientError) as exc:
            tally.errors += 1
            tally.kinds[type(exc).__name__] = tally.kinds.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(0.01)  # a failing customer must not spin
        tally.calls += 1


async def run_demo(config: DemoConfig, *, out: Callable[[str], object] = print
                   ) -> dict[str, float]:
    """Run the storm; returns the figures of the final table."""
    out("store: none (naive: whoever sees a 401 refreshes)" if config.naive else
        "store: the memory store, one process (--processes P runs P processes on the SQLite "
        "store; --store picks another)")
    emulator = Emulator()
    emulator.faults.set("token", latency=config.token_latency)
    monitor = LoopStallMonitor()
    # One connection per coroutine: aiohttp's pool is not fair under contention,
    # and a request starved for seconds would straddle two session expiries.
    connector = aiohttp.TCPConnector(limit=config.concurrency)
    async with emulator.serve() as base_url, aiohttp.ClientSession(connector=connector) as http:
        oauth = OAuthClient(oauth_config(base_url), http)
        customers = [f"customer-{i:03d}" for i in range(config.customers)]
        tokens: TokenManager | _NaiveTokens = (
            _NaiveTokens(oauth) if config.naive else TokenManager(oauth, MemoryStore()))
        for c in customers:
            emulator.seed(c, "Account", [{"Name": f"{c} account {n}"} for n in range(5)])
            grant = token_grant(emulator, c)
            if isinstance(tokens, TokenManager):
                await tokens.connect(c, grant)
            else:
                assert grant.refresh_token is not None
                tokens.tokens[c] = (Credentials(grant.access_token.reveal(), grant.instance_url),
                                    grant.refresh_token)
        tally = Tally()
        started = time.monotonic()
        stop_at = started + config.duration
        monitor.start()
        workers = [asyncio.create_task(_worker(http, tokens, customers, i, stop_at, tally))
                   for i in range(config.concurrency)]
        expiries = await _expire_until(emulator, config, started, stop_at,
                                       lambda t: _progress(out, tally, emulator, t))
        await asyncio.gather(*workers)
        elapsed = time.monotonic() - started
        if isinstance(tokens, TokenManager):
            await tokens.wait_idle()
        monitor.stop()
    figures = _figures(tally, emulator, expiries, elapsed)
    # One process serves the emulator and runs every caller: its loop is the fleet's.
    figures["max loop stall ms"] = 1000 * monitor.max_stall
    _report(out, "naive (no lock)" if config.naive else "sfrtr on the memory store", config,
            figures, tally)
    return figures


async def _expire_until(emulator: Emulator, config: DemoConfig, started: float,
                        stop_at: float, progress: Callable[[float], None]) -> int:
    """Expire every session every ``expire_every`` seconds until ``stop_at``."""
    expiries = 0
    next_expiry = started + config.expire_every
    while time.monotonic() < stop_at:
        await asyncio.sleep(min(0.5, max(0.0, stop_at - time.monotonic())))
        if next_expiry <= time.monotonic() < stop_at:
            emulator.expire_sessions()
            expiries += 1
            next_expiry += config.expire_every
        progress(time.monotonic() - started)
    return expiries


def _figures(tally: Tally, emulator: Emulator, expiries: int,
             elapsed: float) -> dict[str, float]:
    lat = sorted(tally.latencies) or [0.0]
    ledger = emulator.ledger
    return {
        "calls": tally.calls,
        "failed calls": tally.errors,
        "session expiries": expiries,
        "redemptions": ledger["redemptions"],
        "reuse": ledger["reuse"],
        "revocations": ledger["revocations"],
        "concurrent rejections": ledger["concurrent_rejections"],
        "p50 latency ms": 1000 * statistics.median(lat),
        "p99 latency ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "calls/s": tally.calls / elapsed,
    }


def _report(out: Callable[[str], object], title: str, config: DemoConfig,
            figures: dict[str, float], tally: Tally) -> None:
    _table(out, title, config, figures)
    if tally.kinds:
        out("  failures by cause: " + ", ".join(f"{k} {v:,}" for k, v in
                                               sorted(tally.kinds.items())))


def _progress(out: Callable[[str], object], tally: Tally, em: Emulator, t: float) -> None:
    line = (f"  t={t:4.1f}s calls={tally.calls} errors={tally.errors} "
            f"redemptions={em.ledger['redemptions']} reuse={em.ledger['reuse']}")
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line)
        sys.stderr.flush()
    elif int(t * 2) % 4 == 0:
        out(line)


def _table(out: Callable[[str], object], title: str, config: DemoConfig,
           figures: dict[str, float]) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    out(f"\n{title}: {config.customers} customers, {config.concurrency} coroutines, "
        f"{config.duration:.0f}s, sessions expired every {config.expire_every:.0f}s")
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
        out(f"  {key:<{width}}  {shown:>12}")


def main_demo(config: DemoConfig) -> int:
    figures = asyncio.run(run_demo(config))
    return 0 if config.naive or (figures["reuse"] == 0 and figures["revocations"] == 0) else 1


__all__ = ["DemoConfig", "main_demo", "run_demo"]
