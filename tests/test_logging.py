"""Logging conventions: module loggers, a silent package logger, structured fields."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from sfrtr import MemoryStore, RefreshPolicy, TokenManager
from sfrtr.emulator import Emulator
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio

PACKAGE = Path(__file__).resolve().parent.parent / "sfrtr"


def test_every_module_logs_under_its_own_name():
    named_otherwise = []
    loggers = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # a module's own logger
            call = node.value if isinstance(node, ast.Assign) else None
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "getLogger"):
                continue
            loggers += 1
            by_name = len(call.args) == 1 and isinstance(call.args[0], ast.Name) and \
                call.args[0].id == "__name__"
            if not by_name:
                named_otherwise.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert loggers >= 8  # the manager, the stores, the OAuth client, the web flow, ...
    assert named_otherwise == []


def test_the_package_logger_prints_nothing_by_itself():
    handlers = logging.getLogger("sfrtr").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


async def test_manager_records_carry_customer_worker_and_fingerprint(
        emulator: Emulator, caplog: pytest.LogCaptureFixture):
    manager = TokenManager(emulator_oauth(emulator), MemoryStore(), RefreshPolicy(),
                           worker_id="worker-7")
    try:
        with caplog.at_level(logging.INFO, logger="sfrtr.manager"):
            record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    finally:
        await manager.aclose()
    connected = [r for r in caplog.records if "connected" in r.getMessage()]
    assert len(connected) == 1
    entry = connected[0]
    assert entry.name == "sfrtr.manager"
    assert entry.customer == "acme"  # type: ignore[attr-defined]
    assert entry.worker == "worker-7"  # type: ignore[attr-defined]
    assert entry.token_fingerprint == record.refresh_token.fingerprint  # type: ignore[attr-defined]
    assert record.refresh_token.reveal() not in str(vars(entry))
