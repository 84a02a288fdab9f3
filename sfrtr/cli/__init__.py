"""The ``sfrtr`` command: ``sfrtr demo``, ``sfrtr emulator``, ``sfrtr migrate``..."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from sfrtr import admin
from sfrtr.demo import DemoConfig, main_demo
from sfrtr.emulator import __main__ as emulator_main
from sfrtr.errors import SfrtrError


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
    demo.add_argument("--processes", type=_positive(int), default=None,
                      help="run the load from this many processes on a shared store "
                           "(default store: SQLite, a temporary file, no server)")
    demo.add_argument("--store", choices=("memory", "sqlite", "postgres", "etcd"), default=None,
                      help="the store (default: memory in one process, sqlite with "
                           "--processes; etcd with --etcd, postgres with --postgres)")
    demo.add_argument("--etcd", metavar="HOST:PORT", default=None,
                      help="etcd for --store etcd (default: start a local one)")
    demo.add_argument("--postgres", metavar="DSN", default=None,
                      help="Postgres for --store postgres (the demo creates a schema of its "
                           "own there and drops it at the end)")
    etcd_options = argparse.ArgumentParser(add_help=False)
    etcd_options.add_argument("--etcd", action="append", required=True, metavar="HOST:PORT",
                              help="an etcd endpoint (repeat for several)")
    etcd_options.add_argument("--namespace", default="sfrtr")
    sub.add_parser("status", parents=[etcd_options],
                   help="list customers and their grant status (never token values)")
    clear = sub.add_parser("clear", parents=[etcd_options],
                           help="delete a reauth_required record after re-authorization")
    clear.add_argument("customer")
    clear.add_argument("--force", action="store_true",
                       help="clear even a record that is not reauth_required")
    migrate = sub.add_parser("migrate", help="create or migrate the Postgres store's schema "
                             "(for teams that apply DDL themselves)")
    migrate.add_argument("--postgres", required=True, metavar="DSN",
                         help="a libpq URL or keyword string")
    migrate.add_argument("--schema", default="public")
    migrate.add_argument("--prefix", default="sfrtr", help="table name prefix")
    migrate.add_argument("--print-sql", action="store_true",
                         help="print the SQL instead of running it")
    emu = sub.add_parser("emulator", help="serve the Salesforce emulator",
                         parents=[emulator_main.build_parser()], add_help=False)
    emu.set_defaults(command="emulator")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    if args.command == "demo":
        store = _demo_store(args)
        if store is None:
            return 2
        if store != "memory":
            return _demo_processes(args, store)
        return main_demo(DemoConfig(customers=args.customers, concurrency=args.concurrency,
                                    duration=args.duration, expire_every=args.expire_every,
                                    naive=args.naive))
    if args.command in ("status", "clear"):
        return asyncio.run(_operate(args))
    if args.command == "migrate":
        return _migrate(args)
    emulator_main.serve(args)
    return 0


def _demo_store(args: argparse.Namespace) -> str | None:
    """The demo's store, or ``None`` after printing (one line) why the options conflict."""
    store = args.store
    if store is None:
        store = ("etcd" if args.etcd else "postgres" if args.postgres else
                 "sqlite" if args.processes else "memory")
    problem = None
    if args.naive and (args.processes or store != "memory"):
        problem = "--naive uses no store and runs in one process; drop --processes and --store"
    elif store == "memory" and (args.processes or 1) > 1:
        problem = ("the memory store lives in one process and cannot be shared: with "
                   "--processes use --store sqlite (no server) or --store etcd")
    elif store == "postgres" and not args.postgres:
        problem = "--store postgres needs --postgres DSN (a database the demo may create a " \
                  "schema in)"
    elif args.etcd and store != "etcd":
        problem = f"--etcd is for --store etcd, not --store {store}"
    elif args.postgres and store != "postgres":
        problem = f"--postgres is for --store postgres, not --store {store}"
    if problem is not None:
        print(f"sfrtr demo: error: {problem}", file=sys.stderr)
        return None
    return str(store)


def _demo_processes(args: argparse.Namespace, store: str) -> int:
    from sfrtr.demo_processes import run_processes

    config = DemoConfig(customers=args.customers, concurrency=args.concurrency,
                        duration=args.duration, expire_every=args.expire_every)
    try:
        figures = asyncio.run(run_processes(config, args.processes or 1, args.etcd,
                                            store=store, postgres=args.postgres))
    except Exception as exc:  # asyncpg's own errors too: the class and primary message only
        if args.verbose:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"sfrtr demo: error: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    return 0 if figures["reuse"] == 0 and figures["revocations"] == 0 else 1


def _migrate(args: argparse.Namespace) -> int:
    from sfrtr.store.postgres_schema import Names, migration_script

    try:
        names = Names(args.schema, args.prefix)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_sql:
        print(migration_script(names), end="")
        return 0
    from sfrtr.store.postgres import migrate, redact_dsn

    try:
        version = asyncio.run(migrate(args.postgres, schema=args.schema, prefix=args.prefix))
    except (OSError, SfrtrError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # asyncpg's own errors: the class and primary message only
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    print(f"{redact_dsn(args.postgres)}: schema {args.schema!r} prefix {args.prefix!r} at "
          f"version {version}")
    return 0


async def _operate(args: argparse.Namespace) -> int:
    from sfrtr.store.etcd import EtcdStore
    from sfrtr.store.etcd_client import EtcdSettings

    store = EtcdStore(EtcdSettings(endpoints=args.etcd), namespace=args.namespace)
    try:
        if args.command == "status":
            rows = await admin.list_status(store)
            print(f"{'customer':<32} {'status':<16} {'gen':>5} {'locked':<6} "
                  f"{'refresh':<12} reason")
            for row in rows:
                print(f"{row.customer:<32} {row.status.value:<16} {row.generation:>5} "
                      f"{'yes' if row.locked else 'no':<6} {row.refresh_fingerprint:<12} "
                      f"{row.reason}")
            print(f"{len(rows)} customer(s)")
            return 0
        try:
            cleared = await admin.clear(store, args.customer, force=args.force)
        except admin.RefusedToClear as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 2
        print(f"{args.customer}: " + ("nothing stored" if cleared is None
                                      else f"cleared ({cleared.value})"))
        return 0
    except SfrtrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.aclose()


if __name__ == "__main__":
    raise SystemExit(main())
