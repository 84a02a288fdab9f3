"""Listing and clearing grants, as a function and as ``sfrtr status`` / ``sfrtr clear``."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from sfrtr import Secret, Status, TokenRecord
from sfrtr.cli.admin import RefusedToClear, clear, list_status
from sfrtr.protocol import dead_record

pytestmark = pytest.mark.anyio

LIVE = TokenRecord(access_token=Secret("at-live-value"), refresh_token=Secret("rt-live-value"),
                   instance_url="https://x.my.salesforce.com", issued_at=1.0,
                   expires_at=time.time() + 3600, generation=4)


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
    assert out.endswith(f"2 customer(s) under namespace {namespace}\n")
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
