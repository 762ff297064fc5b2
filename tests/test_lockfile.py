"""OpenClaw's and Qwen Code's lock protocols, with real files and real processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher.errors import LockTimeout, LockUnusable
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


# -- bounded waits and atomic takeover (issues 12 and 13) -------------------------------------


def test_a_fifo_at_the_lock_path_is_refused_without_being_opened(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: it is never opened at all."""
    path = tmp_path / "oauth_creds.lock"
    os.mkfifo(path)
    start = time.monotonic()
    with pytest.raises(LockUnusable) as info:
        FileLock(path, QWEN_CODE, timeout=5).acquire()
    assert time.monotonic() - start < 0.5
    assert info.value.path == path and "FIFO" in str(info.value)
    assert stat.S_ISFIFO(path.lstat().st_mode)


def test_a_waiter_on_another_threads_lock_honours_stop(tmp_path: Path) -> None:
    """Threads of one process queue on a per-path mutex; that wait keeps the deadline and
    answers ``stop`` like the wait on the file does."""
    path = tmp_path / "a.json.lock"
    first = FileLock(path, OPENCLAW)
    first.acquire()
    stop = threading.Event()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            FileLock(path, OPENCLAW, timeout=30, stop=stop).acquire()
        except LockTimeout as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    stopped = time.monotonic()
    stop.set()
    waiter.join(5)
    assert not waiter.is_alive() and len(errors) == 1
    assert time.monotonic() - stopped < 0.5
    first.release()


def test_release_from_another_thread_frees_file_and_mutex_once(tmp_path: Path) -> None:
    """The daemon's shutdown drops locks a stuck worker still holds; the worker's own release
    afterwards must do no harm (to the next holder's lock either)."""
    path = tmp_path / "a.json.lock"
    lock = FileLock(path, OPENCLAW, timeout=1)
    lock.acquire()
    releaser = threading.Thread(target=lock.release)
    releaser.start()
    releaser.join(5)
    assert not path.exists()
    second = FileLock(path, OPENCLAW, timeout=1)
    assert second.acquire() < 0.5
    lock.release()
    assert path.exists(), "a second release removed the next holder's lock"
    second.release()
    assert not path.exists()


def test_a_takeover_leaves_nothing_behind_and_clears_a_killed_takers_debris(
        tmp_path: Path) -> None:
    path = tmp_path / "auth-profiles.json.lock"
    # A taker killed between moving a stale lock aside and discarding it left this:
    debris = tmp_path / ".auth-profiles.json.lock.0123456789ab.stale"
    debris.write_text(json.dumps({"pid": dead_pid(), "createdAt": iso(time.time() - 99)}))
    unrelated = tmp_path / ".auth-profiles.json.0123456789ab.tmp"
    unrelated.write_text("someone else's")
    path.write_text(json.dumps({"pid": dead_pid(), "createdAt": iso(time.time())}))
    lock = FileLock(path, OPENCLAW, timeout=1)
    assert lock.acquire() < 0.5
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [unrelated.name]


def test_an_oversized_lock_is_judged_by_its_mtime_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "a.json.lock"
    payload = json.dumps({"pid": dead_pid(), "createdAt": iso(time.time())}).encode()
    path.write_bytes(payload + b" " * 2_000_000)  # a dead pid, but not a lock anyone wrote
    with pytest.raises(LockTimeout):
        FileLock(path, OPENCLAW, timeout=0.3).acquire()
    old = time.time() - 40
    os.utime(path, (old, old))
    assert FileLock(path, OPENCLAW, timeout=1).acquire() < 0.5


def test_a_lock_replaced_between_judging_and_moving_it_aside_is_put_back(
        tmp_path: Path) -> None:
    """A writer that ignores our directory flock (OpenClaw's own contender: read, rm, create)
    may replace the stale lock after we judged it. What we then move aside is its live lock:
    the verify step sees another inode and puts it back, and we keep waiting."""
    path = tmp_path / "auth-profiles.json.lock"
    path.write_text(json.dumps({"pid": dead_pid(), "createdAt": iso(time.time())}))
    live = json.dumps({"pid": os.getpid(), "createdAt": iso(time.time())}).encode()
    judged: list[int] = []

    class Racing(FileLock):
        def _is_stale(self, seen: Any) -> bool:
            judged.append(1)
            if len(judged) == 2:  # the judgement under the flock, just before the rename
                tmp = tmp_path / "openclaw-wrote-this"
                tmp.write_bytes(live)
                os.replace(tmp, path)
                return True
            return super()._is_stale(seen)

    with pytest.raises(LockTimeout):
        Racing(path, OPENCLAW, timeout=0.4).acquire()
    assert len(judged) >= 3
    assert path.read_bytes() == live, "the other program's live lock was not put back"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
