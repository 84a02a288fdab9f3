"""A worker process on the SQLite store: ``python -m tests.sqlite_worker ...``.

The SQLite twin of ``tests.etcd_worker`` (same modes, same output: ``READY``,
``EVENT x``, one final JSON line), reusing its storm, hooked OAuth client and
stall reporter.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from sfrtr import (
    InstanceUrlPolicy,
    OAuthConfig,
    RefreshPolicy,
    Secret,
    SqliteStore,
    TokenManager,
)
from sfrtr.emulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
from tests.etcd_worker import (
    HookedOAuth,
    begin,
    production_config,
    report_result,
    run_mode,
    say,
)


def build(args: argparse.Namespace) -> TokenManager:
    store = SqliteStore(args.db)
    if args.production:
        return TokenManager(HookedOAuth(production_config(args.login_url), args.mode), store,
                            RefreshPolicy())
    config = OAuthConfig(client_id=DEFAULT_CLIENT_ID, client_secret=Secret(DEFAULT_CLIENT_SECRET),
                         login_url=args.login_url,
                         instance_policy=InstanceUrlPolicy.for_emulator(),
                         timeout=args.timeout, connect_timeout=min(1.0, args.timeout / 2),
                         head_grace=0.1, answer_grace=0.4)
    return TokenManager(HookedOAuth(config, args.mode), store, RefreshPolicy(
        recovery=args.recovery, recovery_grace=args.grace, lease_margin=0.5,
        wait_timeout=args.wait_timeout))


async def main(args: argparse.Namespace) -> None:
    monitor, reporter, stop = begin()
    manager = build(args)
    store = manager.store
    assert isinstance(store, SqliteStore)
    await store.start()
    say(f"READY holder {store.holder}")
    ready = time.monotonic()
    result = await run_mode(manager, args, stop)
    await manager.aclose()
    report_result(result, monitor, reporter, ready)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--login-url", required=True)
    p.add_argument("--customers", required=True, help="comma-separated")
    p.add_argument("--mode", default="storm",
                   choices=["storm", "refresh", "hold-before-redeem", "hold-after-rotation"])
    p.add_argument("--coroutines", type=int, default=10)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between a coroutine's calls")
    p.add_argument("--waves", type=int, default=3,
                   help="session expiries the test will cause: a call may meet one 401 each")
    p.add_argument("--timeout", type=float, default=1.2)
    p.add_argument("--recovery", default="introspect")
    p.add_argument("--grace", type=float, default=None)
    p.add_argument("--wait-timeout", type=float, default=60.0)
    p.add_argument("--production", action="store_true",
                   help="the product's RefreshPolicy and OAuth timeouts (only the store's "
                        "options as given)")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
