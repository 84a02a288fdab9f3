"""The ``sfrtr`` command: demo, emulator, status, clear, keeper, rekey, migrate.

Exit status: 0 when the command did its job (for the demo: every invariant
held); 1 when the demo ran and an invariant did not hold (``--naive`` locks
customers out on purpose, so it exits 1), or ``rekey`` left busy records; 2
when the command could not do its job as asked (a bad option, a missing extra,
a server that cannot be reached, a port in use, a refusal): one line on stderr
says what was wrong and what to do, and ``-v`` adds the traceback; 130 after
Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import traceback

from sfrtr.cli import parsing
from sfrtr.cli.parsing import HelpFormatter, OneLineParser

ETCD_ENV = "SFRTR_ETCD_"
"""Prefix of the environment variables the store commands read their etcd
connection from (``SFRTR_ETCD_ENDPOINTS``, ``SFRTR_ETCD_PASSWORD``...)."""

_EXTRAS = {"etcd": ("aetcd", "grpc"), "postgres": ("asyncpg",), "encryption": ("cryptography",)}

_DESCRIPTION = """\
Share Salesforce OAuth grants safely across asyncio workers under Refresh Token
Rotation. These commands show it working (demo, emulator) and operate the
stored grants (status, clear, keeper, rekey, migrate).

exit status: 0 done (demo: the invariants held); 1 the demo saw an invariant
broken (--naive does, on purpose), or rekey left busy records to do again; 2 the
command could not run as asked (one line says why; -v shows the traceback);
130 interrupted."""


class CommandFailed(Exception):
    """A command cannot do its job as asked; ``str()`` is the one line to print."""


def _verbose_flag(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's own default must not overwrite a -v given before it.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log debug messages, and show the traceback of a failure")


def build_parser(for_command: str | None = None) -> argparse.ArgumentParser:
    """The ``sfrtr`` argument parser (every subcommand, with its help and defaults).

    ``for_command``: the subcommand about to be parsed, when known; the emulator's options
    (which import the emulator, and aiohttp with it) are then added only for
    ``emulator``, so that ``sfrtr --version`` or ``sfrtr status`` start fast."""
    from sfrtr import __version__
    from sfrtr.cli.stores import ENV_HELP, add_store_options

    parser = OneLineParser(prog="sfrtr", description=_DESCRIPTION,
                           formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"sfrtr {__version__}")
    _verbose_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=description,
                           formatter_class=HelpFormatter)
        _verbose_flag(p)
        return p

    _demo_options(command(
        "demo", "a refresh storm against the built-in Salesforce emulator",
        "Run many coroutines calling the Salesforce REST API for a few seconds while the\n"
        "built-in emulator expires every session every --expire-every seconds. With\n"
        "sfrtr each expiry costs one refresh per customer and nobody is locked out;\n"
        "--naive shows what uncoordinated workers do to the same customers."))
    emulator = command(
        "emulator", "serve the Salesforce emulator on a loopback port",
        "Serve the Salesforce emulator (token endpoint, REST API) until Ctrl-C. With\n"
        "--customers N it creates N customers with one grant each and prints the\n"
        "client id and secret, and each grant's refresh token (the emulator's own test\n"
        "data, not a real credential).")
    if for_command in (None, "emulator"):
        _emulator_options(emulator)
    status = command(
        "status", "list customers and the status of their grants (never token values)",
        "List every customer of a store with its grant status, generation, lock state,\n"
        "last refresh (UTC), idle days and refresh-token fingerprint; with CUSTOMER, one\n"
        "record's fields. Reads only: on etcd it takes no lease and shows records sealed\n"
        "at rest without their key; on SQLite or Postgres it reads through the store\n"
        "(no lock taken, nothing written) and opens sealed records with $SFRTR_KEYS.\n\n"
        + ENV_HELP)
    add_store_options(status)
    status.add_argument("customer", nargs="?", type=parsing.customer, default=None,
                        help="show this customer's record only")
    status.add_argument("--json", action="store_true",
                        help="print one JSON document (a list of objects) instead of a table")
    clear = command(
        "clear", "delete a customer's dead (reauth_required) record",
        "Delete a customer's record once it is reauth_required and the customer has\n"
        "re-authorized the app. A record in any other status holds a live grant and\n"
        "is kept unless --force is given. Records sealed at rest are opened with the\n"
        "key ring in SFRTR_KEYS.\n\n" + ENV_HELP)
    add_store_options(clear)
    clear.add_argument("customer", type=parsing.customer, help="the customer to clear")
    clear.add_argument("--force", action="store_true",
                       help="clear even a record that is not reauth_required (discards a "
                            "live grant: the customer must re-authorize)")
    keeper = command(
        "keeper", "keep idle grants alive: refresh those unused for --max-idle-days",
        "Refresh every valid grant whose last refresh is older than --max-idle-days,\n"
        "through the same lock, fencing and intent as the workers (never a second\n"
        "redemption), at most --rate per second. One pass per --period across the fleet\n"
        "(claimed in the store): several keepers may run, one works per period. Runs\n"
        "until SIGTERM (exit 0) or Ctrl-C (130); --once runs one pass and prints what it\n"
        "did. The connected app: --client-id or $SFRTR_CLIENT_ID, the secret from\n"
        "$SFRTR_CLIENT_SECRET only, --login-url or $SFRTR_LOGIN_URL. Records sealed at\n"
        "rest are opened with the key ring in SFRTR_KEYS.\n\n" + ENV_HELP)
    add_store_options(keeper)
    _keeper_options(keeper)
    rekey = command(
        "rekey", "re-seal every record with the newest key of $SFRTR_KEYS",
        "Re-seal every record (and rescue entry) of a store sealed at rest with the\n"
        "newest key of the key ring in SFRTR_KEYS (id:base64-key[,...], newest last), as\n"
        "step 4 of the key rotation runbook (docs/security.md). Each record is written\n"
        "back with a compare on its version: a refresh that moves first wins. Records a\n"
        "refresh held throughout are reported busy (exit status 1): run it again.\n\n"
        + ENV_HELP)
    add_store_options(rekey)
    rekey.add_argument("--busy-wait", type=parsing.seconds, default=2.0,
                       help="seconds to wait for a record a refresh holds, five times, "
                            "before reporting it busy")
    migrate = command(
        "migrate", "create or upgrade the Postgres store's tables",
        "Create or upgrade the Postgres store's schema, for teams that apply DDL\n"
        "themselves (the store otherwise does it on first use).")
    migrate.add_argument("--postgres", required=True, metavar="DSN",
                         help="a libpq URL or keyword string")
    migrate.add_argument("--schema", default="public", help="the schema of the tables")
    migrate.add_argument("--prefix", default="sfrtr", help="the tables' name prefix")
    migrate.add_argument("--print-sql", action="store_true",
                         help="print the SQL instead of running it")
    return parser


def _demo_options(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--customers", type=parsing.positive_int, default=20,
                      help="customers (orgs), each with one grant")
    demo.add_argument("--concurrency", type=parsing.positive_int, default=200,
                      help="coroutines calling the API (split over --processes)")
    demo.add_argument("--duration", type=parsing.seconds, default=10.0,
                      help="seconds of load")
    demo.add_argument("--expire-every", type=parsing.seconds, default=2.0,
                      help="seconds between two expiries of every session")
    demo.add_argument("--naive", action="store_true",
                      help="refresh without any coordination (whoever sees a 401 refreshes), "
                           "to see customers locked out; exits 1")
    demo.add_argument("--processes", type=parsing.positive_int, default=None,
                      help="run the load from this many processes sharing one store "
                           "(default: 1; the store is then SQLite, a temporary file)")
    demo.add_argument("--store", choices=("memory", "sqlite", "postgres", "etcd"), default=None,
                      help="the store: memory (one process only), sqlite, postgres (needs "
                           "the postgres extra), etcd (needs the etcd extra) (default: memory "
                           "in one process, sqlite with --processes)")
    demo.add_argument("--etcd", metavar="HOST:PORT", type=parsing.endpoint, default=None,
                      help="the etcd of --store etcd (default: start a local one)")
    demo.add_argument("--postgres", metavar="DSN", default=None,
                      help="the Postgres of --store postgres (the demo works in a schema "
                           "of its own and drops it at the end)")


def _emulator_options(p: argparse.ArgumentParser) -> None:
    from sfrtr.emulator.__main__ import add_options

    add_options(p)


def _keeper_options(p: argparse.ArgumentParser) -> None:
    from sfrtr.cli.keeper_command import add_options

    add_options(p)


def main(argv: list[str] | None = None) -> int:
    """Run ``sfrtr`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    # The first word that is not an option names the subcommand (no top-level option
    # takes a value).
    first = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(first).parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    prog = f"sfrtr {args.command}"
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        # asyncio.run cancels the main task on Ctrl-C: the CancelledError it chains
        # says nothing a user can act on.
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        return parsing.fail(prog, _one_line(exc))


def _one_line(exc: BaseException) -> str:
    from sfrtr.errors import MissingExtra, SfrtrError

    if isinstance(exc, CommandFailed | MissingExtra | SfrtrError | ValueError):
        text = str(exc)
    elif isinstance(exc, ModuleNotFoundError) and exc.name:
        extra = next((e for e, mods in _EXTRAS.items() if exc.name.split(".")[0] in mods), None)
        text = (f"needs the {extra} extra: pip install 'sfrtr[{extra}]'" if extra
                else f"a module is missing: {exc.name}")
    else:
        first = str(exc).splitlines()[0] if str(exc) else ""
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


def require_extra(extra: str, what: str) -> None:
    """Raise :class:`CommandFailed` naming ``pip install 'sfrtr[extra]'`` when its modules
    are absent (checked before anything starts, not as a traceback half-way)."""
    missing = [m for m in _EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise CommandFailed(f"{what} needs the {extra} extra, which is not installed: "
                            f"pip install 'sfrtr[{extra}]'")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from sfrtr.cli.demo_command import run_demo_command

        return run_demo_command(args)
    if args.command == "emulator":
        from sfrtr.emulator.__main__ import serve

        return serve(args)
    if args.command in ("status", "clear"):
        from sfrtr.cli.operate import operate

        return operate(args)
    if args.command == "keeper":
        from sfrtr.cli.keeper_command import run_keeper

        return run_keeper(args)
    if args.command == "rekey":
        from sfrtr.cli.rekey_command import run_rekey

        return run_rekey(args)
    return _migrate(args)


def _migrate(args: argparse.Namespace) -> int:
    from sfrtr.store.postgres_schema import Names, migration_script

    try:
        names = Names(args.schema, args.prefix)
    except ValueError as exc:
        raise CommandFailed(f"{exc}") from None
    if args.print_sql:
        print(migration_script(names), end="")
        return 0
    require_extra("postgres", "the Postgres store")
    import asyncio

    from sfrtr.store.postgres import migrate, redact_dsn

    where = redact_dsn(args.postgres)
    try:
        version = asyncio.run(migrate(args.postgres, schema=args.schema, prefix=args.prefix))
    except Exception as exc:  # asyncpg's own errors too: the class and primary message only
        raise CommandFailed(f"Postgres at {where}: {_one_line(exc)}") from exc
    print(f"{where}: schema {args.schema!r} prefix {args.prefix!r} at version {version}")
    return 0


__all__ = ["CommandFailed", "build_parser", "main", "require_extra"]
