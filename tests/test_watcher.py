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
