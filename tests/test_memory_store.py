"""The memory store beyond the shared contract: its fork guard and its notifications.

(The contract itself, on every store, is ``tests/test_store_contract.py``.)
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sfrtr import Intent, MemoryStore, Secret, Status, TokenRecord
from sfrtr.records import Versioned

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
RECORD = TokenRecord(access_token=Secret("at-1"), refresh_token=Secret("rt-1"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0,
                     expires_at=time.time() + 3600, grant_id="g1")
INTENT = Intent("w1", RECORD.refresh_token.fingerprint, 1.0, id="id-w1")

_FORK = textwrap.dedent("""
    import asyncio, os, sys
    from sfrtr import ConfigurationError, Intent, MemoryStore, Secret, TokenRecord

    record = TokenRecord(access_token=Secret("a"), refresh_token=Secret("r"),
                         instance_url="https://x.my.salesforce.com", issued_at=1.0,
                         expires_at=9e9)
    store = MemoryStore()
    asyncio.run(store.put("acme", record))
    calls = {
        "subscribe": lambda: store.subscribe(lambda *_: None),
        "read": lambda: asyncio.run(store.read("acme")),
        "put": lambda: asyncio.run(store.put("acme", record)),
        "acquire": lambda: asyncio.run(store.acquire("acme", 1, Intent("w", "f", 1.0))),
        "commit": lambda: asyncio.run(store.commit("acme", 1, record)),
        "save_rescue": lambda: asyncio.run(store.save_rescue("acme", 1, record)),
        "rescues": lambda: asyncio.run(store.rescues("acme")),
        "drop_rescue": lambda: asyncio.run(store.drop_rescue("acme", 1)),
        "wait_for_change": lambda: asyncio.run(store.wait_for_change("acme", 0, 0.01)),
        "delete": lambda: asyncio.run(store.delete("acme")),
        "customers": lambda: asyncio.run(store.customers()),
    }
    child = os.fork()
    if child == 0:
        refused = []
        for name, call in calls.items():
            try:
                call()
            except ConfigurationError as exc:
                if "fork" in str(exc):
                    refused.append(name)
        fresh = MemoryStore()  # one made in the child is the child's own
        asyncio.run(fresh.put("acme", record))
        print("CHILD refused " + " ".join(refused), flush=True)
        os._exit(0)
    os.waitpid(child, 0)
    # The parent's store is untouched by its child's fork.
    print("PARENT", asyncio.run(store.read("acme")).record.refresh_token.reveal(), flush=True)
""")


def test_a_forked_child_refuses_every_operation_of_its_parents_store():
    """A child working on a copy would present the parent's refresh tokens a second time
    (Salesforce revokes the grant): every operation refuses, the parent carries on."""
    done = subprocess.run([sys.executable, "-c", _FORK], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    lines = done.stdout.splitlines()
    assert "CHILD refused subscribe read put acquire commit save_rescue rescues " \
        "drop_rescue wait_for_change delete customers" in lines, done.stdout + done.stderr
    assert "PARENT r" in lines


async def test_subscribers_hear_every_write_and_the_delete():
    store = MemoryStore()
    heard: list[tuple[str, Versioned | None]] = []
    store.subscribe(lambda customer, state: heard.append((customer, state)))
    put = await store.put("acme", RECORD)
    held = await store.acquire("acme", put.version, INTENT)
    assert held is not None
    done = await store.commit("acme", held.version, RECORD.replace(generation=1))
    assert await store.delete("acme")
    assert heard == [("acme", put), ("acme", held), ("acme", done), ("acme", None)]
    assert held.locked
    assert held.record.status is Status.REFRESHING
    assert held.record.intent == INTENT


async def test_a_waiter_wakes_at_once_on_a_change_not_at_its_timeout():
    store = MemoryStore()
    await store.put("acme", RECORD)
    seen = await store.read("acme")
    assert seen is not None
    for change in ("commit", "rescue", "drop", "delete"):
        waiter = asyncio.create_task(store.wait_for_change("acme", seen.stamp, 30))
        await asyncio.sleep(0)
        assert not waiter.done()
        started = time.monotonic()
        if change == "commit":
            await store.commit("acme", seen.version, RECORD.replace(generation=2))
        elif change == "rescue":
            await store.save_rescue("acme", 5, RECORD)
        elif change == "drop":
            await store.drop_rescue("acme", 5)
        else:
            await store.delete("acme")
        got = await asyncio.wait_for(waiter, 5)
        assert time.monotonic() - started < 5
        if change == "delete":
            assert got is None
            break
        assert got is not None
        assert got == await store.read("acme")
        seen = got


async def test_waiting_on_an_unknown_customer_answers_at_once():
    store = MemoryStore()
    started = time.monotonic()
    assert await store.wait_for_change("nobody", 0, 10) is None
    assert time.monotonic() - started < 1


async def test_rescue_flag_follows_the_entries():
    store = MemoryStore()
    await store.put("acme", RECORD)
    await store.save_rescue("acme", 3, RECORD)
    await store.save_rescue("acme", 4, RECORD)
    before = await store.read("acme")
    assert before is not None
    assert before.rescued
    await store.drop_rescue("acme", 9)  # absent: nothing moves
    assert await store.read("acme") == before
    await store.drop_rescue("acme", 3)
    assert (await store.read("acme")).rescued
    await store.drop_rescue("acme", 4)
    after = await store.read("acme")
    assert after is not None
    assert not after.rescued
    assert after.stamp > before.stamp
    await store.drop_rescue("nobody", 1)
    assert await store.rescues("nobody") == []


async def test_delete_fenced_on_a_version_and_what_a_delete_takes_with_it():
    store = MemoryStore()
    v0 = await store.put("acme", RECORD)
    held = await store.acquire("acme", v0.version, INTENT)
    assert held is not None
    await store.save_rescue("acme", held.version, RECORD)
    assert not await store.delete("acme", version=v0.version)
    assert await store.read("acme") is not None
    assert await store.delete("acme", version=held.version)
    assert await store.read("acme") is None
    assert await store.rescues("acme") == []
    assert await store.customers() == []
    assert await store.delete("acme", version=held.version)  # nothing left to fence on
    # Back from the dead: no lock, no rescues left over from before.
    again = await store.put("acme", RECORD)
    assert not again.locked
    assert not again.rescued
    assert await store.acquire("acme", again.version, INTENT) is not None


async def test_the_memory_store_has_no_lease():
    store = MemoryStore()
    assert store.lease_remaining() is None
    assert store.lease_remaining(5) is None
    assert store.lease_ttl == 0.0
    await store.aclose()
