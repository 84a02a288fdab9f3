"""``python -m sfrtr.emulator``: serve the emulator on a loopback port."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress

from sfrtr.emulator.server import DEFAULT_CLIENT_ID, Emulator


def _loopback(host: str) -> str:
    try:
        if not ipaddress.ip_address(host).is_loopback:
            raise argparse.ArgumentTypeError(f"{host} is not a loopback address")
    except ValueError:
        if host != "localhost":
            raise argparse.ArgumentTypeError(f"{host} is not a loopback address") from None
    return host


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sfrtr.emulator",
                                description="Serve the sfrtr Salesforce emulator.")
    p.add_argument("--host", type=_loopback, default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--session-timeout", type=float, default=7200.0,
                   help="access-token inactivity timeout, seconds")
    p.add_argument("--customers", type=int, default=0,
                   help="create this many customers (customer-0 ...) with one grant each")
    return p


async def run(args: argparse.Namespace) -> None:
    emulator = Emulator(session_timeout=args.session_timeout)
    async with emulator.serve(args.host, args.port) as url:
        for i in range(args.customers):
            emulator.grant(f"customer-{i}")
        print(f"sfrtr emulator on {url} (client_id {DEFAULT_CLIENT_ID}); Ctrl-C stops it",
              flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    serve(build_parser().parse_args(argv))


def serve(args: argparse.Namespace) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
