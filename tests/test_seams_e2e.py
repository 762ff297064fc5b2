"""Issue 13's seams back to a lock-out, each against the real daemon and the package's fake.

1. a failed ``on_rotate`` (the gateway reload) is retried with backoff until it succeeds, and
   is visible in ``status``, ``/readyz``, ``/metrics``, ``state.json`` and the log meanwhile;
2. a family member rotated early by another program is adopted by its family, whose own
   (consumed) refresh token is never sent;
5. a store scan requested while one runs is run again right after it, never dropped;
6. the bookkeeping of running refresh jobs cannot be left stale by the scheduler's events.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_SUBMITTED, JobEvent

from qwen_refresher.config import load_settings
from qwen_refresher.daemon import Daemon
from qwen_refresher.qwen import QwenOAuthClient
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
from tests.test_families_e2e import qwen_code_doc, refresh_of, seed_family

PROFILE = "qwen-portal:default"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status), resp.read(1 << 20).decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read(1 << 20).decode()


def _state(oc: OpenClawHome) -> dict[str, Any]:
    try:
        doc = json.loads((oc.our_state / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _hook_of(oc: OpenClawHome) -> dict[str, Any] | None:
    for p in _state(oc).get("profiles", []):
        if p.get("profile") == PROFILE:
            hook = p.get("hook")
            return hook if isinstance(hook, dict) else None
    return None


def _status(oc: OpenClawHome) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qwen_refresher", "status"], cwd=ROOT,
                          env=oc.env(), capture_output=True, text=True, timeout=30, check=False)


# -- 1. the gateway reload is retried until it lands ----------------------------------------

def test_a_failed_reload_is_retried_with_backoff_and_shown_until_it_succeeds(
        oc: OpenClawHome, fake: FakeQwen, tmp_path: Path) -> None:
    fake.configure(lifetime=3600)  # one rotation: every later hook run is a retry
    access, refresh, expires = fake.issue_tokens(lifetime=4)
    store = oc.write_store({"version": 1, "profiles": {PROFILE: qwen_profile(access, refresh,
                                                                              expires)}})
    runs, gate = tmp_path / "runs", tmp_path / "gateway-up"
    # The hook prints the token it finds in the store: what we show of its output is redacted.
    hook = (f"date +%s.%N >> {runs}; "
            f"if [ -e {gate} ]; then echo reloaded; exit 0; fi; "
            f"echo \"gateway busy: $(grep -o 'fakeref-[A-Za-z0-9_-]*' {store} | tail -1)\"; "
            "exit 3")
    env = oc.env(QWEN_REFRESHER_ON_ROTATE=hook, QWEN_REFRESHER_LISTEN="127.0.0.1:0")
    with DaemonProcess(oc, fake, env=env, margin="3") as daemon:
        address = daemon.wait_event("health_listening")["address"]
        base = f"http://{address}"
        wait_for(lambda: runs.exists() and len(runs.read_text().split()) >= 3, 20,
                 "the failing hook retried twice", daemon)
        hook_state = _hook_of(oc)
        assert hook_state is not None and hook_state["ok"] is False, hook_state
        assert isinstance(hook_state["failing_since"], float)
        assert hook_state["output"].startswith("gateway busy: [redacted]"), hook_state
        status = _status(oc)
        assert status.returncode == 1, status.stdout + status.stderr
        assert "reload failed" in status.stdout and "gateway busy" in status.stdout, \
            status.stdout
        ready_code, ready_body = _get(base + "/readyz")
        assert ready_code == 503 and "reload failed" in ready_body, ready_body
        _, metrics = _get(base + "/metrics")
        assert any(line.startswith("qwen_refresher_reload_failing{") and line.endswith(" 1.0")
                   for line in metrics.splitlines()), metrics
        gate.touch()
        wait_for(lambda: (_hook_of(oc) or {}).get("ok") is True, 30,
                 "the reload to succeed at a retry", daemon)
        daemon.wait_event("on_rotate_recovered")
        status_after = _status(oc)
        ready_after, _ = _get(base + "/readyz")
        _, metrics_after = _get(base + "/metrics")
    times = [float(t) for t in runs.read_text().split()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] <= 10, f"first retry after {gaps[0]:.1f}s"
    assert all(g <= 60 for g in gaps), gaps
    assert gaps[0] >= 1 and gaps[1] >= 2, f"retries back off (1-2 s, 2-3 s...): {gaps}"
    assert len(fake.refresh_requests()) == 1, "a failed hook never causes another refresh"
    names = [e.get("event") for e in daemon.events()]
    assert names.count("on_rotate_failed") == 1, "said once per episode"
    assert names.count("on_rotate_recovered") == 1
    assert status_after.returncode == 0, status_after.stdout
    assert ready_after == 200
    assert "qwen_refresher_reload_failing{" in metrics_after
    assert_no_secrets([daemon.output, status.stdout, ready_body, metrics,
                       (oc.our_state / "state.json").read_text()], all_tokens(fake))


def test_a_new_rotation_supersedes_a_failing_reload(
        oc: OpenClawHome, fake: FakeQwen, tmp_path: Path) -> None:
    """The retry carries the newest rotation's variables, and one success ends the episode."""
    fake.configure(lifetime=3)
    access, refresh, expires = fake.issue_tokens(lifetime=3)
    oc.write_store({"version": 1, "profiles": {PROFILE: qwen_profile(access, refresh, expires)}})
    runs = tmp_path / "runs"
    # Fails for the first rotation's token only: the second rotation's hook succeeds.
    hook = (f"echo \"$QWEN_REFRESHER_EXPIRES_MS\" >> {runs}; "
            f"[ \"$(head -1 {runs})\" != \"$QWEN_REFRESHER_EXPIRES_MS\" ]")
    env = oc.env(QWEN_REFRESHER_ON_ROTATE=hook)
    with DaemonProcess(oc, fake, env=env, margin="2") as daemon:
        wait_for(lambda: len(fake.refresh_requests()) >= 2, 20, "two rotations", daemon)
        wait_for(lambda: (_hook_of(oc) or {}).get("ok") is True, 20, "reload ok", daemon)
        time.sleep(0.5)
        names = [e.get("event") for e in daemon.events()]
    lines = runs.read_text().split()
    assert lines[-1] != lines[0], "the retry used the newest rotation's variables"
    assert names.count("on_rotate_failed") == 1
    assert names.count("on_rotate_recovered") == 1


# -- 2. an early rotation by a sibling is adopted, ours is never spent ----------------------

def test_an_early_rotation_by_a_sibling_is_adopted_without_spending_ours(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    fake.configure(lifetime=3600)
    # Due 12 s after seeding: room for a slow start on a loaded machine before Qwen Code acts.
    paths = seed_family(oc, fake, lifetime=20)
    shared = refresh_of(paths[0])
    with DaemonProcess(oc, fake, margin="8") as daemon:
        daemon.wait_event("started")
        assert fake.refresh_requests() == [], "started too late for this test:\n" + \
            daemon.output[-2000:]
        # Qwen Code refreshes by itself, long before the daemon's margin (a 401, a restart...).
        with QwenOAuthClient(fake.token_url, fake.device_code_url,
                             fake.config.client_id) as client:
            grant = client.refresh(shared)
        new = grant.to_credentials(int(time.time() * 1000), shared)
        paths[2].write_text(json.dumps(qwen_code_doc(new.access, new.refresh, new.expires_ms),
                                       indent=2))
        daemon.wait_event("family_split")
        # At the old token's due time the family adopts the sibling's token, under the locks.
        daemon.wait_event("adopted_descendant", timeout=30)
        wait_for(lambda: all(refresh_of(p) == new.refresh for p in paths), 10,
                 "every member on the sibling's new token", daemon)
        time.sleep(1)
        state = _state(oc)
        names = [e.get("event") for e in daemon.events()]
    assert fake.reuse_count == 0, "the consumed refresh token was sent"
    assert "needs_login" not in names
    assert {p["state"] for p in state["profiles"]} <= {"ok", "due", "refreshing"}, state
    assert all(refresh_of(p) == new.refresh for p in paths)
    assert "adopted_descendant" in names
    assert_no_secrets([daemon.output], all_tokens(fake))


# -- 5. a scan requested while one runs is not dropped ---------------------------------------

def _held_openclaw_lock(store: Path) -> None:
    now = datetime.now(UTC)
    created = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    lock = store.parent / (store.name + ".lock")
    lock.write_text(json.dumps({"pid": os.getpid(), "createdAt": created}))


def test_a_store_appearing_during_a_scan_is_found_promptly(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    access, refresh, expires = fake.issue_tokens(lifetime=3600)
    doc = {"version": 1, "profiles": {PROFILE: qwen_profile(access, refresh, expires)}}
    oc.write_store(doc, agent="main")
    # A broken store whose writer holds its lock: every discovery pass waits ~2 s on it.
    slow = oc.write_store(b'{"version": 1, "profiles": {', agent="slow")
    _held_openclaw_lock(slow)
    with DaemonProcess(oc, fake, margin="60") as daemon:
        daemon.wait_event("started")
        late1 = oc.write_store(doc, agent="late1")
        wait_for(lambda: any(e.get("event") == "store_found" and "late1" in str(e.get("store"))
                             for e in daemon.events()), 15, "late1 found", daemon)
        # The pass that found late1 is still reading the slow store: late2 lands during it.
        late2 = oc.write_store(doc, agent="late2")
        started = time.monotonic()
        wait_for(lambda: any(e.get("event") == "store_found" and "late2" in str(e.get("store"))
                             for e in daemon.events()), 10, "late2 found", daemon)
        took = time.monotonic() - started
    assert late1.exists() and late2.exists()
    assert took < 8, f"found after {took:.1f}s"


# -- 6. running-job bookkeeping cannot go stale ----------------------------------------------

def test_a_refresh_job_can_be_scheduled_again_after_it_ran(tmp_path: Path) -> None:
    """The scheduler reports a submission on its own thread, possibly after the job ended:
    bookkeeping filled by that event and emptied by the job stays 'running' forever, and the
    family is never scheduled again."""
    env = {"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "xdg"),
           "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    settings = load_settings({"state_dir": tmp_path / "state", "discover": False,
                              "qwen_code": False, "listen": "", "on_rotate": "none",
                              "notify_desktop": False}, env=env)
    daemon = Daemon(settings)
    ran = threading.Event()

    def slow_listener(event: JobEvent) -> None:
        if event.job_id.startswith("refresh:"):
            ran.wait(2)  # the job finishes before the daemon's own listeners hear of it
            time.sleep(0.2)

    daemon.scheduler.add_listener(slow_listener, EVENT_JOB_SUBMITTED)
    original = daemon._run_family

    def run_family(job_id: str) -> None:
        original(job_id)
        ran.set()

    daemon._run_family = run_family  # type: ignore[method-assign]
    try:
        daemon.start()
        job_id = "refresh:/nowhere#x"
        daemon._schedule(job_id, time.time())
        wait_for(ran.is_set, 5, "the first run")
        time.sleep(0.5)  # every listener has run
        ran.clear()
        daemon._schedule(job_id, time.time() + 0.1)
        wait_for(ran.is_set, 5, "the second run")
    finally:
        daemon.shutdown()
