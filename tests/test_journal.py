"""In-process tests of ``Journal``: a rotation is on disk (0600) before any store is written,
survives a restart, is replayable, and is gone once every member holds it."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher.errors import UnsafeStateDir
from qwen_refresher.journal import Journal
from qwen_refresher.models import Credentials, ProfileKey

JOURNAL = "journal.json"


def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d


def creds(n: int) -> Credentials:
    return Credentials(access=f"acc-{n}", refresh=f"ref-{n}", expires_ms=1_000 * n,
                       resource_url="portal.qwen.ai")


def members(tmp_path: Path) -> list[ProfileKey]:
    return [ProfileKey(tmp_path / "a.json", "qwen-portal:default"),
            ProfileKey(tmp_path / "b.json", "qwen-portal:work")]


def test_record_writes_a_private_file_replayed_after_a_restart(tmp_path: Path) -> None:
    d = state_dir(tmp_path)
    j = Journal(d)
    assert not j.holds("new1")
    j.record("old1", "new1", creds(1), members(tmp_path))
    path = d / JOURNAL
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_bytes())
    assert [e["family"] for e in doc["entries"]] == ["new1"]
    assert j.holds("new1")

    again = Journal(d)  # a restarted daemon
    assert again.holds("new1")
    assert again.pending() == [("old1", "new1", creds(1), members(tmp_path))]


def test_settle_forgets_one_family_and_the_last_settle_removes_the_file(tmp_path: Path) -> None:
    d = state_dir(tmp_path)
    j = Journal(d)
    j.record("old1", "new1", creds(1), members(tmp_path))
    j.record("old2", "new2", creds(2), members(tmp_path)[:1])
    j.settle("new1")
    assert not j.holds("new1") and j.holds("new2")
    assert [fp for _, fp, _, _ in j.pending()] == ["new2"]
    j.settle("new2")
    assert j.pending() == []
    assert not (d / JOURNAL).exists()  # no token lingers on disk


def test_a_second_record_for_one_family_replaces_the_first(tmp_path: Path) -> None:
    d = state_dir(tmp_path)
    j = Journal(d)
    j.record("old", "fam", creds(1), members(tmp_path))
    j.record("old", "fam", creds(2), members(tmp_path))
    assert [(fp, c) for _, fp, c, _ in j.pending()] == [("fam", creds(2))]


def test_settle_of_an_unknown_family_does_not_touch_the_disk(tmp_path: Path) -> None:
    d = state_dir(tmp_path)
    j = Journal(d)
    j.record("old", "fam", creds(1), members(tmp_path))
    before = (d / JOURNAL).stat().st_mtime_ns, (d / JOURNAL).stat().st_ino
    j.settle("unknown")
    after = (d / JOURNAL).stat().st_mtime_ns, (d / JOURNAL).stat().st_ino
    assert before == after


def test_malformed_entries_are_skipped_on_replay(tmp_path: Path) -> None:
    d = state_dir(tmp_path)
    good = {"family": "f", "replaces": "o", "received_at": 1.0, "access": "a", "refresh": "r",
            "expires_ms": 5, "resource_url": None, "members": [["/x/a.json", "p"]]}
    broken = {"family": "g", "replaces": "o"}  # no tokens
    wrong = {**good, "family": "h", "expires_ms": "soon"}
    path = d / JOURNAL
    path.write_text(json.dumps({"entries": [good, broken, wrong, "not a dict"]}))
    os.chmod(path, 0o600)
    j = Journal(d)
    assert j.pending() == [("o", "f", Credentials("a", "r", 5),
                            [ProfileKey(Path("/x/a.json"), "p")])]


def test_a_corrupt_journal_file_reads_as_empty(tmp_path: Path) -> None:
    d = state_dir(tmp_path)
    (d / JOURNAL).write_text("{not json")
    os.chmod(d / JOURNAL, 0o600)
    assert Journal(d).pending() == []


def test_a_state_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    d = state_dir(tmp_path)
    os.chmod(d, 0o777)
    with pytest.raises(UnsafeStateDir):
        Journal(d)


def test_a_state_dir_others_can_only_read_is_tightened(tmp_path: Path) -> None:
    d = state_dir(tmp_path)
    os.chmod(d, 0o755)
    Journal(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_a_symlink_planted_at_the_journal_is_refused(tmp_path: Path) -> None:
    d = state_dir(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (d / JOURNAL).symlink_to(victim)
    with pytest.raises(UnsafeStateDir, match="symlink"):
        Journal(d)
    assert victim.read_text() == "precious"


def test_the_journal_never_shows_tokens_in_its_repr(tmp_path: Path) -> None:
    d = state_dir(tmp_path)
    j = Journal(d)
    j.record("old", "fam", creds(7), members(tmp_path))
    shown = repr(j.pending())
    assert "ref-7" not in shown and "acc-7" not in shown


def test_concurrent_rotations_share_journal_writes_and_each_is_on_disk_when_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: rotations recorded while a journal write is under way go to disk
    together in the next write (one fsync for many), yet ``record`` still returns only once
    its own entry is on disk, and settles that come meanwhile ride along. The writes are the
    real ones, slowed a little (a disk whose fsync takes 20 ms) and counted."""
    import threading

    import qwen_refresher.journal as journal_module

    real = journal_module.write_journal
    writes: list[int] = []

    def slow_write(directory: Path, entries: list[Any]) -> None:
        time.sleep(0.02)
        real(directory, entries)
        writes.append(len(entries))

    monkeypatch.setattr(journal_module, "write_journal", slow_write)
    d = state_dir(tmp_path)
    j = Journal(d)
    threads_n = 12
    start = threading.Barrier(threads_n, timeout=10)
    problems: list[str] = []

    def rotate(n: int) -> None:
        start.wait()
        j.record(f"old{n}", f"new{n}", creds(n), members(tmp_path))
        on_disk = (d / JOURNAL).read_text() if (d / JOURNAL).exists() else ""
        if f"ref-{n}\"" not in on_disk:
            problems.append(f"new{n} was not on disk when record returned")
        j.settle(f"new{n}")

    threads = [threading.Thread(target=rotate, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert problems == []
    assert not (d / JOURNAL).exists(), "every rotation was settled: no token left on disk"
    assert j.pending() == [] and not any(j.holds(f"new{n}") for n in range(threads_n))
    assert len(writes) < 2 * threads_n * 0.75, f"{len(writes)} writes for {threads_n} rotations"


def test_a_record_whose_write_failed_is_not_carried_to_disk_by_a_later_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at ``record``: the caller is told (the engine then says
    journal_write_failed and writes the stores), and the entry is dropped, not left in
    memory for the next rotation's write to put on disk with nobody to settle it."""
    import errno

    import qwen_refresher.journal as journal_module

    real = journal_module.write_journal
    fail = [True]

    def full_once(directory: Path, entries: list[Any]) -> None:
        if fail and fail.pop():
            raise OSError(errno.ENOSPC, "No space left on device")
        real(directory, entries)

    monkeypatch.setattr(journal_module, "write_journal", full_once)
    d = state_dir(tmp_path)
    j = Journal(d)
    with pytest.raises(OSError):
        j.record("old1", "new1", creds(1), members(tmp_path))
    assert not j.holds("new1")
    j.record("old2", "new2", creds(2), members(tmp_path))
    on_disk = (d / JOURNAL).read_text()
    assert "ref-2" in on_disk and "ref-1" not in on_disk
    assert [p[1] for p in j.pending()] == ["new2"]
