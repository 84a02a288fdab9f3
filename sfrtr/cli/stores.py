"""Which store a command works on: ``--etcd`` (the default), ``--sqlite PATH`` or
``--postgres DSN``, with the etcd connection options and ``SFRTR_ETCD_*``.

Records sealed at rest are opened with the workers' key ring from ``$SFRTR_KEYS``
when it is set (``status`` on etcd needs no key at all).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sfrtr.cli import ETCD_ENV, parsing

if TYPE_CHECKING:
    from sfrtr.store.base import TokenStore
    from sfrtr.store.etcd_client import EtcdSettings
    from sfrtr.store.sealing import Sealer

KEYS_ENV = "SFRTR_KEYS"
"""Where the key ring of records sealed at rest comes from (the workers' default
too: :data:`sfrtr.store.sealing.ENV_VAR`)."""

ENV_HELP = """\
The store is etcd unless --sqlite or --postgres is given. Every etcd option can come
from the environment instead: SFRTR_ETCD_ENDPOINTS (comma-separated),
SFRTR_ETCD_NAMESPACE, SFRTR_ETCD_CA_FILE, SFRTR_ETCD_CERT_FILE, SFRTR_ETCD_KEY_FILE,
SFRTR_ETCD_USERNAME and SFRTR_ETCD_PASSWORD (the password is read only from the
environment: a command line is visible to every user)."""


def add_store_options(p: argparse.ArgumentParser) -> None:
    """``--sqlite``, ``--postgres`` (with ``--schema``, ``--prefix``) and the etcd options."""
    env = os.environ
    p.add_argument("--sqlite", metavar="PATH", default=None,
                   help="the SQLite store's file (SqliteStore(path)); it must exist")
    p.add_argument("--postgres", metavar="DSN", default=None,
                   help="the Postgres store's database, a libpq URL or keyword string")
    p.add_argument("--schema", default="public", help="the Postgres store's schema")
    p.add_argument("--prefix", default="sfrtr", help="the Postgres store's table name prefix")
    p.add_argument("--etcd", action="append", type=parsing.endpoint, metavar="HOST:PORT",
                   default=None,
                   help="an etcd endpoint; repeat for several (default: $SFRTR_ETCD_ENDPOINTS, "
                        "else 127.0.0.1:2379)")
    p.add_argument("--namespace", type=parsing.namespace,
                   default=env.get(ETCD_ENV + "NAMESPACE", "sfrtr"),
                   help="the etcd key prefix the workers use (EtcdStore(namespace=...))")
    p.add_argument("--ca-file", default=env.get(ETCD_ENV + "CA_FILE"),
                   help="CA bundle for TLS (TLS is on when any of the three files is given)")
    p.add_argument("--cert-file", default=env.get(ETCD_ENV + "CERT_FILE"),
                   help="client certificate for TLS")
    p.add_argument("--key-file", default=env.get(ETCD_ENV + "KEY_FILE"),
                   help="client key for TLS")
    p.add_argument("--username", default=env.get(ETCD_ENV + "USERNAME"),
                   help="etcd user (the password comes from $SFRTR_ETCD_PASSWORD)")


def backend(args: argparse.Namespace) -> str:
    """``etcd``, ``sqlite`` or ``postgres``; one line (:class:`CommandFailed`) when the
    options name two, or a SQLite file that does not exist (opening it would create an
    empty store, and a typo would look like a store without customers)."""
    from sfrtr.cli import CommandFailed, require_extra

    chosen = [name for name, value in (("sqlite", args.sqlite), ("postgres", args.postgres),
                                       ("etcd", args.etcd)) if value]
    if len(chosen) > 1:
        raise CommandFailed(f"give one store: --{chosen[0]} or --{chosen[1]}, not both")
    name = chosen[0] if chosen else "etcd"
    if name == "sqlite" and not os.path.isfile(args.sqlite):
        raise CommandFailed(f"no SQLite store at {args.sqlite}: give the file the workers use")
    if name == "etcd":
        require_extra("etcd", "the etcd store")
    elif name == "postgres":
        require_extra("postgres", "the Postgres store")
    return name


def where(args: argparse.Namespace) -> str:
    """The store, named for an error line (a DSN without its password)."""
    name = backend(args)
    if name == "sqlite":
        return f"SQLite at {args.sqlite}"
    if name == "postgres":
        from sfrtr.store.postgres import redact_dsn

        return f"Postgres at {redact_dsn(args.postgres)} (schema {args.schema})"
    return f"etcd at {', '.join(endpoints(args))} (namespace {args.namespace})"


def endpoints(args: argparse.Namespace) -> Sequence[str]:
    """``--etcd``, else ``$SFRTR_ETCD_ENDPOINTS``, else the local default."""
    from sfrtr.cli import CommandFailed

    if args.etcd:
        return list(args.etcd)
    raw = [e.strip() for e in os.environ.get(ETCD_ENV + "ENDPOINTS", "").split(",")]
    try:
        return [parsing.endpoint(e) for e in raw if e] or ["127.0.0.1:2379"]
    except argparse.ArgumentTypeError as exc:
        raise CommandFailed(f"${ETCD_ENV}ENDPOINTS: {exc}") from None


def etcd_settings(args: argparse.Namespace) -> EtcdSettings:
    """The etcd connection ``args`` and the environment describe."""
    from sfrtr.cli import CommandFailed
    from sfrtr.errors import SfrtrError
    from sfrtr.store.etcd_client import EtcdSettings

    try:
        return EtcdSettings(endpoints=list(endpoints(args)), username=args.username,
                            password=os.environ.get(ETCD_ENV + "PASSWORD"),
                            ca_file=args.ca_file, cert_file=args.cert_file,
                            key_file=args.key_file)
    except SfrtrError as exc:  # e.g. a username without $SFRTR_ETCD_PASSWORD
        raise CommandFailed(f"{exc} (the password comes from $SFRTR_ETCD_PASSWORD)") from None


def env_sealer(*, required: bool = False) -> Sealer | None:
    """A sealer over the key ring in ``$SFRTR_KEYS``; ``None`` when it is not set (unless
    ``required``: then :class:`~sfrtr.SealingError` says how to set it)."""
    if not required and not os.environ.get(KEYS_ENV):
        return None
    from sfrtr.store.sealing import KeyRing, Sealer

    return Sealer(KeyRing.from_env(KEYS_ENV))


def open_store(args: argparse.Namespace, sealer: Sealer | None) -> TokenStore:
    """The store ``args`` name, not started yet (the caller closes it)."""
    name = backend(args)
    if name == "sqlite":
        from sfrtr.store.sqlite import SqliteStore

        return SqliteStore(args.sqlite, sealer=sealer)
    if name == "postgres":
        from sfrtr.store.postgres import PostgresStore

        # An operator's command must not create the tables in a mistyped schema.
        return PostgresStore(args.postgres, schema=args.schema, prefix=args.prefix,
                             create_schema=False, pool_size=2, sealer=sealer)
    from sfrtr.store.etcd import EtcdStore

    return EtcdStore(etcd_settings(args), namespace=args.namespace, sealer=sealer)


__all__ = ["ENV_HELP", "ETCD_ENV", "KEYS_ENV", "add_store_options", "backend", "endpoints",
           "env_sealer", "etcd_settings", "open_store", "where"]
