"""Encryption at rest: the key ring, sealing and opening, and every store that
writes records out of the process (SQLite, Postgres, etcd) on real servers."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from sfrtr import (
    Intent,
    RefreshPolicy,
    Secret,
    Status,
    StoreError,
    TokenManager,
    TokenRecord,
)
from sfrtr.emulator import Emulator
from sfrtr.store.sealing import KeyRing, Sealer, SealingError, new_key, rekey
from tests.conftest import emulator_grant, emulator_oauth
from tests.raw_store import SEALED_KINDS, MakeStore, key_text, raw_bytes, ring, store_maker

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres_server"]

RECORD = TokenRecord(access_token=Secret("at-SECRET-access"),
                     refresh_token=Secret("rt-SECRET-refresh"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0,
                     expires_at=time.time() + 3600, grant_id="g1")
TOKENS = (b"at-SECRET-access", b"rt-SECRET-refresh")


def sealed(keys: KeyRing, customer: str = "acme", namespace: str = "ns") -> dict[str, Any]:
    return Sealer(keys).seal(namespace, customer, RECORD.to_dict())


# -- the key ring ---------------------------------------------------------------------


def test_key_ring_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    text = key_text("k1", "k2")
    from_text = KeyRing.parse(text)
    assert (from_text.ids, from_text.current) == (["k1", "k2"], "k2")
    monkeypatch.setenv("SFRTR_KEYS", text)
    assert KeyRing.from_env().ids == ["k1", "k2"]
    path = tmp_path / "keys"
    path.write_text("# rotated 2026-11\n" + text.replace(",", "\n") + "\n")
    assert KeyRing.from_file(path).current == "k2"
    assert len(base64.b64decode(new_key())) == 32
    staged = KeyRing.parse(f"{text},current=k1")  # k2 known everywhere, not used yet
    assert (staged.ids, staged.current) == (["k1", "k2"], "k1")
    with pytest.raises(SealingError, match="current key 'k9' is not in the key ring"):
        KeyRing.parse(f"{text},current=k9")
    assert "k1" in repr(from_text)
    assert text.split(":")[1][:20] not in repr(from_text)  # never the key itself


@pytest.mark.parametrize(("text", "error"), [
    ("", "no keys"),
    ("k1", "not id:base64"),
    ("k1:%%%", "not base64"),
    (f"k1:{base64.b64encode(b'short').decode()}", "not 32 bytes"),
    (f"{key_text('k1')},{key_text('k1')}", "twice"),
    ("bad id!:" + base64.b64encode(b"x" * 32).decode(), "entry 1 is not id:base64-key"),
])
def test_bad_key_text_is_a_clear_error(text: str, error: str):
    with pytest.raises(SealingError, match=error):
        KeyRing.parse(text)


def test_missing_keys_are_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("SFRTR_KEYS", raising=False)
    with pytest.raises(SealingError, match="SFRTR_KEYS is not set"):
        KeyRing.from_env()
    with pytest.raises(SealingError, match="cannot read the key file"):
        KeyRing.from_file(tmp_path / "absent")


async def test_a_kms_unwrap_runs_once():
    calls = 0

    async def unwrap() -> KeyRing:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return await KeyRing.from_kms(_data_keys)

    sealer = Sealer(unwrap)
    with pytest.raises(SealingError, match="not unwrapped"):
        sealer.seal("ns", "acme", RECORD.to_dict())
    await asyncio.gather(*(sealer.ready() for _ in range(5)))
    assert calls == 1
    assert sealer.ring.current == "kms-1"
    assert Sealer(sealer.ring).open("ns", "acme", sealer.seal("ns", "acme", RECORD.to_dict()))


async def _data_keys() -> dict[str, bytes]:
    return {"kms-1": b"d" * 32}


# -- sealing and opening ----------------------------------------------------------------


def test_a_sealed_record_hides_its_tokens_and_names_its_key():
    data = sealed(ring("k1"))
    raw = orjson.dumps(data)
    assert not any(token in raw for token in TOKENS)
    assert "access_token" not in data
    assert "refresh_token" not in data
    assert data["sealed"].startswith("v1.k1.")
    assert data["status"] == "valid"  # bookkeeping stays readable for the stores' steps
    opened = Sealer(ring("k1")).open("ns", "acme", data)
    assert TokenRecord.from_dict(opened) == RECORD
    assert sealed(ring("k1"))["sealed"] != data["sealed"]  # a fresh nonce each time


@pytest.mark.parametrize(("change", "where"), [
    ({"customer": "globex"}, "copied under another customer"),
    ({"namespace": "other"}, "copied to another namespace"),
    ({"instance_url": "https://evil.my.salesforce.com"}, "pointed at another instance"),
    ({"flip": True}, "altered ciphertext"),
    ({"keys": ring("k1", seed="other")}, "another key under the same id"),
])
def test_a_record_out_of_place_does_not_open(change: dict[str, Any], where: str):
    data = sealed(ring("k1"))
    if "instance_url" in change:
        data["instance_url"] = change["instance_url"]
    if change.get("flip"):
        version, key_id, blob = data["sealed"].split(".")
        raw = bytearray(base64.b64decode(blob))
        raw[-1] ^= 1
        data["sealed"] = f"{version}.{key_id}.{base64.b64encode(bytes(raw)).decode()}"
    sealer = Sealer(change.get("keys", ring("k1")))
    with pytest.raises(SealingError, match="does not open with key 'k1'") as info:
        sealer.open(change.get("namespace", "ns"), change.get("customer", "acme"), data)
    assert not any(token.decode() in str(info.value) for token in TOKENS), where


def test_a_missing_key_names_the_key():
    data = sealed(ring("k1"))
    with pytest.raises(SealingError, match="sealed with key 'k1', which is not in the key ring"):
        Sealer(ring("k2")).open("ns", "acme", data)
    with pytest.raises(SealingError, match="malformed"):
        Sealer(ring("k1")).open("ns", "acme", {**data, "sealed": "v9.k1.AAAA"})


def test_rotation_seals_with_the_newest_and_opens_the_older():
    old = sealed(ring("k1"))
    both = Sealer(ring("k1", "k2"))
    assert both.open("ns", "acme", old)["refresh_token"] == "rt-SECRET-refresh"
    assert both.seal("ns", "acme", RECORD.to_dict())["sealed"].startswith("v1.k2.")


def test_records_written_before_sealing_still_open_unless_refused():
    plain = RECORD.to_dict()
    assert Sealer(ring("k1")).open("ns", "acme", plain) == plain
    with pytest.raises(SealingError, match="not sealed"):
        Sealer(ring("k1"), accept_plain=False).open("ns", "acme", plain)


# -- every store that writes records out of the process -----------------------------------


@pytest.fixture(params=SEALED_KINDS)
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    maker = store_maker(request, tmp_path, request.param)
    opened: list[Any] = []

    def make_store(keys: KeyRing | None) -> Any:
        store = maker(keys)
        opened.append(store)
        return store

    yield make_store
    for store in opened:
        await store.aclose()


async def test_a_sealed_store_keeps_no_token_in_the_clear(make: MakeStore):
    store = make(ring("k1"))
    await store.put("acme", RECORD)
    state = await store.read("acme")
    assert state is not None
    assert state.record == RECORD
    rotated = RECORD.replace(access_token=Secret("at-SECRET-2"),
                             refresh_token=Secret("rt-SECRET-2"), generation=1)
    assert await store.commit("acme", state.version, rotated) is not None
    await store.save_rescue("acme", 7, RECORD)
    assert [(f, r.refresh_token.reveal()) for f, r in await store.rescues("acme")] == \
        [(7, "rt-SECRET-refresh")]
    other = make(ring("k1"))  # another process with the same keys
    seen = await other.read("acme")
    assert seen is not None
    assert seen.record == rotated
    raw = await raw_bytes(store)
    assert b"sealed" in raw
    for token in (*TOKENS, b"at-SECRET-2", b"rt-SECRET-2"):
        assert token not in raw


async def test_plain_records_are_read_and_sealed_by_the_next_write(make: MakeStore):
    plain = make(None)
    await plain.put("acme", RECORD)
    await plain.put("globex", RECORD)
    assert TOKENS[1] in await raw_bytes(plain)
    store = make(ring("k1"))
    state = await store.read("acme")
    assert state is not None
    assert state.record == RECORD
    assert await store.commit("acme", state.version, state.record) is not None
    report = await rekey(store)  # and the rest by a rekey
    assert (report.resealed, report.busy) == (2, [])
    raw = await raw_bytes(store)
    assert not any(token in raw for token in TOKENS)
    # A store without keys now refuses clearly, and names what it lacks.
    with pytest.raises(SealingError, match="no key ring"):
        await make(None).read("acme")


async def test_rotation_and_rekey(make: MakeStore):
    first = make(ring("k1"))
    for customer in ("a", "b", "c"):
        await first.put(customer, RECORD)
    await first.save_rescue("b", 3, RECORD)
    rotated = make(ring("k1", "k2"))
    assert (await rotated.read("a")).record == RECORD  # type: ignore[union-attr]
    report = await rekey(rotated)
    assert (report.resealed, report.rescues, report.busy) == (3, 1, [])
    raw = (await raw_bytes(rotated)).decode(errors="replace")
    assert "v1.k1." not in raw
    assert raw.count("v1.k2.") >= 4
    only_new = make(ring("k2"))  # k1 removed: everything still opens
    for customer in ("a", "b", "c"):
        assert (await only_new.read(customer)).record == RECORD  # type: ignore[union-attr]
    assert len(await only_new.rescues("b")) == 1


async def test_rekey_leaves_a_record_held_by_a_refresh_and_says_so(make: MakeStore):
    store = make(ring("k1"))
    await store.put("free", RECORD)
    held = await store.put("held", RECORD)
    locked = await store.acquire("held", held.version, Intent(
        "w1", RECORD.refresh_token.fingerprint, time.time(), id="rekey-test"))
    assert locked is not None
    rotated = make(ring("k1", "k2"))
    report = await rekey(rotated, attempts=2, busy_wait=0.1)
    assert (report.resealed, report.busy) == (1, ["held"])
    after = await rotated.read("held")
    assert after is not None
    assert after.version == locked.version  # untouched: its refresh's commit wins
    # The refresh commits (sealing with whatever its process's newest key is).
    assert await store.commit("held", locked.version, RECORD) is not None
    assert (await rekey(rotated)).busy == []


async def test_a_wrong_or_missing_key_overwrites_nothing(make: MakeStore, emulator: Emulator):
    store = make(ring("k1"))
    written = await store.put("acme", RECORD)
    await store.save_rescue("acme", 5, RECORD)
    for keys, error in ((ring("k1", seed="wrong"), "does not open"),
                        (ring("k2"), "not in the key ring")):
        wrong = make(keys)
        with pytest.raises(SealingError, match=error):
            await wrong.read("acme")
        with pytest.raises(SealingError, match=error):
            await wrong.rescues("acme")  # never skipped as damage: it holds a token
        manager = TokenManager(emulator_oauth(emulator), wrong,
                               RefreshPolicy(lease_margin=0.5, busy_backoff=0.05,
                                             store_patience=0.5))
        with pytest.raises(StoreError):
            await manager.token("acme")
        with pytest.raises(StoreError):
            await manager.refresh("acme", stale="at-SECRET-access")
        assert emulator.ledger["redemptions"] == 0
    right = make(ring("k1"))
    after = await right.read("acme")
    assert after is not None
    assert (after.version, after.record) == (written.version, RECORD)  # never rewritten
    assert [(f, r) for f, r in await right.rescues("acme")] == [(5, RECORD)]


async def test_a_manager_refreshes_through_a_sealed_store(make: MakeStore, emulator: Emulator):
    store = make(ring("k1"))
    manager = TokenManager(emulator_oauth(emulator), store,
                           RefreshPolicy(lease_margin=0.5, busy_backoff=0.05))
    try:
        record = await manager.connect("acme", emulator_grant(emulator, "acme"))
        stale = record.access_token.reveal()
        for _ in range(3):
            stale = (await manager.refresh("acme", stale=stale)).access_token
        assert emulator.ledger["redemptions"] == 3
        assert await manager.status("acme") is Status.VALID
        issued = set(emulator.world.refresh_index)
        raw = await raw_bytes(store)
        assert issued
        assert not [t for t in issued if t.encode() in raw]
    finally:
        await manager.aclose()


async def test_the_hot_path_never_seals_or_opens_and_a_refresh_seals_twice():
    """What benchmarks/sealing.py measures, counted: a cached token costs no crypto;
    a refresh seals its two writes (acquire, commit) and opens what it reads."""
    from benchmarks.sealing import hot_path, per_refresh

    hot = await hot_path(500, rounds=1)
    assert hot["seals_and_opens_during_calls"] == 0
    refresh = await per_refresh(4, rounds=2)
    assert refresh["seals_per_refresh"] == 2
    assert refresh["opens_per_refresh"] <= 2
