from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qwen_refresher.errors import StoreUnreadable, StoreWriteError
from qwen_refresher.fileio import atomic_write, read_store_file, resolve_confined


def test_atomic_write_keeps_mode_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "s.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    atomic_write(target, b"new", mode=0o640)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_a_new_file_is_0600(tmp_path: Path) -> None:
    target = tmp_path / "s.json"
    atomic_write(target, b"{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_concurrent_readers_see_old_or_new_never_a_mix(tmp_path: Path) -> None:
    target = tmp_path / "s.json"
    docs = [json.dumps({"n": i, "pad": "x" * 200_000}).encode() for i in range(2)]
    target.write_bytes(docs[0])
    bad: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            if data not in docs:
                bad.append(len(data))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(200):
        atomic_write(target, docs[i % 2])
    stop.set()
    thread.join()
    assert bad == []


def test_write_failure_names_the_file_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "gone" / "s.json"
    with pytest.raises(StoreWriteError) as info:
        atomic_write(target, b"{}")
    assert str(target) in str(info.value)


def test_owner_is_kept_when_running_as_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing owners needs root")
    target = tmp_path / "s.json"
    target.write_text("{}")
    os.chown(target, 1234, 1234)
    atomic_write(target, b"[]", owner=(1234, 1234))
    assert (target.stat().st_uid, target.stat().st_gid) == (1234, 1234)


def test_symlink_inside_the_directory_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "auth-profiles.json"
    link.symlink_to(real)
    assert resolve_confined(link) == real


def test_symlink_outside_the_directory_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    agent = tmp_path / "agent"
    agent.mkdir()
    (agent / "auth-profiles.json").symlink_to(outside)
    with pytest.raises(StoreUnreadable, match="outside"):
        read_store_file(agent / "auth-profiles.json")


def test_a_fifo_does_not_hang_us(tmp_path: Path) -> None:
    fifo = tmp_path / "auth-profiles.json"
    os.mkfifo(fifo)
    with pytest.raises(StoreUnreadable, match="not a regular file"):
        read_store_file(fifo)


def test_a_directory_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "auth-profiles.json").mkdir()
    with pytest.raises(StoreUnreadable, match="is a directory"):
        read_store_file(tmp_path / "auth-profiles.json")


def test_a_huge_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "auth-profiles.json"
    with big.open("wb") as fh:
        fh.truncate(50 * 1024 * 1024)
    with pytest.raises(StoreUnreadable, match="larger than"):
        read_store_file(big)


def test_unreadable_file_says_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "auth-profiles.json"
    path.write_text("{}")
    os.chmod(path, 0)
    if os.geteuid() == 0:
        # root reads anything; check as an unprivileged user when possible
        script = ("import sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path;"
                  "from qwen_refresher.fileio import read_store_file\n"
                  "try:\n read_store_file(Path(sys.argv[1]))\n"
                  "except Exception as e: print(e)")
        os.chmod(tmp_path, 0o755)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, "-c", script, str(path),
                               str(Path(__file__).resolve().parent.parent)],
                              capture_output=True, text=True)
        if proc.returncode != 0 and "setpriv" in proc.stderr:
            pytest.skip("setpriv not available")
        assert "permission denied" in proc.stdout, proc.stdout + proc.stderr
        return
    with pytest.raises(StoreUnreadable, match="permission denied"):
        read_store_file(path)


def test_every_directory_we_create_is_0700(tmp_path: Path) -> None:
    from qwen_refresher.fileio import ensure_private_dir

    (tmp_path / "exists").mkdir(mode=0o755)
    target = tmp_path / "exists" / "a" / "b" / "c"
    ensure_private_dir(target)
    assert stat.S_IMODE((tmp_path / "exists").stat().st_mode) == 0o755, "existing dirs untouched"
    for part in ("a", "a/b", "a/b/c"):
        assert stat.S_IMODE((tmp_path / "exists" / part).stat().st_mode) == 0o700


def test_stale_temp_files_of_an_interrupted_write_are_removed(tmp_path: Path) -> None:
    from qwen_refresher.fileio import remove_stale_temp_files

    old = tmp_path / ".auth-profiles.json.0123456789ab.tmp"
    fresh = tmp_path / ".auth-profiles.json.ba9876543210.tmp"
    other = tmp_path / ".notes.txt.0123456789ab.tmp"
    for path in (old, fresh, other):
        path.write_text("tokens")
    os.utime(old, (1, 1))
    os.utime(other, (1, 1))
    assert remove_stale_temp_files(tmp_path, ["auth-profiles.json"]) == [old]
    assert fresh.exists() and other.exists() and not old.exists()
