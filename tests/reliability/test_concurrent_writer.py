"""A concurrent OpenClaw-like writer while the daemon rotates every second.

Three processes share one ``auth-profiles.json``: the daemon (rotating every second), a writer
that behaves like an OpenClaw gateway <= 2026.3.22 (``openclaw_mimic writer``: OpenClaw's lock,
in-place non-atomic rewrites, a stale snapshot written back now and then), and a reader that
takes no lock at all (``openclaw_mimic reader``).

What "no torn read" can mean here: OpenClaw's own writes are truncate-and-write, so a reader
without the lock *will* see half files while the writer is mid-write (the reader catching some
proves it is fast enough to catch a torn daemon write too). The daemon's writes are the ones
under test: every read that fails to parse must overlap one of the writer's own write windows
(its start and end times, same clock); a torn read at any other moment can only come from the
daemon. Beyond that:

- the writer never finds the file changed while it holds OpenClaw's lock (the daemon respects
  the lock), and its bookkeeping counter never goes backwards in any clean read (the daemon
  never writes from a stale read, so it never loses the writer's update);
- every revert (a consumed refresh token written back) is undone: ``revert_undone`` events, and
  per revert the time until the reader saw the newest token again;
- nothing is lost: at the end the store holds the newest token of the lineage, live at the
  server, every other issued token was traded in by a later refresh, and no refresh token was
  ever sent twice (``reuse_count == 0``).
"""

from __future__ import annotations

import bisect
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher.lockfile import OPENCLAW, FileLock
from qwen_refresher.testing.fake_qwen import FakeQwen, FakeQwenConfig
from tests.harness import ROOT, OpenClawHome, qwen_profile
from tests.reliability.conftest import Figures
from tests.reliability.support import (
    Daemon,
    assert_no_leaks,
    chain_from,
    fake_secrets,
    live_at_fake,
    percentile,
    status_outputs,
    successor_map,
    wait_for,
)

LIFETIME = 2.0  # refreshed at half its life: one rotation a second
CI_SECONDS, LONG_SECONDS = 60.0, 600.0
#: Slack around the writer's own write windows when attributing a torn read (clock reads
#: happen just outside the write calls).
SLACK = 0.002


def _spawn(role: str, store: Path, duration: float, out: Path, *extra: str
           ) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.reliability.openclaw_mimic", role,
                             "--store", str(store), "--duration", str(duration),
                             "--out", str(out), *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _overlaps(windows: list[tuple[float, float]], starts: list[float], start: float,
              end: float) -> bool:
    """Whether [start, end] meets any window (``windows`` sorted, ``starts`` their starts);
    the writer's windows never overlap one another, so the last one starting before ``end``
    decides."""
    i = bisect.bisect_right(starts, end)
    return i > 0 and windows[i - 1][1] >= start


@pytest.mark.timeout(240)
def test_openclaw_writer_and_daemon_share_the_file(oc: OpenClawHome, tmp_path: Path,
                                                   long_run: bool, figures: Figures) -> None:
    duration = LONG_SECONDS if long_run else CI_SECONDS
    fake = FakeQwen(FakeQwenConfig(lifetime=LIFETIME)).start()
    try:
        access, refresh, expires = fake.issue_tokens(lifetime=LIFETIME)
        path = oc.write_store({
            "version": 1,
            "profiles": {
                "anthropic:default": {"type": "api_key", "provider": "anthropic", "key": "k"},
                "qwen-portal:default": qwen_profile(access, refresh, expires)},
            "order": {"qwen-portal": ["qwen-portal:default"]},
            "lastGood": {"qwen-portal": "qwen-portal:default"},
            "usageStats": {"qwen-portal:default": {"errorCount": 0, "mimicCount": 0}},
        })
        with Daemon(oc, fake, "--margin", "3", "--jitter", "0", "--no-qwen-code") as daemon:
            wait_for(lambda: refresh not in path.read_text(), 15, "the first rotation", daemon)
            writer_out, reader_out = tmp_path / "writer.json", tmp_path / "reader.json"
            reader = _spawn("reader", path, duration + 5, reader_out)
            writer = _spawn("writer", path, duration, writer_out, "--seed", "7")
            for proc in (writer, reader):
                _, err = proc.communicate(timeout=duration + 60)
                assert proc.returncode == 0, err.decode()[-2000:]
            w: dict[str, Any] = json.loads(writer_out.read_text())
            r: dict[str, Any] = json.loads(reader_out.read_text())
            rotations_at_end = len(fake.issued)

            def settled() -> bool:
                token = json.loads(path.read_bytes())["profiles"]["qwen-portal:default"][
                    "refresh"]
                return len(fake.issued) >= rotations_at_end + 2 and live_at_fake(fake, token)

            wait_for(settled, 20, "two more rotations and a live token", daemon)
            metrics = daemon.http_get("/metrics")[1]
            texts = status_outputs(oc)
        final_doc = json.loads(path.read_bytes())
    finally:
        fake.stop()

    # -- torn reads: whose write was the reader looking at?
    windows = sorted((x["start"] - SLACK, x["end"] + SLACK) for x in w["writes"])
    starts = [start for start, _ in windows]
    torn_by_writer = [t for t in r["torn"] if _overlaps(windows, starts, t["start"], t["end"])]
    torn_by_daemon = [t for t in r["torn"]
                      if not _overlaps(windows, starts, t["start"], t["end"])]
    # -- the writer's bookkeeping never went backwards
    counters = [c["counter"] for c in r["changes"]]
    backwards = sum(1 for a, b in itertools.pairwise(counters) if b < a)
    # -- reverts: from the writer's stale write to the reader seeing another token
    changes = r["changes"]
    change_times = [c["at"] for c in changes]
    reverts = [x for x in w["writes"] if x["reverted"]]
    heal_times: list[float] = []
    unhealed = 0
    for x in reverts:
        i = bisect.bisect_right(change_times, x["end"])
        healed = next((c["at"] for c in changes[i:] if c["token"] != x["wrote_token"]), None)
        if healed is None:
            unhealed += 1
        else:
            heal_times.append(healed - x["end"])
    # -- nothing lost
    final_token = final_doc["profiles"]["qwen-portal:default"]["refresh"]
    successors = successor_map(fake.issued)
    consumed = {i.replaced for i in fake.issued if i.replaced is not None}
    orphans = sum(1 for i in fake.issued
                  if i.refresh_token not in consumed and i.refresh_token != final_token)
    newest = chain_from(refresh, successors)[-1]
    results = {
        "seconds": duration,
        "rotations": sum(1 for i in fake.issued if i.via == "refresh"),
        "writer_writes": len(w["writes"]),
        "writer_stale_writes": sum(1 for x in w["writes"] if x["stale"]),
        "writer_reverts": len(reverts),
        "writer_lock_wait_max_s": round(w["lock_wait_max_s"], 3),
        "lock_violations": w["lock_violations"],
        "reader_reads": r["reads"],
        "torn_reads_during_openclaw_writes": len(torn_by_writer),
        "torn_reads_otherwise": len(torn_by_daemon),
        "counter_went_backwards": backwards,
        "revert_undone_events": daemon.count("revert_undone"),
        "revert_heal_s": {"median": percentile(heal_times, 0.5),
                          "p95": percentile(heal_times, 0.95),
                          "max": max(heal_times, default=None)},
        "reverts_not_seen_healed": unhealed,
        "daemon_store_invalid_events": daemon.count("store_invalid"),
        "daemon_store_recovered_events": daemon.count("store_recovered"),
        "orphaned_tokens": orphans,
        "reuse_count": fake.reuse_count,
    }
    figures("concurrent_writer", results)

    assert r["reads"] > 1000 and len(w["writes"]) > 20, "the run was too thin to mean anything"
    assert torn_by_writer, "the reader never caught OpenClaw mid-write: it is too slow to judge"
    assert torn_by_daemon == [], torn_by_daemon[:5]
    assert w["lock_violations"] == 0, "the file changed while OpenClaw held its lock"
    assert backwards == 0, "a write lost the other writer's bookkeeping update"
    assert final_doc["usageStats"]["qwen-portal:default"]["mimicCount"] == w["last_counter"]
    assert reverts, "the writer never reverted a token: the test did not test reverts"
    assert daemon.count("revert_undone") > 0
    assert unhealed == 0, f"{unhealed} reverts were never undone while the reader watched"
    assert daemon.count("store_invalid") == 0, "OpenClaw mid-write was reported as a bad store"
    assert final_token == newest and live_at_fake(fake, final_token), "the newest token is lost"
    assert orphans == 0, f"{orphans} issued tokens neither in the store nor traded in"
    assert fake.reuse_count == 0, "a consumed refresh token was sent again"
    assert daemon.tracebacks()[0] == 0, "an unexpected exception was logged"
    assert_no_leaks([daemon.output, *texts, metrics], fake_secrets(fake))


@pytest.mark.timeout(60)
def test_a_slow_openclaw_write_is_not_reported_as_a_broken_store(oc: OpenClawHome) -> None:
    """Found by the concurrent-writer suite under CI load (the writer's pause between its two
    chunks stretched past 50 ms): Store.read_settled gave up after two identical torn reads
    50 ms apart and the daemon logged store_invalid. The writer holds OpenClaw's lock the whole
    time; since f406008 a malformed read is re-checked under that lock."""
    with FakeQwen(FakeQwenConfig(lifetime=3600)) as fake:
        access, refresh, expires = fake.issue_tokens(lifetime=3600)
        doc = {"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(access, refresh, expires)}}
        path = oc.write_store(doc)
        with Daemon(oc, fake, "--margin", "60", "--jitter", "0", "--no-qwen-code") as daemon:
            daemon.wait_event("started")
            body = (json.dumps({**doc, "lastGood": {"qwen-portal": "qwen-portal:default"}},
                               indent=2) + "\n").encode()
            with FileLock(Path(str(path.resolve()) + ".lock"), OPENCLAW).held():
                with open(path, "r+b") as fh:
                    fh.truncate(0)
                    fh.write(body[: len(body) // 2])
                    fh.flush()
                    time.sleep(0.5)  # preempted mid-write, as a loaded machine does
                    fh.write(body[len(body) // 2:])
            # The daemon's verdict comes within its debounce (0.1 s) and read_settled's retries
            # (4 x 50 ms); the absence of an error cannot be awaited, so give it that long.
            time.sleep(0.6)
        assert daemon.count("store_invalid") == 0, "a write in progress was called a bad store"
