"""Fleet settings, ``qwen-refresher fleet init`` and the status reader of the fleet state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_refresher.config import Settings
from qwen_refresher.fleet.crypto import read_secret_file
from qwen_refresher.fleet.published import fleet_not_ready, fleet_report
from qwen_refresher.fleet.runtime import fleet_config
from qwen_refresher.testing.etcd_cluster import EtcdCluster


def test_settings_need_a_secret_and_safe_urls(tmp_path: Path) -> None:
    key = tmp_path / "k"
    s = Settings(fleet=" http://127.0.0.1:1 ,https://etcd2:2379,", fleet_secret_file=key)
    assert s.fleet_urls == ["http://127.0.0.1:1", "https://etcd2:2379"]
    assert Settings().fleet_urls == []
    with pytest.raises(ValueError, match="fleet_secret_file"):
        Settings(fleet="https://etcd:2379")
    with pytest.raises(ValueError, match="https is required"):
        Settings(fleet="http://10.1.2.3:2379", fleet_secret_file=key)
    with pytest.raises(ValueError, match="fleet_inflight_grace"):
        Settings(fleet="https://e:1", fleet_secret_file=key, fleet_lease_ttl=20,
                 fleet_inflight_grace=5)


def test_env_settings_reach_the_fleet_config(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    monkeypatch.setenv("QWEN_REFRESHER_FLEET", "https://a:2379,https://b:2379")
    monkeypatch.setenv("QWEN_REFRESHER_FLEET_SECRET_FILE", str(tmp_path / "k"))
    monkeypatch.setenv("QWEN_REFRESHER_FLEET_LEASE_TTL", "4s")
    monkeypatch.setenv("QWEN_REFRESHER_FLEET_USER", "qr")
    monkeypatch.setenv("QWEN_REFRESHER_FLEET_PASSWORD_FILE", str(password))
    config = fleet_config(Settings())
    assert config.urls == ["https://a:2379", "https://b:2379"]
    assert config.lease_ttl == 4 and config.user == "qr" and config.password == "s3cret"
    assert "s3cret" not in repr(config)


def test_fleet_init_command(tmp_path: Path) -> None:
    path = tmp_path / "fleet.key"
    run = [sys.executable, "-m", "qwen_refresher", "fleet", "init", str(path)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(read_secret_file(path)) == 32
    again = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert again.returncode == 78 and "exists already" in again.stderr


def test_published_fleet_state_for_status_and_readyz() -> None:
    healthy = {"fleet": {"host": "h1", "members": ["a", "b", "c"], "key": "abcd1234",
                         "available": True, "unavailable_since": None,
                         "profiles": {"/s#p": {"role": "follower of h2"}}}}
    lines, code, roles = fleet_report(healthy)
    assert code == 0 and "etcd healthy" in lines[0] and roles == {"/s#p": "follower of h2"}
    assert lines[1] == "  /s#p: follower of h2"
    down = {"fleet": {**healthy["fleet"], "available": False,
                      "unavailable_since": 1_800_000_000.0, "problem": "no etcd member"}}
    lines, code, _ = fleet_report(down)
    assert code == 1 and lines[1].startswith("fleet unavailable since 2027-01-15T")
    assert fleet_not_ready(down["fleet"])
    assert fleet_report({"fleet": "garbage"}) == ([], 0, {})
    assert fleet_report({}) == ([], 0, {})
    assert fleet_not_ready({"available": "no"}) == []


def test_fleet_check_command(cluster: EtcdCluster, secret_file: Path, tmp_path: Path) -> None:
    env = dict(os.environ, QWEN_REFRESHER_FLEET=cluster.endpoints,
               QWEN_REFRESHER_FLEET_SECRET_FILE=str(secret_file),
               QWEN_REFRESHER_FLEET_TIMEOUT="1",
               QWEN_REFRESHER_STATE_DIR=str(tmp_path / "state"))
    run = [sys.executable, "-m", "qwen_refresher", "fleet", "check"]
    ok = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "quorum: ok" in ok.stdout, ok.stdout + ok.stderr
    cluster.stop_member(1)
    cluster.stop_member(2)
    down = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "quorum: NONE" in down.stdout, down.stdout + down.stderr


def test_install_script_is_idempotent(cluster: EtcdCluster) -> None:
    """Once etcd is there (the cluster fixture made sure), the installer only confirms it."""
    from qwen_refresher.testing.etcd_cluster import INSTALL_SCRIPT

    for args in ([], ["--check"]):
        done = subprocess.run([str(INSTALL_SCRIPT), *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"ETCD={cluster.etcd}" in done.stdout and "already installed" in done.stderr
