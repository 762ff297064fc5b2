"""The directory watcher, in-process, on real directories with real inotify.

Reads must not wake the daemon at all (issue 16): the watch asks the kernel only for writes,
renames, creations and deletions, so a reader costs the watcher threads no context switch.
Every kind of change that can alter a store must still be heard.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qwen_refresher.watcher import DirectoryWatcher

NAME = "auth-profiles.json"


class Heard:
    def __init__(self) -> None:
        self.paths: list[Path] = []
        self._cv = threading.Condition()

    def __call__(self, path: Path) -> None:
        with self._cv:
            self.paths.append(path)
            self._cv.notify_all()

    def wait_for(self, pred: Callable[[list[Path]], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not pred(self.paths):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def clear(self) -> None:
        with self._cv:
            self.paths.clear()


def _switches(tids: list[int]) -> int:
    total = 0
    for tid in tids:
        try:
            status = Path(f"/proc/self/task/{tid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Heard, list[int]]]:
    agents = tmp_path / "agents"
    (agents / "main" / "agent").mkdir(parents=True)
    store = agents / "main" / "agent" / NAME
    store.write_text('{"version": 1, "profiles": {}}\n')
    heard = Heard()
    before = {t.native_id for t in threading.enumerate()}
    watcher = DirectoryWatcher(heard, [NAME])
    watcher.watch({agents: True})
    tids = [t.native_id for t in threading.enumerate()
            if t.native_id not in before and t.native_id is not None]
    try:
        assert watcher.mode == {agents: "inotify"}, "this test needs inotify"
        time.sleep(0.2)  # let the watch settle before anything is measured
        yield store, heard, tids
    finally:
        watcher.stop()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux /proc only")
def test_reading_a_store_wakes_no_watcher_thread(
        watched: tuple[Path, Heard, list[int]]) -> None:
    store, heard, tids = watched
    assert tids, "the watcher started no thread of its own"
    # A baseline for the same threads over a comparable idle span, measured in this run.
    idle0 = _switches(tids)
    time.sleep(0.3)
    idle = _switches(tids) - idle0
    before = _switches(tids)
    for _ in range(300):
        with open(store, "rb") as fh:
            fh.read()
    time.sleep(0.3)  # anything the reads queued has been delivered by now
    woken = _switches(tids) - before
    assert heard.paths == [], f"a read was reported as a change: {heard.paths}"
    # Before the event filter: >= 2 switches per read (IN_OPEN, IN_CLOSE_NOWRITE) -> ~600+.
    assert woken <= idle + 10, f"300 reads woke the watcher threads {woken} times (idle {idle})"


def test_every_kind_of_change_is_heard(watched: tuple[Path, Heard, list[int]]) -> None:
    store, heard, _ = watched

    def changes(action: Callable[[], object], what: str) -> None:
        heard.clear()
        action()
        assert heard.wait_for(lambda ps: store in ps), f"{what}: not heard"

    changes(lambda: store.write_text('{"version": 1, "profiles": {"a": {}}}\n'),
            "in-place write")
    tmp = store.with_name(NAME + ".tmp")

    def replace() -> None:
        tmp.write_text('{"version": 1, "profiles": {"b": {}}}\n')
        os.replace(tmp, store)
    changes(replace, "atomic rename into place")
    changes(lambda: os.chmod(store, 0o600), "chmod")
    changes(store.unlink, "delete")
    changes(lambda: store.write_text("{}\n"), "create")


def test_new_agent_directory_is_heard(watched: tuple[Path, Heard, list[int]]) -> None:
    store, heard, _ = watched
    agents = store.parent.parent.parent
    heard.clear()
    (agents / "second").mkdir()
    assert heard.wait_for(lambda ps: agents / "second" in ps), "mkdir under agents/ not heard"


def test_other_files_are_dropped(watched: tuple[Path, Heard, list[int]]) -> None:
    store, heard, _ = watched
    transcript = store.parent / "session.jsonl"
    for i in range(20):
        with open(transcript, "a") as fh:
            fh.write(f"line {i}\n")
    store.write_text('{"version": 1}\n')  # a marker: once it is heard, the rest was too
    assert heard.wait_for(lambda ps: store in ps)
    assert transcript not in heard.paths


# -- re-arming, our own files, polling, stop (helper T) ----------------------------------------


def _store_in(root: Path, agent: str = "main") -> Path:
    (root / agent / "agent").mkdir(parents=True, exist_ok=True)
    store = root / agent / "agent" / NAME
    store.write_text('{"version": 1, "profiles": {}}\n')
    return store


def test_lock_files_are_dropped_and_our_temp_rename_is_heard_as_the_store(
        watched: tuple[Path, Heard, list[int]]) -> None:
    """The engine writes ``.auth-profiles.json.<hex>.tmp`` and renames it into place, taking
    ``auth-profiles.json.lock`` around it: only the store itself may reach the daemon."""
    store, heard, _ = watched
    heard.clear()
    lock = store.with_name(NAME + ".lock")
    lock.write_text('{"pid": 1}')
    lock.unlink()
    tmp = store.with_name(f".{NAME}.0123456789ab.tmp")
    tmp.write_text('{"version": 1, "profiles": {"c": {}}}\n')
    os.replace(tmp, store)
    assert heard.wait_for(lambda ps: store in ps)
    time.sleep(0.2)  # anything else queued has arrived by now
    assert set(heard.paths) == {store}, heard.paths


def test_watch_rearms_to_exactly_the_set_given(tmp_path: Path) -> None:
    first, second = _store_in(tmp_path / "one"), _store_in(tmp_path / "two")
    heard = Heard()
    watcher = DirectoryWatcher(heard, [NAME])
    try:
        watcher.watch({first.parent: False})
        assert watcher.mode == {first.parent: "inotify"}
        watcher.watch({second.parent: False})  # the first is dropped, the second armed
        assert watcher.mode == {second.parent: "inotify"}
        time.sleep(0.1)
        first.write_text("{}\n")
        second.write_text("{}\n")
        assert heard.wait_for(lambda ps: second in ps)
        time.sleep(0.2)
        assert first not in heard.paths
    finally:
        watcher.stop()


def test_a_missing_directory_is_skipped_until_it_exists(tmp_path: Path) -> None:
    later = tmp_path / "later" / "agent"
    heard = Heard()
    watcher = DirectoryWatcher(heard, [NAME])
    try:
        watcher.watch({later: False})
        assert watcher.mode == {}
        later.mkdir(parents=True)
        watcher.watch({later: False})
        assert watcher.mode == {later: "inotify"}
        (later / NAME).write_text("{}\n")
        assert heard.wait_for(lambda ps: later / NAME in ps)
    finally:
        watcher.stop()


def test_a_non_recursive_watch_does_not_hear_subdirectories(tmp_path: Path) -> None:
    agents = tmp_path / "agents"
    deep = _store_in(agents)
    top = agents / NAME  # a store-named file directly in the watched directory
    heard = Heard()
    watcher = DirectoryWatcher(heard, [NAME])
    try:
        watcher.watch({agents: False})
        time.sleep(0.1)
        deep.write_text("{}\n")
        top.write_text("{}\n")
        assert heard.wait_for(lambda ps: top in ps)
        time.sleep(0.2)
        assert deep not in heard.paths
        watcher.watch({agents: True})  # recursive now: re-armed, the deep store is heard
        time.sleep(0.1)
        heard.clear()
        deep.write_text('{"version": 1}\n')
        assert heard.wait_for(lambda ps: deep in ps)
    finally:
        watcher.stop()


def test_polling_hears_writes_but_never_reads(tmp_path: Path) -> None:
    """The fallback for network file systems compares stat snapshots: a write (new mtime or
    size) is a change, a read is not; open/close events never exist there."""
    store = _store_in(tmp_path / "agents")
    heard = Heard()
    watcher = DirectoryWatcher(heard, [NAME], force_polling=True, poll_interval=0.1)
    try:
        watcher.watch({store.parent: False})
        assert watcher.mode == {store.parent: "polling"}
        time.sleep(0.3)  # the first snapshot is taken
        for _ in range(20):
            store.read_bytes()
        time.sleep(0.4)  # several polls
        assert heard.paths == [], f"a read was reported as a change: {heard.paths}"
        store.write_text('{"version": 1, "profiles": {"a": {}}}\n')
        assert heard.wait_for(lambda ps: store in ps, timeout=3)
    finally:
        watcher.stop()


def test_after_stop_nothing_is_heard_and_the_threads_are_gone(tmp_path: Path) -> None:
    store = _store_in(tmp_path / "agents")
    heard = Heard()
    before = set(threading.enumerate())
    watcher = DirectoryWatcher(heard, [NAME])
    watcher.watch({store.parent: False})
    started = set(threading.enumerate()) - before
    assert started, "the watcher started no thread"
    watcher.stop()
    store.write_text("{}\n")
    time.sleep(0.3)
    assert heard.paths == []
    assert not any(t.is_alive() for t in started)
