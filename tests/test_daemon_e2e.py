"""The real daemon, as a subprocess, against the real fake server and real files."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import (
    ROOT,
    DaemonProcess,
    OpenClawHome,
    all_tokens,
    assert_no_secrets,
    openclaw_json,
    qwen_profile,
    wait_for,
)


def seed(oc: OpenClawHome, fake: FakeQwen, *, lifetime: float, agent: str = "main",
         extra: dict[str, object] | None = None) -> tuple[Path, dict[str, object]]:
    access, refresh, expires = fake.issue_tokens(lifetime=lifetime)
    doc: dict[str, object] = {
        "version": 1,
        "profiles": {
            "anthropic:default": {"type": "api_key", "provider": "anthropic", "key": "sk-ant-x"},
            "qwen-portal:default": qwen_profile(access, refresh, expires),
            "openai:work": {"type": "oauth", "provider": "openai", "access": "o-acc",
                            "refresh": "o-ref", "expires": 1_900_000_000_000, "email": "a@b"},
        },
        "order": {"qwen-portal": ["qwen-portal:default"]},
        "lastGood": {"qwen-portal": "qwen-portal:default"},
        "usageStats": {"qwen-portal:default": {"errorCount": 0, "lastUsed": 1772790000000}},
        **(extra or {}),
    }
    return oc.write_store(doc, agent=agent), doc


def current_refresh(path: Path, profile: str = "qwen-portal:default") -> str:
    return str(json.loads(path.read_bytes())["profiles"][profile]["refresh"])


def test_rotates_before_expiry_and_leaves_everything_else_byte_identical(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    path, doc = seed(oc, fake, lifetime=8, extra={"customTopLevel": {"keep": [1, 2.5, "ü"]}})
    old_expires = doc["profiles"]["qwen-portal:default"]["expires"]  # type: ignore[index]
    with DaemonProcess(oc, fake, margin="4") as daemon:
        wait_for(lambda: len(fake.refresh_requests()) >= 1, 15, "a refresh", daemon)
        wait_for(lambda: current_refresh(path) == fake.issued[-1].refresh_token, 5,
                 "the rotated token on disk", daemon)
        rotated_at = time.time() * 1000
    assert rotated_at < old_expires, "the refresh must happen before the token expires"
    issued = fake.issued[-1]
    expected = json.loads(openclaw_json(doc))
    entry = expected["profiles"]["qwen-portal:default"]
    written_expires = json.loads(path.read_bytes())["profiles"]["qwen-portal:default"]["expires"]
    assert abs(written_expires - issued.expires_ms) < 2000, "expires in milliseconds"
    entry.update(access=issued.access_token, refresh=issued.refresh_token,
                 expires=written_expires)
    # Same keys, same order, same 2-space layout: only the three token fields differ.
    assert path.read_bytes() == openclaw_json(expected)
    assert (path.stat().st_mode & 0o777) == 0o600
    request = fake.refresh_requests()[0]
    assert request.content_type == "application/x-www-form-urlencoded"
    assert request.accept == "application/json"
    assert request.user_agent and request.user_agent.startswith("qwen-refresher/")
    assert fake.reuse_count == 0
    assert_no_secrets([daemon.output], all_tokens(fake))


def test_a_reader_never_sees_a_torn_file(oc: OpenClawHome, fake: FakeQwen) -> None:
    fake.configure(lifetime=2.0)
    path, _ = seed(oc, fake, lifetime=2.0)
    failures: list[str] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                json.loads(path.read_bytes())
                reads += 1
            except FileNotFoundError:
                failures.append("missing")
            except ValueError as exc:
                failures.append(str(exc)[:80])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with DaemonProcess(oc, fake, margin="1") as daemon:
            wait_for(lambda: len(fake.refresh_requests()) >= 4, 20, "four rotations", daemon)
    finally:
        stop.set()
        thread.join()
    assert reads > 100
    assert failures == []
    assert fake.reuse_count == 0


def test_a_held_openclaw_lock_delays_the_refresh(oc: OpenClawHome, fake: FakeQwen) -> None:
    path, _ = seed(oc, fake, lifetime=3)
    lock = Path(str(path.resolve()) + ".lock")
    # A live holder: our own pid, a fresh createdAt, exactly as OpenClaw writes it.
    lock.write_text(json.dumps({"pid": os.getpid(), "createdAt": time.strftime(
        "%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}, indent=2))
    with DaemonProcess(oc, fake, margin="2.5") as daemon:
        time.sleep(3.0)
        assert fake.refresh_requests() == [], "no refresh while OpenClaw holds the lock"
        before = path.read_bytes()
        lock.unlink()
        wait_for(lambda: path.read_bytes() != before, 10, "the write after release", daemon)
    assert current_refresh(path) == fake.issued[-1].refresh_token
    assert not lock.exists(), "the daemon releases its own lock"


def test_transient_503s_are_retried_with_backoff(oc: OpenClawHome, fake: FakeQwen) -> None:
    path, _ = seed(oc, fake, lifetime=5)
    fake.inject("503", count=2)
    with DaemonProcess(oc, fake, margin="4") as daemon:
        wait_for(lambda: current_refresh(path) == fake.issued[-1].refresh_token
                 and len(fake.refresh_requests()) == 3, 20, "success after two 503s", daemon)
        failed = [e for e in daemon.events() if e.get("event") == "refresh_failed"]
    times = [r.monotonic for r in fake.refresh_requests()]
    assert len(failed) == 2
    assert times[1] - times[0] >= 0.5, "back-off, not a tight loop"
    assert times[2] - times[1] >= times[1] - times[0] - 0.5
    assert_no_secrets([daemon.output], all_tokens(fake))


def test_retry_after_is_honoured(oc: OpenClawHome, fake: FakeQwen) -> None:
    # Refreshed 4 s before expiry: Retry-After 3 is honoured (it never passes the expiry).
    path, _ = seed(oc, fake, lifetime=8)
    fake.inject("429", retry_after=3)
    with DaemonProcess(oc, fake, margin="4") as daemon:
        wait_for(lambda: len(fake.refresh_requests()) == 2, 15, "the retry", daemon)
    first, second = fake.refresh_requests()[:2]
    assert second.monotonic - first.monotonic >= 2.9


def test_rejected_token_needs_login_then_a_new_login_recovers(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    path, doc = seed(oc, fake, lifetime=4)
    fake.reject_token(current_refresh(path))
    with DaemonProcess(oc, fake, margin="3") as daemon:
        event = daemon.wait_event("needs_login")
        # qwen-refresher's own login leads (it writes the whole family); OpenClaw's follows.
        assert event["message"].split("log in again with: ")[1].startswith(
            "qwen-refresher login --store ")
        assert event["run"].endswith("--profile qwen-portal:default")
        assert "openclaw models auth login --provider qwen-portal" in event["alternatives"]
        assert str(path.name) in json.dumps(event)
        time.sleep(3)
        assert len(fake.refresh_requests()) == 1, "a rejected token is never sent again"
        state = json.loads((oc.our_state / "state.json").read_text())
        assert [p["state"] for p in state["profiles"]] == ["needs_login"]
        # The person logs in again: a new refresh token appears in the file.
        access, refresh, expires = fake.issue_tokens(lifetime=4)
        doc["profiles"]["qwen-portal:default"] = qwen_profile(access, refresh, expires)  # type: ignore[index]
        oc.write_store(doc)
        wait_for(lambda: len(fake.refresh_requests()) == 2, 10, "refresh of the new login",
                 daemon)
        wait_for(lambda: current_refresh(path) == fake.issued[-1].refresh_token, 5,
                 "rotated login on disk", daemon)
    assert_no_secrets([daemon.output], all_tokens(fake))


def test_a_malformed_store_is_left_alone_and_others_are_served(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    broken = oc.write_store(b'{"version": 1, "profiles": {"qwen-portal:default": {', agent="main")
    good, _ = seed(oc, fake, lifetime=4, agent="work")
    with DaemonProcess(oc, fake, margin="3") as daemon:
        event = daemon.wait_event("store_invalid")
        assert "main/agent/auth-profiles.json" in event["store"]
        assert "not valid JSON" in event["error"]
        wait_for(lambda: current_refresh(good) == fake.issued[-1].refresh_token, 10,
                 "the healthy agent refreshed", daemon)
        assert broken.read_bytes() == b'{"version": 1, "profiles": {"qwen-portal:default": {'
        # Fixing the file brings it back without a restart.
        seed(oc, fake, lifetime=4, agent="main")
        daemon.wait_event("store_recovered")
        wait_for(lambda: current_refresh(broken) == fake.issued[-1].refresh_token, 10,
                 "the repaired agent refreshed", daemon)


def test_sigterm_exits_zero_quickly(oc: OpenClawHome, fake: FakeQwen) -> None:
    seed(oc, fake, lifetime=3600)
    daemon = DaemonProcess(oc, fake)
    daemon.wait_event("started")
    start = time.monotonic()
    daemon.signal(signal.SIGTERM)
    rc = daemon.stop()
    assert rc == 0
    assert time.monotonic() - start < 3
    assert not (oc.store_path().parent / "auth-profiles.json.lock").exists()


def test_an_agent_created_later_is_picked_up(oc: OpenClawHome, fake: FakeQwen) -> None:
    oc.state.mkdir(parents=True)
    with DaemonProcess(oc, fake, margin="3") as daemon:
        daemon.wait_event("started")
        path, _ = seed(oc, fake, lifetime=4, agent="late")
        wait_for(lambda: len(fake.refresh_requests()) == 1, 10, "the new agent refreshed",
                 daemon)
        wait_for(lambda: current_refresh(path) == fake.issued[-1].refresh_token, 5,
                 "its rotated token on disk", daemon)


def test_a_reverted_token_is_reapplied_without_reusing_it(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    path, doc = seed(oc, fake, lifetime=4)  # refreshed at half its life; the next one lives 1 h
    consumed = current_refresh(path)
    with DaemonProcess(oc, fake, margin="5") as daemon:
        wait_for(lambda: current_refresh(path) != consumed, 10, "first rotation", daemon)
        fresh = path.read_bytes()
        # An old gateway writes its stale snapshot back, consumed refresh token included.
        oc.write_store(doc)
        daemon.wait_event("revert_undone")
        wait_for(lambda: path.read_bytes() == fresh, 5, "fresh tokens re-applied", daemon)
    assert fake.reuse_count == 0
    assert len(fake.refresh_requests()) == 1


def test_run_once_refreshes_what_is_due_and_exits(oc: OpenClawHome, fake: FakeQwen) -> None:
    due, _ = seed(oc, fake, lifetime=60, agent="main")
    fresh, _ = seed(oc, fake, lifetime=7200, agent="other")
    fresh_bytes = fresh.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_refresher", "run", "--once", "--token-url", fake.token_url,
         "--margin", "15m"], cwd=ROOT, env=oc.env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rotated = [t for t in fake.issued if t.via == "refresh"]
    assert len(rotated) == 1 and current_refresh(due) == rotated[0].refresh_token
    assert fresh.read_bytes() == fresh_bytes
    assert len(fake.refresh_requests()) == 1


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--margin", "soon", "margin"),
    ("--token-url", "http://chat.qwen.example/token", "token_url"),
    ("--listen", "not-an-address", "listen"),
])
def test_bad_configuration_exits_78_with_one_line(oc: OpenClawHome, flag: str, value: str,
                                                  needle: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "qwen_refresher", "run", flag, value],
                          cwd=ROOT, env=oc.env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_bad_toml_names_the_file(oc: OpenClawHome, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("margin = [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "qwen_refresher", "run", "--config",
                           str(config)], cwd=ROOT, env=oc.env(), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 78
    assert str(config) in proc.stderr and "TOML" in proc.stderr


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_an_unwritable_store_keeps_the_rotation_in_the_journal(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    path, _ = seed(oc, fake, lifetime=4)
    if not _chattr("+i", path):
        pytest.skip("chattr +i is not available here (needs root on ext4/xfs/btrfs)")
    try:
        with DaemonProcess(oc, fake, margin="3") as daemon:
            daemon.wait_event("write_failed", timeout=15)
            journal = oc.our_state / "journal.json"
            assert journal.exists() and (journal.stat().st_mode & 0o777) == 0o600
            rotated = [t for t in fake.issued if t.via == "refresh"]
            assert len(rotated) == 1
            assert rotated[0].refresh_token in journal.read_text()
            time.sleep(2)
            assert len(fake.refresh_requests()) == 1, "the write is retried, not the refresh"
            _chattr("-i", path)
            wait_for(lambda: current_refresh(path) == rotated[0].refresh_token, 20,
                     "the journaled tokens written once the store is writable", daemon)
            wait_for(lambda: not journal.exists(), 5, "the journal emptied", daemon)
        assert len(fake.refresh_requests()) == 1
        assert fake.reuse_count == 0
        assert_no_secrets([daemon.output], all_tokens(fake))
    finally:
        _chattr("-i", path)


def test_a_crash_after_the_answer_is_recovered_from_the_journal(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    """kill -9 while the store is unwritable: the restarted daemon finds the tokens."""
    path, _ = seed(oc, fake, lifetime=4)
    if not _chattr("+i", path):
        pytest.skip("chattr +i is not available here")
    try:
        daemon = DaemonProcess(oc, fake, margin="3")
        daemon.wait_event("write_failed", timeout=15)
        daemon.signal(signal.SIGKILL)
        daemon.stop()
        _chattr("-i", path)
        rotated = [t for t in fake.issued if t.via == "refresh"][0]
        with DaemonProcess(oc, fake, margin="3") as second:
            second.wait_event("journal_replay")
            wait_for(lambda: current_refresh(path) == rotated.refresh_token, 10,
                     "journaled tokens written by the next run", second)
        assert fake.reuse_count == 0
    finally:
        _chattr("-i", path)


def test_a_server_that_keeps_the_refresh_token_is_not_refreshed_in_a_loop(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    """No refresh_token in the answer: keep the old one, plan by the new expiry."""
    fake.configure(refresh_in_response="omit", lifetime=3.0)
    path, _ = seed(oc, fake, lifetime=3.0)
    original = current_refresh(path)
    with DaemonProcess(oc, fake, margin="1") as daemon:
        wait_for(lambda: len(fake.refresh_requests()) >= 2, 15, "two refreshes", daemon)
        time.sleep(1.0)
    times = [r.monotonic for r in fake.refresh_requests()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 1.0, f"refreshes {gaps} apart: a loop"
    assert current_refresh(path) == original
    doc = json.loads(path.read_bytes())["profiles"]["qwen-portal:default"]
    assert doc["access"] == fake.issued[-1].access_token
