"""Refresh storms against the emulator over real sockets (memory store).

* one customer, C coroutines, one expired token: redemptions must be 1; the
  callers' waits are measured side by side, in one run, with two floors that
  do the same real refresh with no manager at all:

  - *floor*: C tasks awaiting one shielded future that one real refresh
    resolves (the first task to arrive starts the refresh);
  - *shield per caller*: the same with ``asyncio.shield`` per caller, the
    textbook way to keep one caller's cancellation from cancelling the work.

  Rounds alternate the order of the three, so drift on a busy machine hits
  all alike; the medians over rounds are reported.
* K customers expire at once: refreshes per second and CPU per refresh.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sfrtr import MemoryStore, OAuthClient, Secret, TokenManager
from sfrtr.emulator import Emulator
from sfrtr.emulator.sdk import oauth_config, token_grant
from sfrtr.oauth.outcome import OutcomeKind


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _manager(em: Emulator, base: str, customers: list[str]) -> TokenManager:
    manager = TokenManager(OAuthClient(oauth_config(base)), MemoryStore())
    for c in customers:
        await _expire(manager, em, c, connect=True)
    return manager


async def _expire(manager: TokenManager, em: Emulator, customer: str, *,
                  connect: bool = False) -> None:
    """Past its estimated expiry: the next token() must refresh."""
    if connect:
        record = await manager.connect(customer, token_grant(em, customer))
    else:
        current = await manager.store.read(customer)
        assert current is not None
        record = current.record
    # The store tells the manager, whose cached entry is then past its refresh time.
    await manager.store.put(customer, record.replace(expires_at=time.time() - 1))


def _percentile(waits: list[float], q: float) -> float:
    return waits[min(len(waits) - 1, int(len(waits) * q))]


async def _callers(coroutines: int, wait: Callable[[], Awaitable[object]]) -> list[float]:
    """Seconds each of ``coroutines`` tasks waited in ``wait()``, sorted."""
    waits: list[float] = []

    async def one() -> None:
        started = time.perf_counter()
        await wait()
        waits.append(time.perf_counter() - started)

    await asyncio.gather(*(one() for _ in range(coroutines)))
    waits.sort()
    return waits


class _Floor:
    """One real refresh, coalesced by hand: what no manager can go below."""

    def __init__(self, oauth: OAuthClient, refresh_token: Secret, *, per_caller: bool) -> None:
        self.oauth = oauth
        self.refresh_token = refresh_token
        self.per_caller = per_caller
        self.redemptions = 0
        self._task: asyncio.Task[None] | None = None
        self._shared: asyncio.Future[None] | None = None

    async def _refresh(self) -> None:
        outcome = await self.oauth.refresh(self.refresh_token)
        assert outcome.kind is OutcomeKind.OK, outcome
        assert outcome.grant is not None
        assert outcome.grant.refresh_token is not None
        self.refresh_token = outcome.grant.refresh_token
        self.redemptions += 1

    def reset(self) -> None:
        self._task = self._shared = None

    async def wait(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresh())
            self._shared = asyncio.shield(self._task)
        if self.per_caller:
            await asyncio.shield(self._task)
        else:
            assert self._shared is not None
            await self._shared


async def singleflight_storm(coroutines: int = 10_000, latency: float = 0.05,
                             rounds: int = 5) -> dict[str, Any]:
    """The storm, sfrtr against both floors; returns rows and the wait distributions."""
    em = Emulator()
    em.faults.set("token", latency=latency)
    async with em.serve() as base:
        manager = await _manager(em, base, ["acme"])
        oauth = OAuthClient(oauth_config(base))
        grant = token_grant(em, "floor")
        assert grant.refresh_token is not None
        floor = _Floor(oauth, grant.refresh_token, per_caller=False)
        shielded = _Floor(oauth, grant.refresh_token, per_caller=True)

        async def run_sfrtr() -> list[float]:
            await _expire(manager, em, "acme")
            return await _callers(coroutines, lambda: manager.token("acme"))

        async def run_floor(which: _Floor) -> list[float]:
            which.reset()
            which.refresh_token = chain[0]
            waits = await _callers(coroutines, which.wait)
            chain[0] = which.refresh_token
            return waits

        chain = [grant.refresh_token]  # one token chain, the two floors take turns
        variants: dict[str, Callable[[], Awaitable[list[float]]]] = {
            "floor: tasks awaiting one shielded future": lambda: run_floor(floor),
            "shield per caller": lambda: run_floor(shielded),
            "sfrtr manager.token()": run_sfrtr,
        }
        samples: dict[str, list[list[float]]] = {name: [] for name in variants}
        order = list(variants)
        for name in order:  # warm-up, not counted: connection pools, specialised bytecode
            await variants[name]()
        redemptions_before = em.ledger["redemptions"]
        sfrtr_before = manager.stats.redemptions
        for i in range(rounds):
            for name in order if i % 2 == 0 else reversed(order):
                samples[name].append(await variants[name]())
        redemptions = em.ledger["redemptions"] - redemptions_before
        reuse = em.ledger["reuse"]
        await oauth.aclose()
        await manager.aclose()
    rows = []
    floor_p99 = statistics.median(_percentile(w, 0.99) for w in samples[order[0]])
    for name, runs in samples.items():
        p99 = statistics.median(_percentile(w, 0.99) for w in runs)
        rows.append({
            "variant": name, "coroutines": coroutines, "latency L ms": latency * 1000,
            "p50 wait ms": statistics.median(_percentile(w, 0.5) for w in runs) * 1000,
            "p99 wait ms": p99 * 1000,
            "max wait ms": statistics.median(w[-1] for w in runs) * 1000,
            "p99 / floor p99": p99 / floor_p99,
        })
    # The distribution of the round whose p99 was the median, per variant (for the chart).
    distributions = {}
    for name, runs in samples.items():
        ranked = sorted(runs, key=lambda w: _percentile(w, 0.99))
        middle = ranked[len(ranked) // 2]
        distributions[name] = [_percentile(middle, q / 200) * 1000 for q in range(201)]
    return {"rows": rows, "redemptions": redemptions, "rounds": rounds,
            "sfrtr redemptions per storm": (manager.stats.redemptions - sfrtr_before) / rounds,
            "reuse": reuse, "distributions": distributions}


async def many_customer_storm(customers: int = 10_000) -> dict[str, Any]:
    em = Emulator()
    async with em.serve() as base:
        names = [f"c{i}" for i in range(customers)]
        manager = await _manager(em, base, names)
        cpu0, started = _cpu(), time.perf_counter()
        await asyncio.gather(*(manager.token(c) for c in names))
        wall, cpu = time.perf_counter() - started, _cpu() - cpu0
        await manager.aclose()
    return {"customers": customers, "redemptions": em.ledger["redemptions"],
            "reuse": em.ledger["reuse"], "wall s": wall, "refreshes/s": customers / wall,
            "CPU us/refresh (sfrtr + emulator)": cpu / customers * 1e6}
