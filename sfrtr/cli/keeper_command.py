"""``sfrtr keeper``: :class:`sfrtr.IdleKeeper` as a process against a store.

The keeper refreshes through a :class:`~sfrtr.TokenManager` like any worker's, so
the connected app's client id and secret are needed; the secret is read from
``$SFRTR_CLIENT_SECRET`` only (a command line is visible to every user).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import TYPE_CHECKING

from sfrtr.cli import CommandFailed
from sfrtr.cli.stores import env_sealer, open_store, where

# Imported by every ``sfrtr`` run for the options: asyncio, the keeper and the OAuth
# client come in only when the keeper runs.

if TYPE_CHECKING:
    from sfrtr.keeper import KeeperReport
    from sfrtr.oauth import OAuthConfig

DAY = 86_400.0
SECRET_ENV = "SFRTR_CLIENT_SECRET"
CLIENT_ID_ENV = "SFRTR_CLIENT_ID"
LOGIN_URL_ENV = "SFRTR_LOGIN_URL"


def days(text: str) -> float:
    """A finite number of days, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of days, 0 or more")
    return value


def rate(text: str) -> float:
    """A finite number of refreshes per second, above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number per second") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number per second above 0")
    return value


def add_options(p: argparse.ArgumentParser) -> None:
    """The keeper's own options (the store's are added by the caller)."""
    from sfrtr.cli import parsing

    env = os.environ
    p.add_argument("--max-idle-days", type=days, default=7.0,
                   help="refresh grants whose last refresh is older than this (0: every "
                        "valid grant)")
    p.add_argument("--period", type=parsing.seconds, default=3600.0,
                   help="seconds between two passes, fleet-wide")
    p.add_argument("--rate", type=rate, default=1.0, help="at most this many refreshes a second")
    p.add_argument("--once", action="store_true",
                   help="run one pass, print what it did and exit")
    p.add_argument("--json", action="store_true", help="with --once: print the report as JSON")
    p.add_argument("--client-id", default=env.get(CLIENT_ID_ENV),
                   help="the connected app's consumer key (default: $SFRTR_CLIENT_ID)")
    p.add_argument("--login-url", default=env.get(LOGIN_URL_ENV, "https://login.salesforce.com"),
                   help="where the token endpoint is ($SFRTR_LOGIN_URL); a loopback http URL "
                        "is the emulator's")


def oauth_config(args: argparse.Namespace) -> OAuthConfig:
    """The connected app from the options and ``$SFRTR_CLIENT_SECRET``; one line when
    something is missing or the login URL is not one sfrtr sends tokens to."""
    import ipaddress
    from urllib.parse import urlsplit

    from sfrtr.oauth import InstanceUrlPolicy, OAuthConfig
    from sfrtr.secret import Secret

    if not args.client_id:
        raise CommandFailed(f"no client id: give --client-id or set ${CLIENT_ID_ENV}")
    url = urlsplit(args.login_url)
    loopback = False
    if url.scheme == "http" and url.hostname:
        try:
            loopback = (url.hostname == "localhost"
                        or ipaddress.ip_address(url.hostname).is_loopback)
        except ValueError:
            loopback = False
    if url.scheme != "https" and not loopback:
        raise CommandFailed(f"--login-url {args.login_url} is not https (plain http is for the "
                            "emulator on a loopback address only)")
    secret = os.environ.get(SECRET_ENV)
    # The emulator answers with loopback http instance URLs; Salesforce never does.
    policy = InstanceUrlPolicy.for_emulator() if loopback else InstanceUrlPolicy()
    return OAuthConfig(client_id=args.client_id,
                       client_secret=Secret(secret) if secret else None,
                       login_url=args.login_url, instance_policy=policy)


def run_keeper(args: argparse.Namespace) -> int:
    """Run ``sfrtr keeper`` as ``args`` say; returns the exit status."""
    import asyncio

    if args.json and not args.once:
        raise CommandFailed("--json is for --once (a running keeper logs each pass)")
    config = oauth_config(args)
    place = where(args)
    try:
        return asyncio.run(_run(args, config, place))
    except asyncio.CancelledError:  # SIGTERM: a stop asked for, not a failure
        print("sfrtr keeper: stopped", file=sys.stderr)
        return 0


async def _run(args: argparse.Namespace, config: OAuthConfig, place: str) -> int:
    import asyncio
    import logging
    import signal

    from sfrtr.errors import SfrtrError
    from sfrtr.keeper import IdleKeeper
    from sfrtr.manager import TokenManager
    from sfrtr.oauth import OAuthClient

    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    store = open_store(args, env_sealer())
    manager = TokenManager(OAuthClient(config), store)
    keeper = IdleKeeper(manager, max_idle=args.max_idle_days * DAY,
                        period=args.period, rate=args.rate)
    try:
        if args.once:
            try:
                report = await keeper.run_once()
            except (SfrtrError, OSError) as exc:
                raise CommandFailed(f"{place}: {exc}") from exc
            _print_report(report, args.json, place)
            return 0
        # The keeper logs each pass at INFO; show those lines (the rest stays at WARNING).
        logging.getLogger("sfrtr.keeper").setLevel(logging.INFO)
        print(f"sfrtr keeper: {place}, a pass every {args.period:g} s, grants idle for "
              f"{args.max_idle_days:g} day(s), at most {args.rate:g} refresh(es)/s; SIGTERM "
              "or Ctrl-C stops it", file=sys.stderr, flush=True)
        await keeper.run()
        return 0  # pragma: no cover - run() returns only by cancellation
    finally:
        await manager.aclose()


def _print_report(report: KeeperReport, as_json: bool, place: str) -> None:
    import dataclasses

    import orjson

    if as_json:
        sys.stdout.write(orjson.dumps(dataclasses.asdict(report),
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if not report.claimed:
        print(f"{place}: another keeper has this period's pass; nothing done")
        return
    print(f"{place}: checked {report.checked}, refreshed {len(report.refreshed)} idle, "
          f"{len(report.failed)} failed, {len(report.not_valid)} not valid")
    for customer in report.refreshed:
        print(f"  refreshed   {customer}")
    for customer, error in report.failed.items():
        print(f"  failed      {customer} ({error})")
    for customer in report.not_valid:
        print(f"  not valid   {customer}")
