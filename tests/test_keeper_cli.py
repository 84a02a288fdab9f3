"""``sfrtr keeper`` as a process against a SQLite store and the emulator over real sockets:
each idle grant redeemed exactly once, no reuse, one pass per period, and SIGTERM or
Ctrl-C end it cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import orjson
import pytest

from sfrtr import RefreshPolicy, SqliteStore, TokenManager
from sfrtr.emulator import Emulator
from sfrtr.emulator.server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
from sfrtr.protocol import dead_record
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio

IDLE = ("idle-a", "idle-b", "idle-c")


async def stored_grants(em: Emulator, path: Path) -> None:
    """Three connected grants and one dead record, in the SQLite file at ``path``."""
    manager = TokenManager(emulator_oauth(em), SqliteStore(path), RefreshPolicy())
    try:
        for customer in IDLE:
            await manager.connect(customer, emulator_grant(em, customer))
        state = await manager.store.read("idle-a")
        assert state is not None
        await manager.store.put("gone", dead_record(state.record, "refresh token rejected"))
    finally:
        await manager.aclose()


def keeper_argv(em: Emulator, path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sfrtr", "keeper", "--sqlite", str(path),
            "--client-id", DEFAULT_CLIENT_ID, "--login-url", str(em.base_url), *extra]


ENV = {**os.environ, "SFRTR_CLIENT_SECRET": DEFAULT_CLIENT_SECRET}


async def keeper(em: Emulator, path: Path, *extra: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *keeper_argv(em, path, "--once", *extra), env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def redemptions(em: Emulator) -> list[int]:
    return sorted(c["redemptions"] for c in em.ledger.per_family.values() if c["redemptions"])


async def test_keeper_once_redeems_each_idle_grant_once(emulator: Emulator, tmp_path: Path):
    path = tmp_path / "tokens.db"
    await stored_grants(emulator, path)
    assert redemptions(emulator) == []
    # Just connected: nothing is idle for the default 7 days (another period's key).
    code, out, err = await keeper(emulator, path, "--period", "7200", "--json")
    assert (code, err) == (0, "")
    assert orjson.loads(out) == {"claimed": True, "checked": 4, "refreshed": [],
                                 "not_valid": ["gone"], "failed": {}}
    assert redemptions(emulator) == []
    # Every valid grant counts as idle at 0 days: one redemption each, nothing reused.
    code, out, err = await keeper(emulator, path, "--max-idle-days", "0", "--rate", "50",
                                  "--json")
    assert (code, err) == (0, "")
    report = orjson.loads(out)
    assert sorted(report["refreshed"]) == list(IDLE)
    assert (report["claimed"], report["not_valid"], report["failed"]) == (True, ["gone"], {})
    assert redemptions(emulator) == [1, 1, 1]
    assert emulator.ledger["reuse"] == 0
    assert emulator.ledger["rejected_refreshes"] == 0
    # The same period again: another keeper has it, nothing is redeemed.
    code, out, err = await keeper(emulator, path, "--max-idle-days", "0")
    assert (code, err) == (0, "")
    assert out == f"SQLite at {path}: another keeper has this period's pass; nothing done\n"
    assert redemptions(emulator) == [1, 1, 1]
    async with SqliteStore(path) as store:
        for customer in IDLE:
            state = await store.read(customer)
            assert state is not None
            assert state.record.generation == 1
            assert not state.locked


async def test_keeper_runs_until_sigterm_or_ctrl_c(emulator: Emulator, tmp_path: Path):
    path = tmp_path / "tokens.db"
    await stored_grants(emulator, path)
    # Two periods' keys (3600 s and 7200 s periods): each keeper claims a pass of its own.
    for sig, code, last, period in ((signal.SIGTERM, 0, "sfrtr keeper: stopped", "3600"),
                                    (signal.SIGINT, 130, "sfrtr keeper: interrupted", "7200")):
        process = await asyncio.create_subprocess_exec(
            *keeper_argv(emulator, path, "--max-idle-days", "0", "--rate", "50",
                         "--period", period), env=ENV,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert process.stderr is not None
        lines = []
        # The first pass's log line: the keeper is in its sleep until the next period.
        while not any("keeper: checked 4, refreshed 3 idle" in line for line in lines):
            line = (await asyncio.wait_for(process.stderr.readline(), 60)).decode()
            assert line, lines
            lines.append(line)
        process.send_signal(sig)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert out == b""
        assert process.returncode == code
        assert err.decode().splitlines()[-1] == last
        assert "Traceback" not in err.decode() + "".join(lines)
    # Two passes: each grant redeemed once per pass, always with its current token.
    assert redemptions(emulator) == [2, 2, 2]
    assert emulator.ledger["reuse"] == 0
