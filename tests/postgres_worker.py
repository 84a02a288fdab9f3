"""A worker process on the Postgres store: ``python -m tests.postgres_worker ...``.

The Postgres twin of ``tests.sqlite_worker`` (same modes and output: ``READY``,
``EVENT x``, one final JSON line), plus ``pause-before-redeem``: the section
waits for SIGUSR1 right before the token request (with its lease check).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Callable

from sfrtr import (
    InstanceUrlPolicy,
    OAuthConfig,
    RefreshOutcome,
    RefreshPolicy,
    Secret,
    TokenManager,
)
from sfrtr.emulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
from sfrtr.store.postgres import PostgresStore
from tests.etcd_worker import (
    HookedOAuth,
    begin,
    production_config,
    report_result,
    run_mode,
    say,
)


class PausingOAuth(HookedOAuth):
    def __init__(self, config: OAuthConfig, mode: str) -> None:
        super().__init__(config, "refresh" if mode == "pause-before-redeem" else mode)
        self.pausing = mode == "pause-before-redeem"
        self.go = asyncio.Event()

    async def refresh(self, refresh_token: Secret, *,
                      budget: Callable[[], float | None] | None = None) -> RefreshOutcome:
        if self.pausing:
            say("EVENT paused")
            await self.go.wait()
        return await super().refresh(refresh_token, budget=budget)


def build(args: argparse.Namespace) -> TokenManager:
    store = PostgresStore(args.dsn, schema=args.schema, lease_ttl=args.lease_ttl,
                          pool_size=args.pool_size)
    if args.production:
        return TokenManager(PausingOAuth(production_config(args.login_url), args.mode), store,
                            RefreshPolicy())
    config = OAuthConfig(client_id=DEFAULT_CLIENT_ID, client_secret=Secret(DEFAULT_CLIENT_SECRET),
                         login_url=args.login_url,
                         instance_policy=InstanceUrlPolicy.for_emulator(),
                         timeout=args.timeout, connect_timeout=min(1.0, args.timeout / 2),
                         head_grace=0.1, answer_grace=0.4)
    return TokenManager(PausingOAuth(config, args.mode), store, RefreshPolicy(
        recovery=args.recovery, recovery_grace=args.grace, lease_margin=0.5,
        wait_timeout=args.wait_timeout))


async def main(args: argparse.Namespace) -> None:
    monitor, reporter, stop = begin()
    loop = asyncio.get_running_loop()
    manager = build(args)
    oauth = manager.oauth
    assert isinstance(oauth, PausingOAuth)
    loop.add_signal_handler(signal.SIGUSR1, oauth.go.set)
    store = manager.store
    assert isinstance(store, PostgresStore)
    await store.start()
    say(f"READY holder {store.holder} pid {store._presence_pid}")
    ready = time.monotonic()
    result = await run_mode(manager, args, stop)
    result["holder_now"] = store.holder
    await manager.aclose()
    report_result(result, monitor, reporter, ready)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", required=True)
    p.add_argument("--schema", required=True)
    p.add_argument("--login-url", required=True)
    p.add_argument("--customers", required=True, help="comma-separated")
    p.add_argument("--mode", default="storm",
                   choices=["storm", "refresh", "hold-before-redeem", "hold-after-rotation",
                            "pause-before-redeem"])
    p.add_argument("--coroutines", type=int, default=10)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between a coroutine's calls")
    p.add_argument("--waves", type=int, default=3,
                   help="session expiries the test will cause: a call may meet one 401 each")
    p.add_argument("--timeout", type=float, default=1.2)
    p.add_argument("--lease-ttl", type=float, default=4.0)
    p.add_argument("--pool-size", type=int, default=5)
    p.add_argument("--recovery", default="introspect")
    p.add_argument("--grace", type=float, default=None)
    p.add_argument("--wait-timeout", type=float, default=60.0)
    p.add_argument("--production", action="store_true",
                   help="the product's RefreshPolicy and OAuth timeouts (only the store's "
                        "options as given)")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
