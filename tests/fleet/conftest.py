"""A real 3-member etcd cluster on loopback ports for the fleet tests.

etcd comes from scripts/install-etcd.sh (called when missing); the tests skip, with the
installer's reason, only when that fails. One cluster per module (quorum tests stop and
restart members and leave the cluster whole again); every test gets its own namespace.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwen_refresher.fleet.crypto import write_secret_file
from qwen_refresher.testing.etcd_cluster import EtcdCluster, EtcdNotInstalled, ensure_etcd

_names = itertools.count()


@pytest.fixture(scope="module")
def etcd_cluster() -> Iterator[EtcdCluster]:
    try:
        ensure_etcd()
    except EtcdNotInstalled as exc:
        pytest.skip(f"etcd unavailable: {exc}")
    cluster = EtcdCluster(3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The module's cluster, whole again (every member running, quorum) after the test."""
    yield etcd_cluster
    for i in range(len(etcd_cluster.members)):
        etcd_cluster.start_member(i)
    etcd_cluster.wait_healthy(timeout=30)


@pytest.fixture
def namespace() -> str:
    return f"qr-test-{next(_names)}"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.key"
    write_secret_file(path)
    return path
