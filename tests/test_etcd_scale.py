"""A namespace past gRPC's 4 MiB message limit loads, and reloads, in pages (issue 20).

One Range of the whole namespace failed at about 8,000 customers
(RESOURCE_EXHAUSTED), so no worker could start, and every running worker's
resync (after an etcd restart, a reconnect, a watch compaction) failed the
same way. These tests write 20,000 customers (about 13 MB of records) straight
into a real etcd and start and resynchronize stores on them; ``nox -s scale``
runs them with 100,000 (``SFRTR_SCALE_CUSTOMERS``).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from sfrtr import Secret, Status, StoreError, TokenRecord
from sfrtr.store.etcd import EtcdStore, _encode
from sfrtr.store.etcd_client import EtcdSettings, put
from sfrtr.store.etcd_launcher import LocalEtcd

pytestmark = pytest.mark.anyio
CUSTOMERS = int(os.environ.get("SFRTR_SCALE_CUSTOMERS", "20000"))
TXN_OPS = 128  # etcd's default --max-txn-ops


def record(i: int) -> TokenRecord:
    # Salesforce-sized tokens: the record is what a real grant stores (~650 bytes).
    return TokenRecord(
        access_token=Secret(f"00D5e000000{i:07d}!AQ0AQ" + "x" * 96),
        refresh_token=Secret(f"5Aep861{i:07d}" + "r" * 80),
        instance_url=f"https://org{i}.my.salesforce.com", issued_at=time.time(),
        expires_at=time.time() + 7200, identity_url=f"https://login.salesforce.com/id/"
        f"00D5e000000{i:07d}/0055e000000{i:07d}", scope="api refresh_token",
        grant_id=f"g{i}")


async def fill(endpoint: str, namespace: str, customers: int = CUSTOMERS) -> None:
    """Write ``customer-NNNNNN`` records straight into etcd, 128 puts per Txn."""
    writer = EtcdStore(EtcdSettings(endpoints=[endpoint]), namespace=namespace)
    await writer.client.connect()
    batch = []
    for i in range(customers):
        batch.append(put(writer._tok(f"customer-{i:06d}"), _encode(record(i))))
        if len(batch) == TXN_OPS:
            await writer.client.txn([], batch)
            batch = []
    if batch:
        await writer.client.txn([], batch)
    await writer.client.close()


@pytest.fixture
async def big_namespace(etcd_server: LocalEtcd, namespace: str) -> str:
    await fill(etcd_server.endpoint, namespace)
    return namespace


async def test_a_worker_starts_on_twenty_thousand_customers(etcd_server: LocalEtcd,
                                                            big_namespace: str):
    store = EtcdStore(EtcdSettings(endpoints=[etcd_server.endpoint]), namespace=big_namespace)
    started = time.monotonic()
    await store.start()
    took = time.monotonic() - started
    try:
        print(f"\n{CUSTOMERS} customers: start (lease + paged load + watch) {took:.2f}s, "
              f"{store.client.round_trips} round trips")
        assert store.client.round_trips >= CUSTOMERS // store.page_size  # it paged
        for i in (0, CUSTOMERS // 2, CUSTOMERS - 1):
            found = await store.read(f"customer-{i:06d}")
            assert found is not None
            assert found.record.refresh_token == record(i).refresh_token
        assert len(store._mirror) == CUSTOMERS
    finally:
        await store.aclose()


async def test_resync_after_compaction_reads_in_pages(etcd_server: LocalEtcd,
                                                      big_namespace: str):
    store = EtcdStore(EtcdSettings(endpoints=[etcd_server.endpoint]), namespace=big_namespace)
    writer = EtcdStore(EtcdSettings(endpoints=[etcd_server.endpoint]), namespace=big_namespace)
    await store.start()
    await writer.start()
    try:
        seen = await store.read("customer-000007")  # served here: its record is kept
        assert seen is not None
        watch = store._tasks[1]
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await writer.put("customer-000007", record(7).replace(generation=5))
        latest = await writer.put("customer-000008", record(8).replace(generation=1))
        await writer.client.compact(latest.version)  # the first put is history now
        waiter = asyncio.create_task(store.wait_for_change("customer-000007", seen.stamp, 30))
        before = store.client.round_trips
        store._tasks[1] = asyncio.create_task(store._watch_loop())  # finds it compacted
        woke = await waiter
        assert woke is not None
        assert woke.record.generation == 5
        assert store.client.round_trips - before >= CUSTOMERS // store.page_size
        assert len(store._mirror) == CUSTOMERS
        assert (await store.read("customer-019999")).record.status is Status.VALID
    finally:
        await store.aclose()
        await writer.aclose()


async def test_resync_after_an_etcd_restart(namespace: str):
    """An etcd of its own (stopping the shared one would disturb other tests): it
    keeps its data across the restart; the store reconnects and reloads in pages."""
    etcd = LocalEtcd()
    etcd.start()
    store = EtcdStore(EtcdSettings(endpoints=[etcd.endpoint]), namespace=namespace)
    try:
        await fill(etcd.endpoint, namespace)
        await store.start()
        etcd.stop()
        await asyncio.sleep(0.5)
        etcd.start()
        writer = EtcdStore(EtcdSettings(endpoints=[etcd.endpoint]), namespace=namespace)
        for attempt in range(50):  # a restarted etcd answers /health before it has a
            try:                   # leader: its first calls can fail UNAVAILABLE
                await writer.start()
                break
            except StoreError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.2)
        try:
            await writer.put("customer-000001", record(1).replace(generation=9))
            for _ in range(300):  # the watch comes back, resyncs, and sees the write
                seen = await store.read("customer-000001")
                if store._synced and seen.record.generation == 9:
                    break
                await asyncio.sleep(0.1)
            assert store._synced
            assert seen.record.generation == 9
            assert len(store._mirror) == CUSTOMERS
        finally:
            await writer.aclose()
    finally:
        await store.aclose()
        etcd.close()
