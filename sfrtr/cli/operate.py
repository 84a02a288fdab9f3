"""``sfrtr status`` and ``sfrtr clear``: the stored grants, from an operator's shell.

``status`` only reads. On etcd it pages through the namespace with plain Range
calls, so it takes no lease and starts no watch (an operator's look must not add
a session to a loaded cluster), and a record sealed at rest shows without its
key. On SQLite and Postgres it reads through the store (``customers()`` and
``read()``): no customer's lock is taken and nothing is written, but sealed
records need the key ring in ``$SFRTR_KEYS``. ``clear`` writes, through the store.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson

from sfrtr.cli import CommandFailed
from sfrtr.cli.admin import CustomerStatus, clear, list_status, status_rows
from sfrtr.cli.stores import KEYS_ENV, backend, env_sealer, etcd_settings, open_store, where
from sfrtr.errors import RefusedToClear, SfrtrError
from sfrtr.records import Status


def operate(args: argparse.Namespace) -> int:
    """Run ``status`` or ``clear`` as ``args`` say; returns the exit status."""
    name = backend(args)
    place = where(args)
    try:
        if args.command == "status":
            rows = asyncio.run(_status(args, name))
            return _show(args, rows, place)
        cleared = asyncio.run(_clear(args))
    except RefusedToClear as exc:
        hint = "; sfrtr clear --force insists" if exc.forceable else ""
        raise CommandFailed(f"refused: {exc.reason}{hint}") from None
    except (SfrtrError, OSError) as exc:
        if type(exc).__name__ == "SealingError":  # the records are sealed at rest
            raise CommandFailed(f"{place}: {exc} (sfrtr {args.command} reads the workers' key "
                                f"ring from ${KEYS_ENV}: id:base64-key[,...])") from exc
        check = "check --etcd, TLS and credentials" if name == "etcd" else f"check --{name}"
        raise CommandFailed(f"{place}: {exc}; {check}") from exc
    print(f"{args.customer}: " + ("nothing stored" if cleared is None
                                  else f"cleared ({cleared.value})"))
    return 0


async def _status(args: argparse.Namespace, name: str) -> list[CustomerStatus]:
    only = [args.customer] if args.customer is not None else None
    if name == "etcd":
        from sfrtr.store.etcd_client import EtcdClient

        client = EtcdClient(etcd_settings(args))
        try:
            return await status_rows(client, args.namespace, customer=args.customer)
        finally:
            await client.close()
    store = open_store(args, env_sealer())
    try:
        return await list_status(store, only)
    finally:
        await store.aclose()


async def _clear(args: argparse.Namespace) -> Status | None:
    store = open_store(args, env_sealer())
    try:
        return await clear(store, args.customer, force=args.force)
    finally:
        await store.aclose()


def _show(args: argparse.Namespace, rows: list[CustomerStatus], place: str) -> int:
    now = time.time()
    if args.json:
        document = [row.as_json(now) for row in rows]
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.customer is not None:
        if rows:
            _print_one(rows[0], now)
    else:
        _print_table(rows, now, place)
    if args.customer is not None and not rows:
        raise CommandFailed(f"{place}: no record for customer {args.customer!r}")
    return 0


def _print_table(rows: list[CustomerStatus], now: float, place: str) -> None:
    print(f"{'customer':<24} {'status':<16} {'gen':>5} {'locked':<6} "
          f"{'last refresh (UTC)':<20} {'idle d':>6} {'host':<24} {'app':<13} "
          f"{'refresh':<12} reason")
    for row in rows:
        reason = row.reason + (" (rescued tokens wait)" if row.rescued else "")
        print(f"{row.customer:<24} {row.status.value:<16} {row.generation:>5} "
              f"{'yes' if row.locked else 'no':<6} {row.last_refresh():<20} "
              f"{row.idle_days(now):>6.1f} {_host(row):<24} {_app(row):<13} "
              f"{row.refresh_fingerprint:<12} {reason}".rstrip())
    print(f"{len(rows)} customer(s) in {place}")


def _host(row: CustomerStatus) -> str:
    # "-": the workers' own login_url (a grant stored before hosts were recorded).
    return row.token_host.removeprefix("https://") or "-"


def _app(row: CustomerStatus) -> str:
    # Consumer keys run to 85 characters: the table shows their start, --json all;
    # "-": the workers' own app.
    key = row.client_id or "-"
    return key if len(key) <= 13 else key[:10] + "..."


def _print_one(row: CustomerStatus, now: float) -> None:
    fields = [("customer", row.customer), ("status", row.status.value),
              ("reason", row.reason or "-"), ("generation", str(row.generation)),
              ("last refresh", row.last_refresh()),
              ("idle days", f"{row.idle_days(now):.1f}"),
              ("intent", "present" if row.intent else "none"),
              ("lock", "held" if row.locked else "free"),
              ("rescues", str(row.rescues) if row.rescues or not row.rescued else "yes"),
              ("token host", row.token_host or "- (the workers' login_url)"),
              ("app", row.client_id or "- (the workers' client id)"),
              ("refresh token", f"fingerprint {row.refresh_fingerprint}")]
    for label, value in fields:
        print(f"{label + ':':<15}{value}")
