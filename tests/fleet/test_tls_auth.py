"""The client's TLS (CA, client certificate) and etcd user authentication, each against its own
real single-member etcd: one with client-certificate TLS, one with auth enabled."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qwen_refresher.fleet.errors import FleetUnavailable
from qwen_refresher.fleet.etcd import EtcdClient, Put
from qwen_refresher.testing.etcd_cluster import (
    EtcdCluster,
    EtcdNotInstalled,
    ensure_etcd,
    free_port,
)


def _cert(name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, server: bool = False,
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
             x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(path.with_suffix(".key"), 0o600)


@pytest.fixture
def etcd_bin() -> str:
    try:
        return ensure_etcd()[0]
    except EtcdNotInstalled as exc:
        pytest.skip(f"etcd unavailable: {exc}")


@pytest.fixture
def tls_etcd(tmp_path: Path, etcd_bin: str) -> Iterator[tuple[str, Path]]:
    ca_cert, ca_key = _cert("qr-test-ca", None, ca=True)
    ca_name = ca_cert.subject
    _write(tmp_path / "ca", ca_cert, ca_key)
    _write(tmp_path / "server", *_cert("etcd", (ca_name, ca_key), server=True))
    _write(tmp_path / "client", *_cert("qwen-refresher", (ca_name, ca_key)))
    port, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    with open(tmp_path / "etcd.log", "wb") as log:
        proc = subprocess.Popen(
            [etcd_bin, "--data-dir", str(tmp_path / "data"), "--listen-client-urls", url,
             "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer}",
             "--cert-file", str(tmp_path / "server.crt"),
             "--key-file", str(tmp_path / "server.key"), "--client-cert-auth",
             "--trusted-ca-file", str(tmp_path / "ca.crt"), "--logger", "zap",
             "--log-outputs", "stderr"], stdout=log, stderr=log)
    try:
        yield url, tmp_path
    finally:
        proc.kill()
        proc.wait(10)


def test_tls_with_a_client_certificate(tls_etcd: tuple[str, Path]) -> None:
    url, certs = tls_etcd
    client = EtcdClient([url], timeout=2, ca=certs / "ca.crt", cert=certs / "client.crt",
                        key=certs / "client.key")
    deadline = time.monotonic() + 20
    while True:
        try:
            client.txn([], [Put(b"qr/k", b"v")])
            break
        except FleetUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert client.get(b"qr/k")[0].value == b"v"  # type: ignore[union-attr]
    no_cert = EtcdClient([url], timeout=2, ca=certs / "ca.crt")
    with pytest.raises(FleetUnavailable):
        no_cert.get(b"qr/k")
    wrong_ca = EtcdClient([url], timeout=2)  # the system CAs do not know ours
    with pytest.raises(FleetUnavailable):
        wrong_ca.get(b"qr/k")


def test_user_and_password(tmp_path: Path, etcd_bin: str) -> None:
    with EtcdCluster(1, root=tmp_path / "cluster") as cluster:
        env = cluster.etcdctl_env()
        for argv in (["user", "add", "root:rootpw"], ["user", "add", "qr:qrpw"],
                     ["role", "add", "qr"],
                     ["role", "grant-permission", "qr", "--prefix=true", "readwrite", "qr/"],
                     ["user", "grant-role", "qr", "qr"], ["auth", "enable"]):
            subprocess.run([cluster.etcdctl, *argv], env=env, check=True, timeout=30,
                           capture_output=True)
        client = EtcdClient(cluster.urls, timeout=2, user="qr", password="qrpw")
        client.txn([], [Put(b"qr/k", b"v")])
        assert client.get(b"qr/k")[0] is not None
        with pytest.raises(FleetUnavailable):
            client.get(b"other/k")  # outside the role's prefix: refused, never "empty"
        anonymous = EtcdClient(cluster.urls, timeout=2)
        with pytest.raises(FleetUnavailable):
            anonymous.get(b"qr/k")
        wrong = EtcdClient(cluster.urls, timeout=2, user="qr", password="nope")
        with pytest.raises(FleetUnavailable):
            wrong.get(b"qr/k")
