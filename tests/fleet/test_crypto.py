"""The fleet secret: file rules, keyed ids, AES-GCM bound to the etcd key name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qwen_refresher.fleet.crypto import FleetKeys, read_secret_file, write_secret_file
from qwen_refresher.fleet.errors import FleetRecordUnreadable, FleetSecretError


def test_init_writes_0600_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "fleet.key"
    write_secret_file(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    first = path.read_bytes()
    with pytest.raises(FleetSecretError, match="exists already"):
        write_secret_file(path)
    assert path.read_bytes() == first
    write_secret_file(path, force=True)
    assert path.read_bytes() != first
    assert len(read_secret_file(path)) == 32


@pytest.mark.parametrize("content, mode, problem", [
    (b"qwen-refresher-fleet-secret-v1\nc2hvcnQ=\n", 0o600, "bytes of key"),
    (b"not base64 !!!\n", 0o600, "bad base64"),
    (None, 0o644, "lets others read it"),
])
def test_bad_secret_files_are_refused(tmp_path: Path, content: bytes | None, mode: int,
                                      problem: str) -> None:
    path = tmp_path / "fleet.key"
    write_secret_file(path)
    if content is not None:
        path.write_bytes(content)
    os.chmod(path, mode)
    with pytest.raises(FleetSecretError, match=problem):
        read_secret_file(path)


def test_symlinked_secret_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    write_secret_file(real)
    (tmp_path / "link.key").symlink_to(real)
    with pytest.raises(FleetSecretError):
        read_secret_file(tmp_path / "link.key")


def test_ids_are_keyed_and_namespaced() -> None:
    a, b = os.urandom(32), os.urandom(32)
    token = "refresh-token-value"
    assert FleetKeys(a, "ns").token_id(token) == FleetKeys(a, "ns").token_id(token)
    assert FleetKeys(a, "ns").token_id(token) != FleetKeys(b, "ns").token_id(token)
    assert FleetKeys(a, "ns").token_id(token) != FleetKeys(a, "other").token_id(token)
    assert token not in repr(FleetKeys(a, "ns"))


def test_seal_binds_the_key_name_and_the_secret() -> None:
    keys = FleetKeys(os.urandom(32), "ns")
    sealed = keys.seal(b"ns/f/aaa/current", b"secret tokens")
    assert b"secret tokens" not in sealed
    assert keys.open(b"ns/f/aaa/current", sealed) == b"secret tokens"
    with pytest.raises(FleetRecordUnreadable):
        keys.open(b"ns/f/bbb/current", sealed)  # moved under another family
    with pytest.raises(FleetRecordUnreadable):
        FleetKeys(os.urandom(32), "ns").open(b"ns/f/aaa/current", sealed)
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(FleetRecordUnreadable):
        keys.open(b"ns/f/aaa/current", bytes(tampered))
    with pytest.raises(FleetRecordUnreadable):
        keys.open(b"ns/f/aaa/current", b"garbage")
