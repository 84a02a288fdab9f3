"""``sfrtr rekey`` on SQLite and etcd: records (and rescue entries) sealed under an old
key open with the new key alone afterwards; a missing or wrong key ring is one line,
exit status 2, and leaves the records as they were."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sfrtr import KeyRing, Sealer, SealingError, Secret, SqliteStore, TokenRecord
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcd

pytestmark = pytest.mark.anyio

OLD, NEW = b"o" * 32, b"n" * 32
CUSTOMERS = ("acme", "globex/eu")


def ring_text(*keys: tuple[str, bytes]) -> str:
    return ",".join(f"{key_id}:{base64.b64encode(raw).decode()}" for key_id, raw in keys)


def record(n: int) -> TokenRecord:
    return TokenRecord(access_token=Secret(f"at-{n}"), refresh_token=Secret(f"rt-{n}"),
                       instance_url="https://x.my.salesforce.com", issued_at=1.0,
                       expires_at=4e9, generation=n)


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, etcd_server: LocalEtcd,
            namespace: str) -> tuple[Callable[[Sealer], Any], list[str], str]:
    """Makes a store with a given sealer; the CLI options naming it; its name in lines."""
    if request.param == "sqlite":
        path = tmp_path / "tokens.db"
        return (lambda sealer: SqliteStore(path, sealer=sealer), ["--sqlite", str(path)],
                f"SQLite at {path}")
    return (lambda sealer: EtcdStore(EtcdSettings(endpoints=[etcd_server.endpoint]),
                                     namespace=namespace, sealer=sealer),
            ["--etcd", etcd_server.endpoint, "--namespace", namespace],
            f"etcd at {etcd_server.endpoint} (namespace {namespace})")


async def rekey_cli(options: list[str], keys: str | None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SFRTR_KEYS"}
    if keys is not None:
        env["SFRTR_KEYS"] = keys
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sfrtr", "rekey", *options, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def opens_with(make: Callable[[Sealer], Any], *keys: tuple[str, bytes]) -> None:
    """Every record and rescue entry opens with ``keys`` and holds what was written."""
    async with make(Sealer(KeyRing(list(keys)))) as store:
        for n, customer in enumerate(CUSTOMERS, 1):
            state = await store.read(customer)
            assert state is not None
            assert state.record.refresh_token.reveal() == f"rt-{n}"
        [(fence, rescued)] = await store.rescues("acme")
        assert (fence, rescued.refresh_token.reveal()) == (7, "rt-9")


async def test_rekey_reseals_every_record_with_the_new_key(backend):
    make, options, place = backend
    async with make(Sealer(KeyRing([("k1", OLD)]))) as store:
        for n, customer in enumerate(CUSTOMERS, 1):
            await store.put(customer, record(n))
        await store.save_rescue("acme", 7, record(9))

    # No key ring, or one without the key the records are sealed with: one line, exit 2.
    code, out, err = await rekey_cli(options, None)
    assert (code, out) == (2, "")
    assert err.startswith("sfrtr rekey: error: no keys: the environment variable SFRTR_KEYS "
                          "is not set")
    assert err.count("\n") == 1
    code, out, err = await rekey_cli(options, ring_text(("k2", NEW)))
    assert (code, out) == (2, "")
    assert err.startswith(f"sfrtr rekey: error: {place}: the record of customer 'acme' is "
                          "sealed with key 'k1', which is not in the key ring")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    await opens_with(make, ("k1", OLD))  # nothing was written

    code, out, err = await rekey_cli(options, ring_text(("k1", OLD), ("k2", NEW)))
    assert (code, err) == (0, "")
    assert out == f"{place}: resealed 2 record(s) and 1 rescue entry with key 'k2'\n"
    await opens_with(make, ("k2", NEW))
    with pytest.raises(SealingError, match="sealed with key 'k2'"):
        await opens_with(make, ("k1", OLD))


async def test_a_record_held_by_a_refresh_is_reported_busy(tmp_path: Path):
    from sfrtr import Intent

    path = tmp_path / "tokens.db"
    async with SqliteStore(path, sealer=Sealer(KeyRing([("k1", OLD)]))) as store:
        for n, customer in enumerate(CUSTOMERS, 1):
            await store.put(customer, record(n))
        held = await store.read("acme")
        assert held is not None
        # A refresh in flight in this live process holds acme throughout.
        assert await store.acquire("acme", held.version, Intent("w", "fp", 1.0)) is not None
        code, out, err = await rekey_cli(["--sqlite", str(path), "--busy-wait", "0.1"],
                                         ring_text(("k1", OLD), ("k2", NEW)))
        assert (code, err) == (1, "")
        assert out == (f"SQLite at {path}: resealed 1 record(s) and 0 rescue entries with key "
                       "'k2'; busy (held by a refresh, run again): acme\n")
    async with SqliteStore(path, sealer=Sealer(KeyRing([("k2", NEW)]))) as store:
        state = await store.read("globex/eu")
        assert state is not None
        assert state.record.refresh_token.reveal() == "rt-2"
        with pytest.raises(SealingError, match="sealed with key 'k1'"):
            await store.read("acme")  # left as it was, for the next run
