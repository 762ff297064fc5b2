from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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


# -- the one safe reader: read_regular_file ------------------------------------------------------


def test_read_regular_file_reads_a_plain_file(tmp_path: Path) -> None:
    from qwen_refresher.fileio import read_regular_file

    target = tmp_path / "f"
    target.write_bytes(b"hello")
    got = read_regular_file(target, 100)
    assert got.data == b"hello" and got.real_path == target


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket", "device", "symlink"])
def test_read_regular_file_refuses_what_is_not_a_plain_file(tmp_path: Path, kind: str) -> None:
    import socket

    from qwen_refresher.errors import FileRefused
    from qwen_refresher.fileio import read_regular_file

    target = tmp_path / "f"
    sock = None
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
    elif kind == "device":
        target = Path("/dev/null")
    else:
        (tmp_path / "real").write_text("x")
        target.symlink_to(tmp_path / "real")
    try:
        with pytest.raises(FileRefused) as info:
            read_regular_file(target, 100)
    finally:
        if sock is not None:
            sock.close()
    expected = {"fifo": "fifo", "directory": "directory", "socket": "socket",
                "device": "character device", "symlink": "symlink"}[kind]
    assert expected in str(info.value) and str(target) in str(info.value)
    assert info.value.file_type == expected


def test_read_regular_file_caps_the_size(tmp_path: Path) -> None:
    from qwen_refresher.errors import FileRefused
    from qwen_refresher.fileio import read_regular_file

    target = tmp_path / "f"
    target.write_bytes(b"x" * 1001)
    with pytest.raises(FileRefused, match="1001 bytes"):
        read_regular_file(target, 1000)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 65535, 65536, 65537, 200_000])
def test_read_regular_file_reads_every_size_whole(tmp_path: Path, size: int) -> None:
    """The first read asks for fstat's size: around the old 64 KiB chunk and past it, the
    bytes come back whole."""
    from qwen_refresher.fileio import read_regular_file

    target = tmp_path / "f"
    data = os.urandom(size)
    target.write_bytes(data)
    assert read_regular_file(target, 1 << 20).data == data


def test_a_file_whose_size_lies_is_read_to_its_end_and_capped() -> None:
    """A regular file larger than its ``st_size`` (a /proc file says 0, as does a file that
    grows between the fstat and the read) is read to its real end, and the cap still holds
    on what is read, not on what fstat said."""
    from qwen_refresher.errors import FileRefused
    from qwen_refresher.fileio import read_regular_file

    version = Path("/proc/version")
    if not version.exists() or version.stat().st_size != 0:
        pytest.skip("needs Linux's /proc/version (a regular file whose st_size is 0)")
    expected = version.read_bytes()
    assert read_regular_file(version, 1 << 20).data == expected
    with pytest.raises(FileRefused, match="grew past the 10-byte limit while reading"):
        read_regular_file(version, 10)


def test_read_regular_file_missing_is_its_own_error(tmp_path: Path) -> None:
    from qwen_refresher.errors import FileMissing
    from qwen_refresher.fileio import read_regular_file

    with pytest.raises(FileMissing):
        read_regular_file(tmp_path / "nope", 10)


# -- directories: check_parents, check_private_dir ------------------------------------------------


def test_a_symlinked_directory_between_anchor_and_file_is_refused(tmp_path: Path) -> None:
    from qwen_refresher.errors import FileRefused
    from qwen_refresher.fileio import check_parents

    anchor = tmp_path / "state"
    (tmp_path / "elsewhere" / "agent").mkdir(parents=True)
    (anchor / "agents" / "evil").mkdir(parents=True)
    (anchor / "agents" / "evil" / "agent").symlink_to(tmp_path / "elsewhere" / "agent")
    with pytest.raises(FileRefused, match="symlink"):
        check_parents(anchor / "agents" / "evil" / "agent" / "auth-profiles.json", anchor)
    # a symlink that stays inside its own directory is followed, as for store files
    (anchor / "agents" / "ok" / "agent-v2").mkdir(parents=True)
    (anchor / "agents" / "ok" / "agent").symlink_to("agent-v2")
    check_parents(anchor / "agents" / "ok" / "agent" / "auth-profiles.json", anchor)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    from qwen_refresher.errors import FileRefused
    from qwen_refresher.fileio import check_parents

    agent = tmp_path / "agents" / "x" / "agent"
    agent.mkdir(parents=True)
    os.chown(agent.parent, 65534, 65534)
    with pytest.raises(FileRefused, match="uid 65534"):
        check_parents(agent / "auth-profiles.json", tmp_path)


def test_the_state_dir_must_be_ours_and_0700(tmp_path: Path) -> None:
    from qwen_refresher.errors import EX_CONFIG, UnsafeStateDir
    from qwen_refresher.fileio import check_private_dir

    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    check_private_dir(d)
    os.chmod(d, 0o750)  # ours, writable by nobody else: tightened, not refused
    check_private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    os.chmod(d, 0o770)  # others could have planted symlinks: refused, naming the fix
    with pytest.raises(UnsafeStateDir, match=r"0770.*`chmod 700 ") as info:
        check_private_dir(d)
    assert info.value.exit_code == EX_CONFIG
    os.chmod(d, 0o700)
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(UnsafeStateDir, match="symlink"):
        check_private_dir(tmp_path / "link")


def test_atomic_write_refuses_to_change_an_owner_it_cannot_keep(tmp_path: Path) -> None:
    target = tmp_path / "s.json"
    target.write_bytes(b"old")
    if os.geteuid() == 0:
        pytest.skip("root can keep any owner")
    with pytest.raises(StoreWriteError):
        atomic_write(target, b"new", owner=(0, 0))
    assert target.read_bytes() == b"old"


def test_the_anchor_itself_may_be_a_symlink_to_anywhere(tmp_path: Path) -> None:
    """Users move ~/.openclaw elsewhere and link it back: the tree is where they put it."""
    from qwen_refresher.fileio import check_parents

    (tmp_path / "data" / "agents" / "main" / "agent").mkdir(parents=True)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".openclaw").symlink_to(tmp_path / "data")
    anchor = tmp_path / "home" / ".openclaw"
    check_parents(anchor / "agents" / "main" / "agent" / "auth-profiles.json", anchor)


def _hostile_tree(root: Path) -> tuple[Path, list[Path]]:
    """An OpenClaw tree whose stores share their upper directories, hostile ones among them."""
    (root / "data" / "agents").mkdir(parents=True)
    (root / "home").mkdir()
    anchor = root / "home" / ".openclaw"
    anchor.symlink_to(root / "data")  # a moved state dir, linked back: trusted
    agents = anchor / "agents"
    outside = root / "outside"
    outside.mkdir()
    (outside / "auth-profiles.json").write_text('{"stolen": 1}')
    for name in ("a", "b", "ok-v2", "lnk", "fifo", "dirfile"):
        (agents / name / "agent").mkdir(parents=True)
        (agents / name / "agent" / "auth-profiles.json").write_text(f'{{"{name}": 1}}')
    (agents / "evil").mkdir()
    (agents / "evil" / "agent").symlink_to(outside)  # an agent dir leading out of the tree
    (agents / "ok").symlink_to("ok-v2")  # a symlink that stays in its own directory
    (agents / "loop").mkdir()
    (agents / "loop" / "agent").symlink_to("agent")  # a symlink loop
    store = agents / "lnk" / "agent" / "auth-profiles.json"
    store.unlink()
    store.symlink_to(outside / "auth-profiles.json")  # a store file leading out
    fifo = agents / "fifo" / "agent" / "auth-profiles.json"
    fifo.unlink()
    os.mkfifo(fifo)
    (agents / "dirfile" / "agent" / "auth-profiles.json").unlink()
    (agents / "dirfile" / "agent" / "auth-profiles.json").mkdir()
    names = ["a", "evil", "b", "ok", "loop", "lnk", "fifo", "dirfile", "gone", "a"]
    return anchor, [agents / n / "agent" / "auth-profiles.json" for n in names]


def _verdict(path: Path, anchor: Path) -> str:
    from qwen_refresher.fileio import check_parents

    try:
        check_parents(path, anchor)
        real = resolve_confined(path)
        data = read_store_file(path).data
    except StoreUnreadable as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"{real} {data!r}"


def test_a_shared_scope_judges_every_store_as_alone(tmp_path: Path) -> None:
    """``shared_checks`` (one scan's directory lookups shared) changes no verdict: each store
    of a hostile tree is refused or read exactly as without it, in any order."""
    from qwen_refresher.fileio import shared_checks

    anchor, stores = _hostile_tree(tmp_path)
    alone = [_verdict(p, anchor) for p in stores]
    assert "stolen" not in " ".join(alone)
    assert sum("FileRefused" in v or "outside" in v for v in alone) >= 3, alone
    for order in (stores, stores[::-1]):
        with shared_checks():
            shared = [_verdict(p, anchor) for p in order]
        assert shared == [_verdict(p, anchor) for p in order] == \
            [alone[stores.index(p)] for p in order]


def test_a_directory_swapped_during_a_scope_is_seen_after_its_max_age(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan may take its directories as it found them only briefly: an agent dir swapped
    for a symlink leading out is refused once ``SHARED_CHECKS_MAX_AGE`` has passed, and at
    once by any other thread (an event's read)."""
    from qwen_refresher import fileio
    from qwen_refresher.errors import FileRefused

    anchor, stores = _hostile_tree(tmp_path)
    store = stores[0]  # agents/a/agent/auth-profiles.json
    monkeypatch.setattr(fileio, "SHARED_CHECKS_MAX_AGE", 0.2)
    with fileio.shared_checks():
        fileio.check_parents(store, anchor)
        assert read_store_file(store).data == b'{"a": 1}'
        agent = store.parent
        agent.rename(agent.with_name("agent-old"))
        agent.symlink_to(tmp_path / "outside")
        seen: list[BaseException] = []
        thread = threading.Thread(target=lambda: seen.extend(
            _raised(lambda: fileio.check_parents(store, anchor))))
        thread.start()
        thread.join()
        assert seen and isinstance(seen[0], FileRefused), seen
        time.sleep(0.25)
        with pytest.raises(FileRefused, match="outside"):
            fileio.check_parents(store, anchor)
        # and the real path is looked up afresh: what it is without a scope
        assert resolve_confined(store) == (tmp_path / "outside" / "auth-profiles.json")


def _raised(call: Callable[[], object]) -> list[BaseException]:
    try:
        call()
    except Exception as exc:  # the test inspects it
        return [exc]
    return []
