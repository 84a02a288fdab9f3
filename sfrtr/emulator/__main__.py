"""``sfrtr emulator`` (also ``python -m sfrtr.emulator``): serve the emulator on a
loopback port, optionally with customers and their grants, until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import sys

from sfrtr.cli import parsing
from sfrtr.emulator.server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator


def _loopback(host: str) -> str:
    try:
        if not ipaddress.ip_address(host).is_loopback:
            raise argparse.ArgumentTypeError(
                f"{host} is not a loopback address: the emulator serves this machine only "
                "(use 127.0.0.1, ::1 or localhost)")
    except ValueError:
        if host != "localhost":
            raise argparse.ArgumentTypeError(
                f"{host} is not a loopback address: the emulator serves this machine only "
                "(use 127.0.0.1, ::1 or localhost)") from None
    return host


def add_options(p: argparse.ArgumentParser) -> None:
    """The emulator's options, on ``p`` (``sfrtr emulator`` and ``python -m sfrtr.emulator``)."""
    p.add_argument("--host", type=_loopback, default="127.0.0.1",
                   help="a loopback address to listen on")
    p.add_argument("--port", type=parsing.port, default=8765,
                   help="the port to listen on (0: any free port)")
    p.add_argument("--session-timeout", type=parsing.seconds, default=7200.0,
                   help="seconds of inactivity after which an access token expires")
    p.add_argument("--customers", type=parsing.non_negative_int, default=0,
                   help="create this many customers (customer-0, customer-1...) with one "
                        "grant each, and print their refresh tokens")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m sfrtr.emulator``."""
    p = parsing.OneLineParser(prog="python -m sfrtr.emulator",
                              description="Serve the sfrtr Salesforce emulator.",
                              formatter_class=parsing.HelpFormatter)
    add_options(p)
    return p


class PortUnavailable(Exception):
    """The port cannot be listened on; ``str()`` says why and what to do."""


async def run(args: argparse.Namespace) -> None:
    """Serve until cancelled, after printing how to connect (and the grants made)."""
    emulator = Emulator(session_timeout=args.session_timeout)
    async with contextlib.AsyncExitStack() as stack:
        try:
            url = await stack.enter_async_context(emulator.serve(args.host, args.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortUnavailable(f"port {args.port} on {args.host} is in use: stop what "
                                      "listens there, or pick another with --port (0: any "
                                      "free port)") from None
            raise PortUnavailable(f"cannot listen on {args.host}:{args.port}: "
                                  f"{exc.strerror or exc}") from None
        print(f"sfrtr emulator on {url}\n"
              f"  login URL      {url}\n"
              f"  client id      {DEFAULT_CLIENT_ID}\n"
              f"  client secret  {DEFAULT_CLIENT_SECRET}", flush=True)
        if args.customers:
            print("  grants (the emulator's own test data, not real credentials; each "
                  "refresh token works once, as under Salesforce's rotation):", flush=True)
            for i in range(args.customers):
                answer = emulator.grant(f"customer-{i}")
                print(f"    customer-{i}  refresh_token {answer['refresh_token']}", flush=True)
        print("Ctrl-C stops it", flush=True)
        await asyncio.Event().wait()


def serve(args: argparse.Namespace) -> int:
    """Run the emulator until Ctrl-C; returns the exit status (2: the port is unusable)."""
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(args))
    except PortUnavailable as exc:
        return parsing.fail("sfrtr emulator", str(exc))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sfrtr.emulator``."""
    return serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
