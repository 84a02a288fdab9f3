"""A regression test (issue 18's cluster storm found it; fixed in ``read()``, which
answers with etcd's own answer when the mirror moved past it without a record).

Namespace mirror: ``read()`` of an existing customer answers ``None`` (the
manager raises ``NotConnected``) when a resync replaces the mirror between the
read's request and its answer, and the customer's version moved meanwhile. The
resync's fresh entry holds no record (the load is keys-only) and is newer than
the read, so the read's answer is rightly not folded in; but ``read()`` then
returns the view of that fresh, bodiless entry. In the cluster storm it happens
when the member a worker talks to is killed: the watch break and the keepalive
break each start a resync while the storm's reads go to etcd
(``tests/test_etcd_cluster.py::test_the_member_every_worker_talks_to_is_killed``
saw 4 to 12 ``NotConnected`` per run, on one or two namespace-mirror workers).
"""

from __future__ import annotations

import time

import pytest

from sfrtr import Secret, TokenRecord
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcd

pytestmark = pytest.mark.anyio

RECORD = TokenRecord(access_token=Secret("at-1"), refresh_token=Secret("rt-1"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0,
                     expires_at=time.time() + 3600)


async def test_a_read_racing_a_resync_still_sees_the_customer(etcd_server: LocalEtcd,
                                                             namespace: str):
    settings = EtcdSettings(endpoints=[etcd_server.endpoint])
    writer = EtcdStore(settings, namespace=namespace, lease_ttl=3)
    reader = EtcdStore(settings, namespace=namespace, lease_ttl=3, mirror="namespace")
    try:
        await writer.put("acme", RECORD)
        assert await reader.read("acme") is not None  # used; its record is mirrored
        # The watch breaks (a member died): reads go to etcd until a resync.
        reader._tasks[1].cancel()
        reader._synced = False
        get_pair = reader.client.get_pair

        async def answered_after_a_resync(first: bytes, second: bytes):  # type: ignore[no-untyped-def]
            answer = await get_pair(first, second)
            await writer.put("acme", RECORD.replace(generation=2))  # the version moves
            await reader._resync()  # lands before the read's answer is folded in
            return answer

        reader.client.get_pair = answered_after_a_resync  # type: ignore[method-assign]
        got = await reader.read("acme")
        assert got is not None, "an existing customer read as absent (NotConnected)"
    finally:
        await reader.aclose()
        await writer.aclose()
