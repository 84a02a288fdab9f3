"""``sfrtr demo``: a refresh storm against the emulator, with and without sfrtr.

Starts the emulator in-process, connects N customers, and runs M coroutines
that call the REST API (``client.query()``) for a while as the emulator
expires every session every few seconds. Each 401 asks for a newer token. With
sfrtr, each expiry costs one redemption per customer and nobody is revoked;
``--naive`` does what an unprotected worker pool does (every coroutine that
sees a 401 redeems the refresh token itself) and shows reuse, revocations and
customers locked out.

Why the coroutines pick customers at random: walking the customers in one
shared order made them bunch up (every coroutine that met an expired customer
waited for its refresh, then all moved on to the next customer together), so
after a few expiries the customers were refreshed one after another, a few
tenths of a second each; the customers the bunch had not reached again before
the next expiry, or before the run ended, were never refreshed for that
expiry. A run of 20 customers and 4 expiries then showed 66 or 71 redemptions
instead of 80. With random picks every customer is called within milliseconds
of an expiry, and no expiry is scheduled in the run's last half second (its
refreshes could not all happen), so the expected count is exactly customers
times expiries.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from sfrtr.cli import demo_report
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

SETTLE = 0.5
"""Seconds before the end of the run in which no expiry is scheduled: the
refreshes it causes could not all happen before the load stops."""


@dataclass
class DemoConfig:
    """One demo run: its load, its length and how often sessions expire (seconds)."""

    customers: int = 20
    concurrency: int = 200
    duration: float = 10.0
    expire_every: float = 2.0
    naive: bool = False
    token_latency: float = 0.05

    def expiry_times(self) -> list[float]:
        """When (seconds after the start) the emulator expires every session."""
        times: list[float] = []
        t = self.expire_every
        while t <= self.duration - min(SETTLE, self.duration / 2):
            times.append(t)
            t += self.expire_every
        return times


@dataclass
class Tally:
    """What the calling coroutines saw: calls, failures by cause, latencies."""

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
    rng = random.Random(index)  # random picks: see the module's docstring
    while time.monotonic() < stop_at:
        customer = customers[rng.randrange(len(customers))]
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


def customer_names(n: int) -> list[str]:
    """The demo's customers: customer-000, customer-001..."""
    return [f"customer-{i:03d}" for i in range(n)]


async def run_demo(config: DemoConfig, *, out: Callable[[str], object] = print
                   ) -> dict[str, float]:
    """Run the storm in this process; returns the figures of the final table."""
    store = ("none (--naive)" if config.naive else
             "the memory store, one process (--processes P: P processes on SQLite)")
    demo_report.header(out, config, store, processes=1)
    emulator = Emulator()
    emulator.faults.set("token", latency=config.token_latency)
    monitor = LoopStallMonitor()
    # One connection per coroutine: aiohttp's pool is not fair under contention,
    # and a request starved for seconds would straddle two session expiries.
    connector = aiohttp.TCPConnector(limit=config.concurrency)
    async with emulator.serve() as base_url, aiohttp.ClientSession(connector=connector) as http:
        oauth = OAuthClient(oauth_config(base_url), http)
        customers = customer_names(config.customers)
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
        progress = demo_report.Progress(out, emulator, customers,
                                        lambda: (tally.calls, tally.errors))
        try:
            expiries = await expire_until(emulator, config, started, progress)
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
        elapsed = time.monotonic() - started
        if isinstance(tokens, TokenManager):
            await tokens.wait_idle()
        monitor.stop()
        figures = figures_of(tally, emulator, customers, expiries, elapsed)
    # One process serves the emulator and runs every caller: its loop is the fleet's.
    figures["max loop stall ms"] = 1000 * monitor.max_stall
    title = "naive (no lock)" if config.naive else "sfrtr on the memory store"
    demo_report.report(out, title, config, figures, tally.kinds)
    return figures


async def expire_until(emulator: Emulator, config: DemoConfig, started: float,
                       progress: demo_report.Progress) -> int:
    """Expire every session at :meth:`DemoConfig.expiry_times`, print progress every
    second, return when the run's duration is over; returns the expiries made."""
    expiries = 0
    pending = [started + t for t in config.expiry_times()]
    stop_at = started + config.duration
    next_tick = started + 1.0
    while (now := time.monotonic()) < stop_at:
        wake = min([stop_at, next_tick, *pending[:1]])
        await asyncio.sleep(max(0.0, wake - now))
        now = time.monotonic()
        if pending and pending[0] <= now:
            pending.pop(0)
            emulator.expire_sessions()
            expiries += 1
        if now >= next_tick or now >= stop_at:
            progress.tick(min(now, stop_at) - started)
            next_tick += 1.0
    return expiries


def figures_of(tally: Tally, emulator: Emulator, customers: list[str], expiries: int,
               elapsed: float) -> dict[str, float]:
    """The final table's figures, from the callers' tally and the emulator's ledger."""
    lat = sorted(tally.latencies) or [0.0]
    ledger = emulator.ledger
    return {
        "calls": tally.calls,
        "failed calls": tally.errors,
        "session expiries": expiries,
        "redemptions": ledger["redemptions"],
        "expected redemptions": len(customers) * expiries,
        "reuse": ledger["reuse"],
        "revocations": ledger["revocations"],
        "concurrent rejections": ledger["concurrent_rejections"],
        "customers locked out": sum(emulator.family_revoked(c) for c in customers),
        "p50 latency ms": 1000 * statistics.median(lat),
        "p99 latency ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "calls/s": tally.calls / elapsed,
    }


def invariants_held(figures: dict[str, float]) -> bool:
    """No refresh token was presented twice and no customer was locked out."""
    return figures["reuse"] == 0 and figures["revocations"] == 0 and \
        figures["customers locked out"] == 0


def main_demo(config: DemoConfig) -> int:
    """Run the one-process demo; 0 when the invariants held, 1 when not (``--naive``)."""
    return 0 if invariants_held(asyncio.run(run_demo(config))) else 1


__all__ = ["DemoConfig", "Tally", "customer_names", "expire_until", "figures_of",
           "invariants_held", "main_demo", "run_demo"]
