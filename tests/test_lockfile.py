"""OpenClaw's and Qwen Code's lock protocols, with real files and real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qwen_refresher.errors import LockTimeout
from qwen_refresher.lockfile import OPENCLAW, QWEN_CODE, FileLock, pid_alive


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def test_lock_content_is_what_openclaw_writes(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "a.json.lock", OPENCLAW)
    with lock.held():
        payload = json.loads((tmp_path / "a.json.lock").read_text())
        assert payload["pid"] == os.getpid()
        assert payload["createdAt"].endswith("Z")
        assert (tmp_path / "a.json.lock").read_text().startswith('{\n  "pid"')
    assert not (tmp_path / "a.json.lock").exists()


def test_a_live_lock_makes_us_wait_then_times_out(tmp_path: Path) -> None:
    path = tmp_path / "a.json.lock"
    path.write_text(json.dumps({"pid": os.getpid(), "createdAt": iso(time.time())}))
    start = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        FileLock(path, OPENCLAW, timeout=0.6).acquire()
    assert 0.55 <= time.monotonic() - start < 2
    assert str(path) in str(info.value)
    assert path.exists(), "someone else's live lock is never removed"


def test_a_lock_released_while_we_wait_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "a.json.lock"
    path.write_text(json.dumps({"pid": os.getpid(), "createdAt": iso(time.time())}))
    threading.Timer(0.3, path.unlink).start()
    waited = FileLock(path, OPENCLAW, timeout=5).acquire()
    assert 0.25 <= waited < 2


@pytest.mark.parametrize("content", [
    lambda: {"pid": dead_pid(), "createdAt": iso(time.time())},
    lambda: {"pid": os.getpid(), "createdAt": iso(time.time() - 31)},
])
def test_openclaw_stale_locks_are_taken_over(tmp_path: Path, content: object) -> None:
    path = tmp_path / "a.json.lock"
    path.write_text(json.dumps(content()))  # type: ignore[operator]
    lock = FileLock(path, OPENCLAW, timeout=1)
    assert lock.acquire() < 0.5
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_an_old_mtime_makes_an_openclaw_lock_stale(tmp_path: Path) -> None:
    path = tmp_path / "a.json.lock"
    path.write_text("not json at all")
    old = time.time() - 40
    os.utime(path, (old, old))
    assert FileLock(path, OPENCLAW, timeout=1).acquire() < 0.5


def test_an_unparsable_fresh_lock_is_respected_until_its_mtime_is_old(tmp_path: Path) -> None:
    path = tmp_path / "a.json.lock"
    path.write_text("garbage")
    with pytest.raises(LockTimeout):
        FileLock(path, OPENCLAW, timeout=0.3).acquire()


def test_qwen_code_lock_is_a_uuid_and_stale_after_ten_seconds(tmp_path: Path) -> None:
    path = tmp_path / "oauth_creds.lock"
    lock = FileLock(path, QWEN_CODE, timeout=1)
    with lock.held():
        text = path.read_text()
        assert len(text) == 36 and text.count("-") == 4
    path.write_text("3f2b2c1e-0000-4000-8000-000000000000")
    with pytest.raises(LockTimeout):
        FileLock(path, QWEN_CODE, timeout=0.3).acquire()
    old = time.time() - 11
    os.utime(path, (old, old))
    assert FileLock(path, QWEN_CODE, timeout=1).acquire() < 0.5


def test_release_never_removes_a_lock_that_is_no_longer_ours(tmp_path: Path) -> None:
    path = tmp_path / "a.json.lock"
    lock = FileLock(path, OPENCLAW)
    lock.acquire()
    path.unlink()
    path.write_text(json.dumps({"pid": 1, "createdAt": iso(time.time())}))
    lock.release()
    assert path.exists()


def test_two_processes_never_hold_the_lock_together(tmp_path: Path) -> None:
    """Real processes contending: a counter file updated read-modify-write under the lock."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from pathlib import Path
from qwen_refresher.lockfile import FileLock, OPENCLAW
p = Path({str(counter)!r})
for _ in range(40):
    with FileLock(Path({str(tmp_path / 'c.lock')!r}), OPENCLAW, timeout=30).held():
        n = int(p.read_text()); p.write_text(str(n + 1))
"""
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(3)]
    for proc in procs:
        assert proc.wait(60) == 0
    assert counter.read_text() == "120"


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(dead_pid())
    assert not pid_alive(0)


def test_an_unparsable_created_at_is_stale_as_openclaw_judges_it(tmp_path: Path) -> None:
    path = tmp_path / "a.json.lock"
    path.write_text(json.dumps({"pid": os.getpid(), "createdAt": "yesterday-ish"}))
    assert FileLock(path, OPENCLAW, timeout=1).acquire() < 0.5


def test_a_symlinked_store_is_locked_under_its_own_name(tmp_path: Path) -> None:
    """OpenClaw locks realpath(dir)/auth-profiles.json.lock, not the link target's name."""
    from qwen_refresher.stores import OpenClawStore

    real_dir = tmp_path / "real"
    real_dir.mkdir()
    (real_dir / "target.json").write_text("{}")
    agent = tmp_path / "agent-link"
    agent.symlink_to(real_dir)
    (real_dir / "auth-profiles.json").symlink_to(real_dir / "target.json")
    store = OpenClawStore(agent / "auth-profiles.json")
    assert store.lock_path() == real_dir / "auth-profiles.json.lock"
