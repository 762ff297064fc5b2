"""Regression tests for the review's file-level defects (r11, r13, r8 in /tmp/review).

* r11: one store reached by two names (a symlinked state dir plus ``--store`` or an
  ``agentDir`` spelling the other path) was managed twice; the engine took the shared lock
  twice and waited on itself until ``LockTimeout`` on every run: never refreshed.
* r13: a symlinked ``openclaw.json`` (stow, chezmoi, home-manager) was refused, so agents
  with their own ``agentDir`` went unmanaged.
* r8: the shipped Kubernetes init container made the state dir 2755 and the daemon refused
  to start (exit 78).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from qwen_refresher.testing.fake_qwen import FakeQwen, FakeQwenConfig
from tests.harness import (
    ROOT,
    DaemonProcess,
    OpenClawHome,
    all_tokens,
    assert_no_secrets,
    qwen_profile,
    wait_for,
)

PROFILE = "qwen-portal:default"


@pytest.fixture
def short() -> Iterator[FakeQwen]:
    with FakeQwen(FakeQwenConfig(lifetime=600)) as server:
        yield server


def _store(oc: OpenClawHome, fake: FakeQwen, lifetime: float, **where: object) -> tuple[Path, str]:
    access, refresh, expires = fake.issue_tokens(lifetime=lifetime)
    path = oc.write_store({"version": 1, "profiles": {PROFILE: qwen_profile(access, refresh,
                                                                              expires)}},
                          **where)  # type: ignore[arg-type]
    return path, refresh


def _rotated(fake: FakeQwen, refresh: str) -> bool:
    return any(r.refresh_token == refresh for r in fake.refresh_requests())


# -- r11: one store, two names ------------------------------------------------------------------


def test_unique_files_keeps_each_real_file_once_under_its_first_name(tmp_path: Path) -> None:
    from qwen_refresher.paths import unique_files

    real = tmp_path / "state" / "agents" / "main" / "agent"
    real.mkdir(parents=True)
    (real / "auth-profiles.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "state")
    via_link = tmp_path / "link" / "agents" / "main" / "agent" / "auth-profiles.json"
    dotted = real / ".." / "agent" / "auth-profiles.json"
    hard = tmp_path / "hard.json"
    os.link(real / "auth-profiles.json", hard)
    other = real / "other.json"
    other.write_text("{}")
    # a file that does not exist yet, named through the symlinked dir and directly
    future_link = tmp_path / "link" / "agents" / "main" / "agent" / "later.json"
    future_real = real / "later.json"

    # another agent's store that is a symlink out of its dir to this one: not merged (the
    # store check refuses it by name; merged, it could shadow the usable spelling)
    evil = tmp_path / "state" / "agents" / "evil" / "agent"
    evil.mkdir(parents=True)
    (evil / "auth-profiles.json").symlink_to(real / "auth-profiles.json")
    missing_dir = tmp_path / "link" / "agents" / "new" / "agent" / "auth-profiles.json"

    got = unique_files([via_link, real / "auth-profiles.json", dotted, hard, other,
                        future_link, future_real, evil / "auth-profiles.json", missing_dir,
                        real.parent.parent / "new" / "agent" / "auth-profiles.json"])
    assert got == [via_link, hard, other, future_link, evil / "auth-profiles.json",
                   missing_dir], got
    # the order decides which spelling wins
    assert unique_files([real / "auth-profiles.json", via_link]) == [real / "auth-profiles.json"]


@pytest.mark.parametrize("how", ["store-flag", "agent-dir"])
def test_one_store_reached_by_two_paths_is_refreshed(how: str, oc: OpenClawHome,
                                                     short: FakeQwen) -> None:
    """r11 against the real daemon: before the fix every run ended in lock_timeout."""
    path, refresh = _store(oc, short, 5)
    link = oc.root / "oc-link"
    link.symlink_to(oc.state)
    via_link = link / "agents" / "main" / "agent" / "auth-profiles.json"
    args = ["--sweep-interval", "600", "--lock-timeout", "3"]
    if how == "store-flag":
        args += ["--store", str(via_link)]
    else:
        (oc.state / "openclaw.json").write_text(json.dumps(
            {"agents": {"list": [{"id": "main", "agentDir": str(via_link.parent)}]}}))
    with DaemonProcess(oc, short, *args) as daemon:
        wait_for(lambda: _rotated(short, refresh), 12, "the store's refresh", daemon)
        wait_for(lambda: refresh not in path.read_text(), 5, "the rotation on disk", daemon)
        found = [e for e in daemon.events() if e.get("event") == "store_found"]
        assert len(found) == 1, daemon.output[-3000:]
        assert not [e for e in daemon.events() if e.get("event") == "refresh_failed"], \
            daemon.output[-3000:]
        daemon.stop()
    assert_no_secrets([daemon.output], all_tokens(short))


def test_the_engine_takes_a_shared_lock_once(tmp_path: Path, short: FakeQwen) -> None:
    """Belt and braces: two Store objects for one file in one family take its lock once."""
    from qwen_refresher.config import QWEN_CLIENT_ID
    from qwen_refresher.engine import Engine, Member
    from qwen_refresher.history import TokenHistory
    from qwen_refresher.journal import Journal
    from qwen_refresher.qwen import QwenOAuthClient
    from qwen_refresher.stores.openclaw import OpenClawStore

    agent = tmp_path / "state" / "agent"
    agent.mkdir(parents=True, mode=0o700)
    access, refresh, expires = short.issue_tokens(lifetime=600)
    store = agent / "auth-profiles.json"
    store.write_text(json.dumps({"version": 1, "profiles": {
        PROFILE: qwen_profile(access, refresh, expires)}}))
    os.chmod(store, 0o600)
    (tmp_path / "link").symlink_to(tmp_path / "state")
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    a = OpenClawStore(store)
    b = OpenClawStore(tmp_path / "link" / "agent" / "auth-profiles.json")
    assert a.lock_path() == b.lock_path()
    with QwenOAuthClient(short.token_url, short.device_code_url, QWEN_CLIENT_ID) as client:
        engine = Engine(client=client, salt=b"s" * 16, history=TokenHistory(),
                        journal=Journal(ours), lock_timeout=2)
        outcome = engine.run([Member(a, PROFILE), Member(b, PROFILE)], due_at=0)
    assert outcome.result == "rotated", outcome.reason
    assert refresh not in store.read_text()
    assert not a.lock_path().exists()


def test_status_shows_one_file_once(oc: OpenClawHome, short: FakeQwen) -> None:
    """status dedupes by the daemon's rule: one row for one file under two names."""
    path, _ = _store(oc, short, 600)
    link = oc.root / "oc-link"
    link.symlink_to(oc.state)
    via_link = link / "agents" / "main" / "agent" / "auth-profiles.json"
    run = subprocess.run(
        [sys.executable, "-m", "qwen_refresher", "status", "--json", "--store", str(via_link)],
        cwd=ROOT, env=oc.env(), capture_output=True, text=True, timeout=30)
    doc = json.loads(run.stdout)
    assert [p["store"] for p in doc["profiles"]] == [str(via_link)], run.stdout


# -- r13: a symlinked openclaw.json --------------------------------------------------------------


def test_a_symlinked_openclaw_json_is_followed(oc: OpenClawHome, short: FakeQwen) -> None:
    """r13: agents set in a dotfile-managed (symlinked) openclaw.json are managed."""
    custom = oc.root / "elsewhere" / "work-agent"
    custom.mkdir(parents=True, mode=0o700)
    path, refresh = _store(oc, short, 5, path=custom / "auth-profiles.json")
    dotfiles = oc.root / "dotfiles"
    dotfiles.mkdir()
    (dotfiles / "openclaw.json").write_text(json.dumps(
        {"agents": {"list": [{"id": "work", "agentDir": str(custom)}]}}))
    oc.state.mkdir(parents=True, exist_ok=True)
    (oc.state / "openclaw.json").symlink_to(dotfiles / "openclaw.json")
    before = (dotfiles / "openclaw.json").read_bytes()
    with DaemonProcess(oc, short, "--sweep-interval", "600") as daemon:
        wait_for(lambda: _rotated(short, refresh), 12, "the custom agent's refresh", daemon)
        assert not [e for e in daemon.events()
                    if e.get("event") == "openclaw_config_unusable"], daemon.output[-3000:]
        daemon.stop()
    assert (dotfiles / "openclaw.json").read_bytes() == before
    assert (oc.state / "openclaw.json").is_symlink()


def _config_target_dir(p: Path) -> None:
    p.mkdir()


def _config_target_huge(p: Path) -> None:
    p.write_bytes(b"{" + b" " * (300 * 1024) + b"}")


def _config_target_deep(p: Path) -> None:
    p.write_text('{"a": ' + "[" * 60 + "]" * 60 + "}")


@pytest.mark.parametrize("target, problem", [
    (_config_target_dir, "is a directory"),
    (_config_target_huge, "limit"),
    (_config_target_deep, "deeper than"),
    (os.mkfifo, "fifo"),
    (None, "cannot be resolved"),
])
def test_what_a_symlinked_openclaw_json_points_at_gets_every_check(
        tmp_path: Path, target: object, problem: str) -> None:
    """Following the link keeps the type, size and depth checks on its target."""
    from qwen_refresher.discovery import ConfigUnusable, load_openclaw_config

    config = tmp_path / "openclaw.json"
    real = tmp_path / "dotfiles" / "openclaw.json"
    real.parent.mkdir()
    if target is None:
        config.symlink_to(config)  # a loop
    else:
        target(real)  # type: ignore[operator]
        config.symlink_to(real)
    with pytest.raises(ConfigUnusable, match=problem):
        load_openclaw_config(config)


# -- r8: the Kubernetes state dir ---------------------------------------------------------------


def test_the_kubernetes_init_container_makes_a_0700_state_dir(tmp_path: Path) -> None:
    """Run the shipped init script (paths mapped into tmp) on a setgid volume, umask 022."""
    manifest = ROOT / "deploy" / "kubernetes" / "deployment.yaml"
    deployment = next(d for d in yaml.safe_load_all(manifest.read_text())
                      if d and d["kind"] == "Deployment")
    init = deployment["spec"]["template"]["spec"]["initContainers"][0]
    script = init["command"][-1]
    vol, config = tmp_path / "vol", tmp_path / "config"
    vol.mkdir()
    os.chmod(vol, 0o2775)  # kubelet's fsGroup treatment of the volume root
    config.mkdir()
    (config / "openclaw.json").write_text("{}")
    (config / "AGENTS.md").write_text("x")
    script = script.replace("/home/node/.openclaw", str(vol)).replace("/config/", f"{config}/")
    subprocess.run(["sh", "-ec", f"umask 022\n{script}"], check=True, timeout=30)
    mode = stat.S_IMODE((vol / ".qwen-refresher").stat().st_mode)
    assert mode & 0o077 == 0, f"{mode:04o}"


def test_our_own_state_dir_readable_by_others_is_tightened(oc: OpenClawHome,
                                                           short: FakeQwen) -> None:
    """2755 (mkdir -p under umask 022 on a setgid volume), ours: 0700, one warning, starts."""
    oc.our_state.mkdir()
    os.chmod(oc.our_state, 0o2755)
    with DaemonProcess(oc, short) as daemon:
        daemon.wait_event("started", timeout=30)
        warned = [e for e in daemon.events() if e.get("event") == "state_dir_mode_tightened"]
        assert len(warned) == 1 and warned[0]["old_mode"] == "2755", daemon.output[-3000:]
        assert stat.S_IMODE(oc.our_state.stat().st_mode) == 0o700
        daemon.stop()


def test_a_group_writable_state_dir_is_refused_naming_the_chmod(oc: OpenClawHome,
                                                                short: FakeQwen) -> None:
    oc.our_state.mkdir()
    os.chmod(oc.our_state, 0o2775)
    with DaemonProcess(oc, short) as daemon:
        rc = daemon.proc.wait(20)
        daemon._reader.join(5)
    assert rc == 78, daemon.output[-3000:]
    assert re.search(rf"has mode 2775.*`chmod 700 {re.escape(str(oc.our_state))}`",
                     daemon.output), daemon.output[-3000:]
    assert stat.S_IMODE(oc.our_state.stat().st_mode) == 0o2775
    assert list(oc.our_state.iterdir()) == []
