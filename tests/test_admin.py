"""Listing and clearing grants, as a function and as ``sfrtr status`` / ``sfrtr clear``,
on etcd, SQLite and Postgres."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import pytest

from sfrtr import Intent, Secret, SqliteStore, Status, TokenRecord
from sfrtr.cli.admin import RefusedToClear, clear, list_status
from sfrtr.protocol import dead_record

if TYPE_CHECKING:
    from tests.postgres_server import LocalPostgres

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres_server"]  # the postgres_server and pg_schema fixtures

LIVE = TokenRecord(access_token=Secret("at-live-value"), refresh_token=Secret("rt-live-value"),
                   instance_url="https://x.my.salesforce.com", issued_at=1.0,
                   expires_at=time.time() + 3600, generation=4)
TEN_DAYS_AGO = time.time() - 10 * 86_400
SANDBOX = "https://test.salesforce.com"
APP = "3MVG9" + "x" * 80  # a consumer key's length


async def test_list_and_clear(etcd_store):
    await etcd_store.put("alive", LIVE)
    await etcd_store.put("dead", dead_record(LIVE, "refresh token rejected"))
    rows = await list_status(etcd_store)
    assert [(r.customer, r.status, r.generation) for r in rows] == [
        ("alive", Status.VALID, 4), ("dead", Status.REAUTH_REQUIRED, 4)]
    assert rows[1].reason == "refresh token rejected"
    with pytest.raises(RefusedToClear):
        await clear(etcd_store, "alive")
    assert await clear(etcd_store, "dead") is Status.REAUTH_REQUIRED
    assert await clear(etcd_store, "dead") is None
    assert await clear(etcd_store, "alive", force=True) is Status.VALID
    assert await list_status(etcd_store) == []


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sfrtr", *args, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_status_and_clear_show_no_tokens(etcd_server, etcd_store, namespace):
    await etcd_store.put("alive", LIVE)
    await etcd_store.put("dead", dead_record(LIVE, "refresh token rejected"))
    common = ("--etcd", etcd_server.endpoint, "--namespace", namespace)
    # The connection from the environment, as an operator's shell would set it.
    code, out, _ = await run_cli("status", env={"SFRTR_ETCD_ENDPOINTS": etcd_server.endpoint,
                                                "SFRTR_ETCD_NAMESPACE": namespace})
    assert code == 0
    assert "reauth_required" in out
    assert out.endswith(f"2 customer(s) in etcd at {etcd_server.endpoint} "
                        f"(namespace {namespace})\n")
    assert "live-value" not in out
    assert LIVE.refresh_token.fingerprint in out
    code, _, err = await run_cli("clear", "alive", *common)
    assert code == 2
    assert err == ("sfrtr clear: error: refused: customer 'alive' is valid, not "
                   "reauth_required: clearing would discard a live grant; sfrtr clear "
                   "--force insists\n")
    code, out, _ = await run_cli("clear", "dead", *common)
    assert (code, out.strip()) == (0, "dead: cleared (reauth_required)")
    assert [c for c in await etcd_store.customers()] == ["alive"]


def utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def test_status_on_etcd_json_and_one_customer(etcd_server, etcd_store, namespace):
    idle = dataclasses.replace(LIVE, issued_at=TEN_DAYS_AGO, token_host=SANDBOX, client_id=APP)
    await etcd_store.put("acme", idle)
    await etcd_store.put("acme2", dead_record(LIVE, "refresh token rejected"))
    await etcd_store.save_rescue("acme", 7, idle)
    common = ("--etcd", etcd_server.endpoint, "--namespace", namespace)
    code, out, err = await run_cli("status", "--json", *common)
    assert (code, err) == (0, "")
    rows = orjson.loads(out)
    assert [(r["customer"], r["status"], r["generation"], r["reason"]) for r in rows] == [
        ("acme", "valid", 4, ""), ("acme2", "reauth_required", 4, "refresh token rejected")]
    assert rows[0]["last_refresh"] == utc(TEN_DAYS_AGO)
    assert 9.99 < rows[0]["idle_days"] < 10.01
    assert (rows[0]["rescues"], rows[0]["locked"], rows[0]["intent"]) == (1, False, False)
    assert (rows[0]["token_host"], rows[0]["client_id"]) == (SANDBOX, APP)
    assert (rows[1]["token_host"], rows[1]["client_id"]) == ("", "")
    assert "live-value" not in out
    # One customer: its own keys only (acme2 shares the prefix and is not shown).
    code, out, _ = await run_cli("status", "acme", *common)
    assert code == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert {k: v.strip() for k, v in fields.items()} == {
        "customer": "acme", "status": "valid", "reason": "-", "generation": "4",
        "last refresh": utc(TEN_DAYS_AGO), "idle days": "10.0",
        "intent": "none", "lock": "free", "rescues": "1", "token host": SANDBOX,
        "app": APP, "refresh token": f"fingerprint {LIVE.refresh_token.fingerprint}"}
    code, out, _ = await run_cli("status", *common)
    assert code == 0
    acme, acme2 = out.splitlines()[1:3]
    assert acme.split()[7:9] == ["test.salesforce.com", "3MVG9xxxxx..."]
    assert acme2.split()[7:9] == ["-", "-"]  # the workers' own host and app
    code, out, err = await run_cli("status", "nobody", *common)
    assert (code, out) == (2, "")
    assert err == (f"sfrtr status: error: etcd at {etcd_server.endpoint} (namespace "
                   f"{namespace}): no record for customer 'nobody'\n")


async def test_status_on_sqlite_shows_a_held_lock_and_intent(tmp_path: Path):
    path = tmp_path / "tokens.db"
    async with SqliteStore(path) as store:
        v = await store.put("acme", dataclasses.replace(LIVE, issued_at=TEN_DAYS_AGO))
        await store.put("dead", dead_record(LIVE, "refresh token rejected"))
        # A refresh in flight in this (live) process: lock held, intent recorded.
        assert await store.acquire("acme", v.version, Intent("w", "fp", 1.0)) is not None
        code, out, err = await run_cli("status", "acme", "--sqlite", str(path))
        assert (code, err) == (0, "")
        assert "status:        refreshing" in out
        assert "intent:        present" in out
        assert "lock:          held" in out
        assert "idle days:     10.0" in out
        code, out, _ = await run_cli("status", "--sqlite", str(path))
        assert code == 0
        lines = out.splitlines()
        assert lines[0].split() == ["customer", "status", "gen", "locked", "last", "refresh",
                                    "(UTC)", "idle", "d", "host", "app", "refresh", "reason"]
        assert lines[1].split()[:4] == ["acme", "refreshing", "4", "yes"]
        assert lines[2].split()[:4] == ["dead", "reauth_required", "4", "no"]
        assert lines[2].endswith("refresh token rejected")
        assert lines[-1] == f"2 customer(s) in SQLite at {path}"
        assert "live-value" not in out
    code, out, err = await run_cli("status", "--sqlite", str(tmp_path / "typo.db"))
    assert (code, out) == (2, "")
    assert err == (f"sfrtr status: error: no SQLite store at {tmp_path / 'typo.db'}: give "
                   "the file the workers use\n")
    assert not (tmp_path / "typo.db").exists()  # looking created nothing


async def test_status_and_clear_on_postgres(postgres_server: LocalPostgres, pg_schema: str):
    from sfrtr.store.postgres import PostgresStore

    async with PostgresStore(postgres_server.dsn, schema=pg_schema) as store:
        await store.put("alive", LIVE)
        await store.put("dead", dead_record(LIVE, "refresh token rejected"))
        common = ("--postgres", postgres_server.dsn, "--schema", pg_schema)
        code, out, err = await run_cli("status", "--json", *common)
        assert (code, err) == (0, "")
        assert [(r["customer"], r["status"]) for r in orjson.loads(out)] == [
            ("alive", "valid"), ("dead", "reauth_required")]
        code, out, _ = await run_cli("clear", "dead", *common)
        assert (code, out) == (0, "dead: cleared (reauth_required)\n")
        assert await store.customers() == ["alive"]


async def test_two_stores_at_once_is_one_line(tmp_path: Path):
    code, out, err = await run_cli("status", "--sqlite", "x.db", "--etcd", "127.0.0.1:2379")
    assert (code, out) == (2, "")
    assert err == "sfrtr status: error: give one store: --sqlite or --etcd, not both\n"


async def test_status_on_sqlite_opens_sealed_records_with_the_key_ring(tmp_path: Path,
                                                                       monkeypatch):
    import base64

    from sfrtr import KeyRing, Sealer

    path = tmp_path / "tokens.db"
    async with SqliteStore(path, sealer=Sealer(KeyRing([("k1", b"k" * 32)]))) as store:
        await store.put("acme", LIVE)
    monkeypatch.delenv("SFRTR_KEYS", raising=False)  # run_cli passes os.environ on
    code, out, err = await run_cli("status", "--sqlite", str(path))
    assert (code, out) == (2, "")
    assert err.startswith(f"sfrtr status: error: SQLite at {path}: the record of customer "
                          "'acme' is sealed (key 'k1')")
    assert err.endswith("(sfrtr status reads the workers' key ring from $SFRTR_KEYS: "
                        "id:base64-key[,...])\n")
    code, out, err = await run_cli("status", "--json", "--sqlite", str(path), env={
        "SFRTR_KEYS": "k1:" + base64.b64encode(b"k" * 32).decode()})
    assert (code, err) == (0, "")
    [row] = orjson.loads(out)
    assert (row["customer"], row["refresh_fingerprint"]) == (
        "acme", LIVE.refresh_token.fingerprint)
