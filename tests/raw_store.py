"""Sealed stores for tests, and the raw bytes each store keeps (what a backup holds)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sfrtr import SqliteStore, TokenStore
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.postgres import PostgresStore
from sfrtr.store.sealing import KeyRing, Sealer

SEALED_KINDS = ["sqlite", "postgres", "etcd"]
"""The stores whose records leave the process (the memory store never writes any)."""


def ring(*names: str, seed: str = "") -> KeyRing:
    """A key ring of deterministic keys named ``names`` (the last seals new writes);
    another ``seed`` gives other keys under the same names."""
    return KeyRing([(n, (f"{seed}{n}" * 32).encode()[:32]) for n in names])


def key_text(*names: str, seed: str = "") -> str:
    """The same keys as :func:`ring`, as ``SFRTR_KEYS`` text."""
    return ",".join(f"{n}:{base64.b64encode((f'{seed}{n}' * 32).encode()[:32]).decode()}"
                    for n in names)


MakeStore = Callable[[KeyRing | None], TokenStore]


def store_maker(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> MakeStore:
    """``make(keys)``: a store of ``kind`` on the test's data, sealed with ``keys``
    (``None``: no sealing); every store made shares the same data."""
    if kind == "sqlite":
        path = tmp_path / "tokens.db"
        return lambda keys: SqliteStore(path, sealer=Sealer(keys) if keys else None)
    if kind == "postgres":
        dsn = request.getfixturevalue("postgres_server").dsn
        schema = request.getfixturevalue("pg_schema")
        return lambda keys: PostgresStore(dsn, schema=schema, lease_ttl=6, pool_size=2,
                                          sealer=Sealer(keys) if keys else None)
    server = request.getfixturevalue("etcd_server")
    namespace = request.getfixturevalue("namespace")
    return lambda keys: EtcdStore(EtcdSettings(endpoints=[server.endpoint]),
                                  namespace=namespace, lease_ttl=6,
                                  sealer=Sealer(keys) if keys else None)


def sqlite_bytes(path: str) -> bytes:
    """The SQLite file and its WAL and shared-memory files, as on disk."""
    return b"".join(Path(path + suffix).read_bytes() for suffix in ("", "-wal", "-shm")
                    if Path(path + suffix).exists())


async def raw_bytes(store: Any) -> bytes:
    """Everything the store keeps, as stored: the SQLite file and its WAL, the
    Postgres tables' rows as text, every etcd value in the namespace."""
    if isinstance(store, SqliteStore):
        return sqlite_bytes(store.path)
    if isinstance(store, PostgresStore):
        n = store.names
        conn = await asyncpg.connect(store.dsn)
        try:
            rows = await conn.fetch(f"SELECT t::text FROM {n.tokens} t UNION ALL "
                                    f"SELECT r::text FROM {n.rescues} r")
        finally:
            await conn.close()
        return "\n".join(row[0] for row in rows).encode()
    assert isinstance(store, EtcdStore)
    _, kvs = await store.client.range(f"{store.namespace}/".encode(), prefix=True)
    return b"\n".join(kv.key + b"=" + kv.value for kv in kvs)
