"""User/password authentication against a real etcd with auth enabled."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from sfrtr import Secret, StoreError, TokenRecord
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcd

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[LocalEtcd]:
    server = LocalEtcd()
    server.start()
    etcdctl = os.path.join(os.path.dirname(server.binary), "etcdctl")
    base = [etcdctl, f"--endpoints={server.endpoint}"]
    for args in (["user", "add", "root:rootpw"], ["auth", "enable"]):
        subprocess.run([*base, *args], check=True, capture_output=True, timeout=30)
    yield server
    server.close()


async def test_store_authenticates(auth_etcd):
    store = EtcdStore(EtcdSettings(endpoints=[auth_etcd.endpoint], username="root",
                                   password="rootpw"), namespace="auth", lease_ttl=5)
    record = TokenRecord(access_token=Secret("a"), refresh_token=Secret("r"),
                         instance_url="https://x.my.salesforce.com", issued_at=1.0,
                         expires_at=time.time() + 60)
    await store.put("acme", record)
    assert (await store.read("acme")).record == record
    await store.aclose()


async def test_wrong_password_is_a_clear_store_error(auth_etcd):
    store = EtcdStore(EtcdSettings(endpoints=[auth_etcd.endpoint], username="root",
                                   password="wrong"), namespace="auth")
    with pytest.raises(StoreError, match="authentication failed") as info:
        await store.start()
    assert "wrong" not in str(info.value)
    assert "wrong" not in repr(store.client.settings)
    await store.aclose()


async def test_no_credentials_are_refused(auth_etcd):
    store = EtcdStore(EtcdSettings(endpoints=[auth_etcd.endpoint]), namespace="auth")
    with pytest.raises(StoreError):
        await store.start()
    await store.aclose()
