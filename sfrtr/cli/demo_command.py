"""``sfrtr demo``'s options turned into a run: the store chosen, what it needs
checked before anything starts, the exit status from the verdict."""

from __future__ import annotations

import argparse
import asyncio

from sfrtr.cli import CommandFailed, require_extra
from sfrtr.cli.demo import DemoConfig, main_demo


def choose_store(args: argparse.Namespace) -> str:
    """The demo's store; :class:`CommandFailed` (one line) when the options conflict."""
    store: str = args.store or ("etcd" if args.etcd else "postgres" if args.postgres else
                                "sqlite" if args.processes else "memory")
    problem = None
    if args.naive and (args.processes or store != "memory"):
        problem = "--naive uses no store and runs in one process; drop --processes and --store"
    elif store == "memory" and (args.processes or 1) > 1:
        problem = ("the memory store lives in one process and cannot be shared: with "
                   "--processes use --store sqlite (no server) or --store etcd")
    elif store == "postgres" and not args.postgres:
        problem = ("--store postgres needs --postgres DSN (a database the demo may create a "
                   "schema in)")
    elif args.etcd and store != "etcd":
        problem = f"--etcd is for --store etcd, not --store {store}"
    elif args.postgres and store != "postgres":
        problem = f"--postgres is for --store postgres, not --store {store}"
    if problem is not None:
        raise CommandFailed(problem)
    if store == "etcd":
        require_extra("etcd", "--store etcd")
    elif store == "postgres":
        require_extra("postgres", "--store postgres")
    return store


def run_demo_command(args: argparse.Namespace) -> int:
    """Run ``sfrtr demo`` as ``args`` say; the exit status says whether the invariants held."""
    store = choose_store(args)
    config = DemoConfig(customers=args.customers, concurrency=args.concurrency,
                        duration=args.duration, expire_every=args.expire_every,
                        naive=args.naive)
    if not config.expiry_times():
        raise CommandFailed(f"no session would expire: --duration {args.duration:g} leaves no "
                            f"room for an expiry every {args.expire_every:g} s (the last half "
                            "second has none); make --duration longer or --expire-every shorter")
    if store == "memory":
        return main_demo(config)
    from sfrtr.cli import demo_processes
    from sfrtr.errors import StoreError

    try:
        figures = asyncio.run(demo_processes.run_processes(
            config, args.processes or 1, args.etcd, store=store, postgres=args.postgres))
    except StoreError as exc:
        if store != "etcd" or not args.etcd:
            raise
        raise CommandFailed(f"etcd at {args.etcd}: {exc}; is etcd running there? (without "
                            "--etcd the demo starts a local one)") from exc
    return 0 if figures["reuse"] == 0 and figures["revocations"] == 0 else 1


__all__ = ["CommandFailed", "choose_store", "run_demo_command"]
