"""Two instances of one store, per store kind, for the ``claim_once`` tests (a plugin:
``pytest_plugins = ["tests.postgres_server", "tests.once_stores"]``). Two instances
stand for two worker processes; the memory store has one process, so both are one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sfrtr import MemoryStore, SqliteStore
from sfrtr.store.base import OnceStore
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.postgres import PostgresStore

STORES = ["memory", "sqlite", "postgres", "etcd"]
Make = Callable[[], OnceStore]


def make_store(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> Make:
    if kind == "memory":
        only = MemoryStore()
        return lambda: only
    if kind == "sqlite":
        return lambda: SqliteStore(tmp_path / "tokens.db")
    if kind == "postgres":
        dsn = request.getfixturevalue("postgres_server").dsn
        schema = request.getfixturevalue("pg_schema")
        return lambda: PostgresStore(dsn, schema=schema, lease_ttl=3, pool_size=2)
    server = request.getfixturevalue("etcd_server")
    namespace = request.getfixturevalue("namespace")
    return lambda: EtcdStore(EtcdSettings(endpoints=[server.endpoint]), namespace=namespace,
                             lease_ttl=3)


@pytest.fixture(params=STORES)
async def pair(request: pytest.FixtureRequest,
               tmp_path: Path) -> AsyncIterator[tuple[str, OnceStore, OnceStore]]:
    make = make_store(request, tmp_path, request.param)
    first, second = make(), make()
    yield request.param, first, second
    for store in {id(first): first, id(second): second}.values():
        await store.aclose()  # type: ignore[attr-defined]
