"""Operating the daemon: hooks, reload, polling, suspend/resume, a second instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import (
    ROOT,
    DaemonProcess,
    OpenClawHome,
    all_tokens,
    assert_no_secrets,
    qwen_profile,
    wait_for,
)


def seed(oc: OpenClawHome, fake: FakeQwen, lifetime: float, agent: str = "main") -> Path:
    access, refresh, expires = fake.issue_tokens(lifetime=lifetime)
    return oc.write_store({"version": 1, "profiles": {
        "qwen-portal:default": qwen_profile(access, refresh, expires)}}, agent=agent)


def test_on_rotate_gets_names_and_times_never_tokens(oc: OpenClawHome, fake: FakeQwen,
                                                      tmp_path: Path) -> None:
    path = seed(oc, fake, lifetime=4)
    dump = tmp_path / "hook-env"
    hook = f"env > {dump}; echo \"args: $0 $*\" >> {dump}"
    env = oc.env(QWEN_REFRESHER_ON_ROTATE=hook)
    with DaemonProcess(oc, fake, margin="3", env=env) as daemon:
        daemon.wait_event("on_rotate_ok")
    text = dump.read_text()
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert values["QWEN_REFRESHER_PROFILE"] == "qwen-portal:default"
    assert values["QWEN_REFRESHER_STORE"] == str(path)
    assert values["QWEN_REFRESHER_EXPIRES_AT"].endswith("Z")
    assert int(values["QWEN_REFRESHER_EXPIRES_MS"]) == json.loads(path.read_text())[
        "profiles"]["qwen-portal:default"]["expires"]
    assert_no_secrets([text, daemon.output], all_tokens(fake))


def test_a_failing_or_hanging_hook_never_stops_the_daemon(oc: OpenClawHome,
                                                          fake: FakeQwen) -> None:
    fake.configure(lifetime=2.0)
    seed(oc, fake, lifetime=2.0)
    env = oc.env(QWEN_REFRESHER_ON_ROTATE="sleep 30", QWEN_REFRESHER_HOOK_TIMEOUT="0.5")
    with DaemonProcess(oc, fake, margin="1.5", env=env) as daemon:
        event = daemon.wait_event("on_rotate_failed")
        assert event["timed_out"] is True
        wait_for(lambda: len(fake.refresh_requests()) >= 2, 10, "rotations go on", daemon)


def test_sighup_reloads_the_configuration(oc: OpenClawHome, fake: FakeQwen,
                                          tmp_path: Path) -> None:
    seed(oc, fake, lifetime=40)
    config = tmp_path / "config.toml"
    config.write_text("margin = 1\n")
    # No --margin flag here: flags win over the file, and the file is what we reload. The
    # SIGHUP waits for "started": sent before the handler is installed, it would kill.
    with DaemonProcess(oc, fake, "--config", str(config), margin=None) as daemon:
        daemon.wait_ready()
        time.sleep(1)
        assert fake.refresh_requests() == []
        config.write_text("margin = 39\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: len(fake.refresh_requests()) == 1, 10, "a refresh under the new margin",
                 daemon)
        config.write_text("margin = [broken\n")
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reload_failed")
        time.sleep(0.5)
        assert daemon.proc.poll() is None, "a bad reload keeps the old settings, the daemon alive"
        assert daemon.stop() == 0
    assert daemon.has_event("reloaded") and daemon.has_event("reload_failed")


def test_polling_mode_notices_changes(oc: OpenClawHome, fake: FakeQwen) -> None:
    oc.state.mkdir(parents=True)
    with DaemonProcess(oc, fake, "--poll", margin="3") as daemon:
        daemon.wait_event("started")
        seed(oc, fake, lifetime=4, agent="late")
        wait_for(lambda: len(fake.refresh_requests()) == 1, 15, "the polled change", daemon)


def test_a_suspended_daemon_runs_the_missed_refresh_on_resume(oc: OpenClawHome,
                                                               fake: FakeQwen) -> None:
    """SIGSTOP stands in for a laptop suspend: the job's time passes while nothing runs."""
    seed(oc, fake, lifetime=5)
    with DaemonProcess(oc, fake, margin="3") as daemon:
        daemon.wait_event("started")
        daemon.signal(signal.SIGSTOP)
        time.sleep(4)  # the refresh was due 2 s after start
        assert fake.refresh_requests() == []
        resumed = time.monotonic()
        daemon.signal(signal.SIGCONT)
        wait_for(lambda: len(fake.refresh_requests()) == 1, 10, "the missed refresh", daemon)
        assert fake.refresh_requests()[0].monotonic - resumed < 3


def test_a_second_daemon_on_the_same_state_dir_refuses_to_start(oc: OpenClawHome,
                                                                 fake: FakeQwen) -> None:
    seed(oc, fake, lifetime=3600)
    with DaemonProcess(oc, fake) as daemon:
        daemon.wait_event("started")
        proc = subprocess.run([sys.executable, "-m", "qwen_refresher", "run"], cwd=ROOT,
                              env=oc.env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 75
    assert "already" in proc.stderr and str(os.getpid()) not in proc.stderr.split("pid")[0]


def test_status_judges_due_with_the_running_daemons_margin(oc: OpenClawHome,
                                                           fake: FakeQwen) -> None:
    """A store rotated after the daemon's last publish is re-read by status, which must use
    the daemon's margin (here 5 s), not its own default (15 min)."""
    path = seed(oc, fake, lifetime=600)
    with DaemonProcess(oc, fake, margin="5") as daemon:
        daemon.wait_event("started")
        time.sleep(0.5)
        access, refresh, expires = fake.issue_tokens(lifetime=600)
        oc.write_store({"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(access, refresh, expires)}})
        proc = subprocess.run([sys.executable, "-m", "qwen_refresher", "status", "--json"],
                              cwd=ROOT, env=oc.env(), capture_output=True, text=True, timeout=30)
    rows = json.loads(proc.stdout)["profiles"]
    assert [r["state"] for r in rows] == ["ok"], rows
    assert str(path) == rows[0]["store"]
