"""The ``sfrtr`` command: ``sfrtr demo``, ``sfrtr emulator``."""

from __future__ import annotations

import argparse
import logging

from sfrtr.demo import DemoConfig, main_demo
from sfrtr.emulator import __main__ as emulator_main


def _positive(kind: type[int] | type[float]):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfrtr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a refresh storm against the built-in emulator")
    demo.add_argument("--customers", type=_positive(int), default=20)
    demo.add_argument("--concurrency", type=_positive(int), default=200)
    demo.add_argument("--duration", type=_positive(float), default=10.0, help="seconds")
    demo.add_argument("--expire-every", type=_positive(float), default=2.0,
                      help="expire every session this often, seconds")
    demo.add_argument("--naive", action="store_true",
                      help="refresh without any coordination, to see reuse happen")
    emu = sub.add_parser("emulator", help="serve the Salesforce emulator",
                         parents=[emulator_main.build_parser()], add_help=False)
    emu.set_defaults(command="emulator")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    if args.command == "demo":
        return main_demo(DemoConfig(customers=args.customers, concurrency=args.concurrency,
                                    duration=args.duration, expire_every=args.expire_every,
                                    naive=args.naive))
    emulator_main.serve(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
