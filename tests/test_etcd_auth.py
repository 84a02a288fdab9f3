"""TLS, mutual TLS and user/password against a real etcd, with certificates the
fixtures make (a CA, server and client certificates, from ``cryptography``).
A wrong CA, an expired certificate and a wrong password each give a clear
:class:`~sfrtr.StoreError` that names the endpoint."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sfrtr import Secret, StoreError, TokenRecord
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcd, ServerTls

pytestmark = pytest.mark.anyio

RECORD = TokenRecord(access_token=Secret("a"), refresh_token=Secret("r"),
                     instance_url="https://x.my.salesforce.com", issued_at=1.0,
                     expires_at=time.time() + 60)
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@dataclass
class Pki:
    """PEM files: ``ca``, ``other_ca`` (trusted by nobody), and key pairs by name."""

    root: Path

    def path(self, name: str) -> str:
        return str(self.root / name)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(root: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(root / name, key, cert)
    return key, cert


def _leaf(root: Path, name: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], *,
          server: bool, expired: bool = False) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    before, after = (NOW - 10 * DAY, NOW - DAY) if expired else (NOW - DAY, NOW + 30 * DAY)
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server \
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(
        ca[1].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(before).not_valid_after(after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    _write(root / name, key, builder.sign(ca[0], hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = _ca(root, "ca")
    other = _ca(root, "other_ca")
    _leaf(root, "server", ca, server=True)
    _leaf(root, "expired_server", ca, server=True, expired=True)
    _leaf(root, "client", ca, server=False)
    _leaf(root, "expired_client", ca, server=False, expired=True)
    _leaf(root, "stranger", other, server=False)  # a client cert from another CA
    return Pki(root)


def _serve(tls: ServerTls) -> Iterator[LocalEtcd]:
    server = LocalEtcd(tls=tls)
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tls_etcd(pki: Pki) -> Iterator[LocalEtcd]:
    yield from _serve(ServerTls(pki.path("server.pem"), pki.path("server.key")))


@pytest.fixture(scope="module")
def mtls_etcd(pki: Pki) -> Iterator[LocalEtcd]:
    yield from _serve(ServerTls(pki.path("server.pem"), pki.path("server.key"),
                                client_ca_file=pki.path("ca.pem")))


@pytest.fixture(scope="module")
def expired_etcd(pki: Pki) -> Iterator[LocalEtcd]:
    yield from _serve(ServerTls(pki.path("expired_server.pem"), pki.path("expired_server.key")))


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


async def round_trip(settings: EtcdSettings) -> None:
    async with EtcdStore(settings, namespace="auth", lease_ttl=5) as store:
        await store.put("acme", RECORD)
        state = await store.read("acme")
        assert state is not None
        assert state.record == RECORD


async def refused(settings: EtcdSettings) -> str:
    store = EtcdStore(settings, namespace="auth", lease_ttl=5)
    try:
        with pytest.raises(StoreError) as info:
            await store.start()
    finally:
        await store.aclose()
    return str(info.value)


def settings(server: LocalEtcd, pki: Pki, *, ca: str | None = "ca",
             client: str | None = None, timeout: float = 3.0) -> EtcdSettings:
    return EtcdSettings(endpoints=[server.endpoint], timeout=timeout,
                        ca_file=pki.path(f"{ca}.pem") if ca else None,
                        cert_file=pki.path(f"{client}.pem") if client else None,
                        key_file=pki.path(f"{client}.key") if client else None)


async def test_tls_with_the_right_ca(tls_etcd: LocalEtcd, pki: Pki):
    await round_trip(settings(tls_etcd, pki))


async def test_a_wrong_ca_is_a_clear_error_naming_the_endpoint(tls_etcd: LocalEtcd, pki: Pki):
    message = await refused(settings(tls_etcd, pki, ca="other_ca"))
    assert tls_etcd.endpoint in message
    assert "TLS handshake failed" in message
    assert "CA file" in message


async def test_plain_text_to_a_tls_port_is_refused(tls_etcd: LocalEtcd):
    message = await refused(EtcdSettings(endpoints=[tls_etcd.endpoint], timeout=3.0))
    assert tls_etcd.endpoint in message


async def test_an_expired_server_certificate_is_a_clear_error(expired_etcd: LocalEtcd,
                                                             pki: Pki):
    message = await refused(settings(expired_etcd, pki))
    assert expired_etcd.endpoint in message
    assert "TLS handshake failed" in message
    assert "expired" in message


async def test_mutual_tls(mtls_etcd: LocalEtcd, pki: Pki):
    await round_trip(settings(mtls_etcd, pki, client="client"))


@pytest.mark.parametrize("client", [None, "expired_client", "stranger"])
async def test_mutual_tls_refuses_a_missing_expired_or_foreign_client_cert(
        mtls_etcd: LocalEtcd, pki: Pki, client: str | None):
    message = await refused(settings(mtls_etcd, pki, client=client))
    assert mtls_etcd.endpoint in message
    assert "failed" in message


async def test_store_authenticates(auth_etcd):
    await round_trip(EtcdSettings(endpoints=[auth_etcd.endpoint], username="root",
                                  password="rootpw"))


async def test_wrong_password_is_a_clear_store_error(auth_etcd):
    store = EtcdStore(EtcdSettings(endpoints=[auth_etcd.endpoint], username="root",
                                   password="wrong"), namespace="auth")
    with pytest.raises(StoreError, match="authentication failed") as info:
        await store.start()
    assert auth_etcd.endpoint in str(info.value)
    assert "wrong" not in str(info.value)
    assert "wrong" not in repr(store.client.settings)
    await store.aclose()


async def test_no_credentials_are_refused(auth_etcd):
    store = EtcdStore(EtcdSettings(endpoints=[auth_etcd.endpoint]), namespace="auth")
    with pytest.raises(StoreError) as info:
        await store.start()
    assert auth_etcd.endpoint in str(info.value)
    await store.aclose()
