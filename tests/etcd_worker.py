"""A worker process for the multi-process tests: ``python -m tests.etcd_worker ...``.

It runs a token manager on the etcd store against the emulator, in one of a
few modes, and reports on stdout: ``READY`` once its store is up, ``EVENT x``
at the points a test may want to kill or stop it, ``EVENT max_stall S`` when its
event loop's longest stall grows, and one final JSON line (with ``max_stall``).
``--production`` runs the product's default policy and OAuth timeouts (only
the lease TTL is set, to 30 s unless given); SIGTERM ends a storm early.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from sfrtr import (
    InstanceUrlPolicy,
    OAuthClient,
    OAuthConfig,
    RefreshOutcome,
    RefreshPolicy,
    Secret,
    SfrtrError,
    TokenManager,
)
from sfrtr.emulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
from sfrtr.loop_stall import LoopStallMonitor
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class HookedOAuth(OAuthClient):
    """Announces redemptions, and can freeze right before or right after one."""

    def __init__(self, config: OAuthConfig, mode: str) -> None:
        super().__init__(config)
        self.mode = mode

    async def refresh(self, refresh_token: Secret, *,
                      budget: Callable[[], float | None] | None = None) -> RefreshOutcome:
        say("EVENT redeeming")
        if self.mode == "hold-before-redeem":
            await asyncio.Event().wait()  # the test SIGKILLs us here
        outcome = await super().refresh(refresh_token, budget=budget)
        say(f"EVENT redeemed {outcome.kind.value} {outcome.error}")
        if self.mode == "hold-after-rotation":
            await asyncio.Event().wait()  # rotated, not committed: SIGKILL lands here
        return outcome


async def storm(manager: TokenManager, customers: list[str], coroutines: int,
                duration: float, pause: float, stop: asyncio.Event | None = None,
                waves: int = 3) -> dict[str, Any]:
    calls = 0
    failures: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=coroutines)
    stop_at = time.monotonic() + duration
    stopped = stop or asyncio.Event()

    async with aiohttp.ClientSession(connector=connector) as http:
        async def get(creds: Any) -> int:
            async with http.get(f"{creds.instance_url}/services/data/v67.0/limits",
                                headers={"Authorization": f"Bearer {creds.access_token}"}) as r:
                await r.read()
                return r.status

        async def one(i: int) -> None:
            nonlocal calls
            # A paced worker's calls arrive spread over its pause, not all in the same
            # instant: started together, the harness's own 200 first requests are one
            # burst of loop work, stretched by nine processes sharing two cores.
            await asyncio.sleep(pause * i / coroutines)
            while time.monotonic() < stop_at and not stopped.is_set():
                customer = customers[i % len(customers)]
                i += 1
                try:
                    creds = await manager.credentials(customer)
                    status = await get(creds)
                    for _ in range(waves):
                        # The emulator expires every session at once, ``waves`` times
                        # in a run: each refresh returns a token newer than the one
                        # refused, and only a later wave can kill that one, so a call
                        # meets at most one 401 per wave (on a machine loaded past its
                        # cores a refresh and its call can span several). One more
                        # would be a token refused for no reason.
                        if status != 401:
                            break
                        creds = await manager.refresh(customer, stale=creds.access_token)
                        status = await get(creds)
                    if status != 200:
                        failures[f"http_{status}"] = failures.get(f"http_{status}", 0) + 1
                except (SfrtrError, aiohttp.ClientError) as exc:
                    name = type(exc).__name__
                    failures[name] = failures.get(name, 0) + 1
                    await asyncio.sleep(0.05)
                calls += 1
                if pause:
                    await asyncio.sleep(pause)

        await asyncio.gather(*(one(i) for i in range(coroutines)))
    return {"calls": calls, "failures": failures}


async def report_stalls(monitor: LoopStallMonitor) -> None:
    """Announce each new worst stall as it ends, so a worker that is killed later
    (or never finishes) still told the harness how long its loop froze."""
    reported = 0.0
    beat = 0
    while True:
        await asyncio.sleep(0.25)
        if monitor.max_stall >= max(reported * 1.25, monitor.threshold):
            reported = monitor.max_stall
            say(f"EVENT max_stall {reported:.3f}")
        beat += 1
        if beat % 4 == 0:
            say("EVENT alive")  # silence longer than a second: the loop is frozen right now


def production_config(login_url: str) -> OAuthConfig:
    """The product's OAuth defaults (timeouts and graces), nothing shortened."""
    return OAuthConfig(client_id=DEFAULT_CLIENT_ID, client_secret=Secret(DEFAULT_CLIENT_SECRET),
                       login_url=login_url, instance_policy=InstanceUrlPolicy.for_emulator())


def build(args: argparse.Namespace) -> TokenManager:
    if args.production:
        # The product's defaults, nothing shortened: only the lease TTL is ours.
        store = EtcdStore(EtcdSettings(endpoints=[args.etcd]), namespace=args.namespace,
                          lease_ttl=args.lease_ttl or 30, mirror=args.mirror)
        timeouts: dict[str, float] = {} if args.timeout is None else {
            "timeout": args.timeout, "connect_timeout": min(5.0, args.timeout / 2)}
        config = OAuthConfig(client_id=DEFAULT_CLIENT_ID,
                             client_secret=Secret(DEFAULT_CLIENT_SECRET),
                             login_url=args.login_url,
                             instance_policy=InstanceUrlPolicy.for_emulator(), **timeouts)
        return TokenManager(HookedOAuth(config, args.mode), store, RefreshPolicy())
    timeout = 1.2 if args.timeout is None else args.timeout
    store = EtcdStore(EtcdSettings(endpoints=[args.etcd]), namespace=args.namespace,
                      lease_ttl=args.lease_ttl or 4, mirror=args.mirror)
    config = OAuthConfig(client_id=DEFAULT_CLIENT_ID, client_secret=Secret(DEFAULT_CLIENT_SECRET),
                         login_url=args.login_url,
                         instance_policy=InstanceUrlPolicy.for_emulator(),
                         timeout=timeout, connect_timeout=min(1.0, timeout / 2),
                         head_grace=0.1, answer_grace=0.4)
    return TokenManager(HookedOAuth(config, args.mode), store, RefreshPolicy(
        recovery=args.recovery, recovery_grace=args.grace, lease_margin=0.5,
        wait_timeout=args.wait_timeout))


async def run_mode(manager: TokenManager, args: argparse.Namespace,
                   stop: asyncio.Event) -> dict[str, Any]:
    """The worker's job (a storm, or one refresh of the first customer) and its stats."""
    result: dict[str, Any] = {}
    if args.mode == "storm":
        result = await storm(manager, args.customers.split(","), args.coroutines, args.duration,
                             args.pause, stop, args.waves)
    else:
        customer = args.customers.split(",")[0]
        try:
            stale = await manager.token(customer)
            creds = await manager.refresh(customer, stale=stale)
            result = {"ok": True, "token_changed": creds.access_token != stale}
        except SfrtrError as exc:
            result = {"ok": False, "error": type(exc).__name__}
    result["stats"] = vars(manager.stats)
    result["redemptions"] = manager.stats.redemptions
    return result


def report_result(result: dict[str, Any], monitor: LoopStallMonitor, reporter: asyncio.Task[None],
                  ready: float) -> None:
    """Stop the stall monitor and print the result line the tests read."""
    reporter.cancel()
    monitor.stop()
    result["max_stall"] = monitor.max_stall
    result["stalls_over_100ms"] = len(monitor.stalls)
    # When each long stall ended, seconds after READY (negative: during start-up).
    # ...and how much of it the loop's thread ran (CPU): the rest it was not running.
    result["stalls"] = [(round(st.ended - ready, 2), round(st.seconds, 3), round(st.busy, 3),
                         round(st.waited, 3)) for st in monitor.stalls]
    # The loop's own share of its worst stall: late, less the time the OS kept its
    # thread waiting for a core that the other busy processes held.
    result["max_own_stall"] = monitor.max_own_stall
    say(orjson.dumps(result).decode())


def begin() -> tuple[LoopStallMonitor, asyncio.Task[None], asyncio.Event]:
    """What every worker does first (in its loop): logs if asked, the stall monitor and
    its reporter, and an event SIGTERM sets to end a storm early."""
    if log_dir := os.environ.get("SFRTR_WORKER_LOG_DIR"):  # for debugging fault runs
        logging.basicConfig(filename=f"{log_dir}/worker-{os.getpid()}.log", level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    monitor = LoopStallMonitor()
    monitor.start()
    reporter = asyncio.create_task(report_stalls(monitor))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    return monitor, reporter, stop


async def main(args: argparse.Namespace) -> None:
    monitor, reporter, stop = begin()
    manager = build(args)
    store = manager.store
    assert isinstance(store, EtcdStore)
    await store.start()
    say("READY")
    ready = time.monotonic()
    result = await run_mode(manager, args, stop)
    await manager.aclose()
    report_result(result, monitor, reporter, ready)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--etcd", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--login-url", required=True)
    p.add_argument("--customers", required=True, help="comma-separated")
    p.add_argument("--mode", default="storm",
                   choices=["storm", "refresh", "hold-before-redeem", "hold-after-rotation"])
    p.add_argument("--coroutines", type=int, default=10)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between a coroutine's calls")
    p.add_argument("--waves", type=int, default=3,
                   help="session expiries the test will cause: a call may meet one 401 each")
    p.add_argument("--production", action="store_true",
                   help="the default RefreshPolicy and OAuth timeouts (lease TTL 30 s unless set)")
    p.add_argument("--lease-ttl", type=int, default=None, help="default 3 (30 with --production)")
    p.add_argument("--timeout", type=float, default=None, help="default 1.2 (the product's "
                   "default with --production)")
    p.add_argument("--recovery", default="fail_closed")
    p.add_argument("--mirror", default="namespace", choices=["namespace", "served"])
    p.add_argument("--grace", type=float, default=None)
    p.add_argument("--wait-timeout", type=float, default=60.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
