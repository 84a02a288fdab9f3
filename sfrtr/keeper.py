"""Keep idle grants alive: refresh every grant unused for longer than a threshold.

Salesforce expires a refresh token that goes unused for a while (30 days by
default; an org's admin can set less), and nobody notices until the customer's
next sync fails and they must re-authorize. The keeper refreshes such grants
before that happens, through the same :class:`~sfrtr.TokenManager` (so through
the same lock, fencing and intent: a keeper's refresh can never be a second
redemption), at a bounded rate with jitter so a fleet's worth of idle grants
does not become a refresh storm.

It is safe to run in every worker: each pass is claimed in the store
(``claim_once`` on the pass's period), so across the fleet one keeper works per
period and the others skip it. A keeper that dies mid-pass leaves the rest to
the next period; thresholds are days, periods an hour.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sfrtr.errors import ConfigurationError, SfrtrError, StoreError
from sfrtr.manager import TokenManager
from sfrtr.records import Status
from sfrtr.store.base import OnceStore

log = logging.getLogger(__name__)

DAY = 86_400.0


@dataclass
class KeeperReport:
    """What one pass did (customer names only, never a token)."""

    claimed: bool
    """Whether this worker ran the pass (``False``: another worker has this period)."""
    checked: int = 0
    refreshed: list[str] = field(default_factory=list)
    not_valid: list[str] = field(default_factory=list)
    """Grants that need re-authorization already: nothing to keep alive."""
    failed: dict[str, str] = field(default_factory=dict)
    """Customer to the error's type name, for refreshes that did not succeed."""


class IdleKeeper:
    """Refreshes grants whose last refresh is older than ``max_idle`` seconds.

    ``period``: how often a pass runs, fleet-wide (one worker per period).
    ``rate``: at most this many refreshes per second; each pause between two is
    ``1 / rate`` scaled by a factor drawn from ``[1 - jitter, 1 + jitter]``.
    ``clock`` is wall-clock epoch seconds, as the records' ``issued_at``.
    """

    def __init__(self, manager: TokenManager, *, max_idle: float = 7 * DAY,
                 period: float = 3600.0, rate: float = 1.0, jitter: float = 0.5,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        if max_idle < 0 or period <= 0 or rate <= 0:
            raise ValueError("period and rate must be positive, max_idle not negative")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self.manager = manager
        self.max_idle = max_idle
        self.period = period
        self.rate = rate
        self.jitter = jitter
        self._clock = clock
        self._sleep = sleep
        self._rng = rng

    def __repr__(self) -> str:
        return (f"IdleKeeper(max_idle={self.max_idle:g}s, period={self.period:g}s, "
                f"rate={self.rate:g}/s)")

    async def run_once(self) -> KeeperReport:
        """One pass, if this worker claims the current period; see :class:`KeeperReport`."""
        store = self.manager.store
        if not isinstance(store, OnceStore):
            raise ConfigurationError(f"{type(store).__name__} cannot claim a keeper's pass "
                                     "(it has no claim_once): use one of sfrtr's stores")
        period = int(self._clock() // self.period)
        if not await store.claim_once(f"keeper/{period}", self.period):
            log.info("keeper: another worker has this period's pass")
            return KeeperReport(claimed=False)
        report = KeeperReport(claimed=True)
        paced = False
        for customer in await store.customers():
            try:
                state = await store.read(customer)
            except StoreError as exc:
                # One record this worker cannot read (a key it lacks, a store hiccup)
                # must not cost every customer after it this period's pass.
                report.failed[customer] = type(exc).__name__
                log.warning("keeper: reading customer %s failed: %s", customer,
                            type(exc).__name__)
                continue
            if state is None:
                continue
            report.checked += 1
            record = state.record
            if record.status is not Status.VALID:
                report.not_valid.append(customer)
                continue
            if self._clock() - record.issued_at < self.max_idle:
                continue
            if paced:
                await self._sleep(self._pause())
            paced = True
            try:
                await self.manager.refresh(customer, stale=record.access_token.reveal())
            except SfrtrError as exc:
                report.failed[customer] = type(exc).__name__
                log.warning("keeper: refreshing idle customer %s failed: %s", customer,
                            type(exc).__name__)
            else:
                report.refreshed.append(customer)
        log.info("keeper: checked %d, refreshed %d idle, %d failed, %d not valid",
                 report.checked, len(report.refreshed), len(report.failed),
                 len(report.not_valid))
        return report

    async def run(self) -> None:
        """Pass after pass until cancelled: one every ``period`` (jittered) per worker."""
        while True:
            try:
                await self.run_once()
            except SfrtrError as exc:  # a store outage: try again next period
                log.warning("keeper: pass failed: %s", type(exc).__name__)
            await self._sleep(self.period * self._factor())

    def _factor(self) -> float:
        return 1 + self.jitter * (2 * self._rng() - 1)

    def _pause(self) -> float:
        return self._factor() / self.rate
