"""``sfrtr status`` and ``sfrtr clear``: the etcd store's grants, from an operator's shell.

``status`` only reads: it pages through the namespace with plain Range calls, so
it takes no lease and starts no watch (an operator's look must not add a
session to a loaded cluster). ``clear`` writes, through the store itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sfrtr.cli import CommandFailed
from sfrtr.cli.admin import CustomerStatus, clear, status_rows
from sfrtr.errors import RefusedToClear, SfrtrError
from sfrtr.records import Status

if TYPE_CHECKING:
    from sfrtr.store.etcd_client import EtcdSettings

KEYS_ENV = "SFRTR_KEYS"
"""Where ``clear`` finds the key ring of a namespace sealed at rest (the workers'
default too: :data:`sfrtr.store.sealing.ENV_VAR`)."""


def operate(args: argparse.Namespace, *, password: str | None) -> int:
    """Run ``status`` or ``clear`` as ``args`` say; returns the exit status."""
    from sfrtr.store.etcd_client import EtcdSettings

    endpoints: Sequence[str] = args.etcd or _env_endpoints() or ["127.0.0.1:2379"]
    try:
        settings = EtcdSettings(endpoints=list(endpoints), username=args.username,
                                password=password, ca_file=args.ca_file,
                                cert_file=args.cert_file, key_file=args.key_file)
    except SfrtrError as exc:  # e.g. a username without $SFRTR_ETCD_PASSWORD
        raise CommandFailed(f"{exc} (the password comes from $SFRTR_ETCD_PASSWORD)") from None
    where = f"etcd at {', '.join(endpoints)} (namespace {args.namespace})"
    try:
        if args.command == "status":
            rows = asyncio.run(_status(settings, args.namespace))
            _print_status(rows, args.namespace)
            return 0
        cleared = asyncio.run(_clear(settings, args.namespace, args.customer, args.force))
    except RefusedToClear as exc:
        hint = "; sfrtr clear --force insists" if exc.forceable else ""
        raise CommandFailed(f"refused: {exc.reason}{hint}") from None
    except (SfrtrError, OSError) as exc:
        if type(exc).__name__ == "SealingError":  # the records are sealed at rest
            raise CommandFailed(f"{where}: {exc} (sfrtr clear reads the workers' key ring "
                                f"from ${KEYS_ENV}: id:base64-key[,...])") from exc
        raise CommandFailed(f"{where}: {exc}; check --etcd, TLS and credentials") from exc
    print(f"{args.customer}: " + ("nothing stored" if cleared is None
                                  else f"cleared ({cleared.value})"))
    return 0


def _env_endpoints() -> list[str]:
    from sfrtr.cli import ETCD_ENV
    from sfrtr.cli.parsing import endpoint

    raw = [e.strip() for e in os.environ.get(ETCD_ENV + "ENDPOINTS", "").split(",")]
    try:
        return [endpoint(e) for e in raw if e]
    except argparse.ArgumentTypeError as exc:
        raise CommandFailed(f"${ETCD_ENV}ENDPOINTS: {exc}") from None


async def _status(settings: EtcdSettings, namespace: str) -> list[CustomerStatus]:
    from sfrtr.store.etcd_client import EtcdClient

    client = EtcdClient(settings)
    try:
        return await status_rows(client, namespace)
    finally:
        await client.close()


async def _clear(settings: EtcdSettings, namespace: str, customer: str,
                 force: bool) -> Status | None:
    from sfrtr.store.etcd import EtcdStore

    sealer = None
    if os.environ.get(KEYS_ENV):  # the workers seal records at rest: open them as they do
        from sfrtr.store.sealing import KeyRing, Sealer

        sealer = Sealer(KeyRing.from_env(KEYS_ENV))
    store = EtcdStore(settings, namespace=namespace, sealer=sealer)
    try:
        return await clear(store, customer, force=force)
    finally:
        await store.aclose()


def _print_status(rows: list[CustomerStatus], namespace: str) -> None:
    print(f"{'customer':<32} {'status':<16} {'gen':>5} {'locked':<6} {'refresh':<12} reason")
    for row in rows:
        reason = row.reason + (" (rescued tokens wait)" if row.rescued else "")
        print(f"{row.customer:<32} {row.status.value:<16} {row.generation:>5} "
              f"{'yes' if row.locked else 'no':<6} {row.refresh_fingerprint:<12} {reason}")
    print(f"{len(rows)} customer(s) under namespace {namespace}", file=sys.stdout)
