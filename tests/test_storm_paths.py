"""What issue 16 changed on the refresh path keeps its meaning (real threads, real objects).

* ``engine.WriteGate`` (was one ``threading.Lock`` every refresh queued on for the others'
  fsyncs): writers no longer exclude each other, and shutdown's ``acquire(timeout=)`` still
  waits for the writers inside and keeps new ones out until ``release()``;
* ``runtime.families.affected`` (was a scan of every family per refresh): the head index gives
  exactly the families the scan gave, through rotations, splits and re-plans.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from qwen_refresher.engine import WriteGate
from qwen_refresher.history import TokenHistory
from qwen_refresher.models import Credentials, ProfileKey
from qwen_refresher.planner import Timing
from qwen_refresher.runtime import families as fam
from qwen_refresher.runtime.memory import Memory, View
from qwen_refresher.stores.openclaw import OpenClawStore

DEADLINE = 5.0


def test_writers_overlap_and_shutdown_waits_for_them() -> None:
    gate = WriteGate()
    inside = threading.Barrier(3, timeout=DEADLINE)  # two writers + this test
    leave = threading.Event()

    def writer() -> None:
        with gate:
            inside.wait()  # both writers inside at once: they do not exclude each other
            leave.wait(DEADLINE)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert gate.writers == 2
    # Shutdown cannot close the gate while writers are inside: it times out and reopens it.
    started = time.monotonic()
    assert gate.acquire(timeout=0.2) is False
    assert time.monotonic() - started >= 0.19
    leave.set()
    for t in threads:
        t.join(DEADLINE)
    assert gate.acquire(timeout=DEADLINE) is True  # nobody inside: closed at once


def test_a_closed_gate_keeps_new_writers_out_until_released() -> None:
    gate = WriteGate()
    assert gate.acquire(timeout=DEADLINE)
    entered = threading.Event()

    def writer() -> None:
        with gate:
            entered.set()

    t = threading.Thread(target=writer)
    t.start()
    assert not entered.wait(0.3), "a writer got in while shutdown held the gate"
    gate.release()
    assert entered.wait(DEADLINE)
    t.join(DEADLINE)
    assert gate.writers == 0


def test_acquire_without_blocking_fails_at_once_when_a_writer_is_inside() -> None:
    gate = WriteGate()
    with gate:
        assert gate.acquire(blocking=False) is False
    assert gate.acquire(blocking=False) is True
    gate.release()


def _brute_force(memory: Memory, history: TokenHistory,
                 touched: set[ProfileKey]) -> tuple[set[ProfileKey], set[str]]:
    """``affected`` as it was: a scan of every family."""
    views, family_of = memory.views, memory.family_of
    touched = {k for k in touched if k in views} | {k for k in touched if k in family_of}
    old_ids = {family_of[k] for k in touched if k in family_of}
    heads = {history.newest(v.fp) for k in touched
             if (v := views.get(k)) is not None and v.fp is not None}
    old_ids |= {f.id for f in memory.families.values() if history.newest(f.head) in heads}
    keys = {k for k in touched if k in views}
    for job_id in old_ids:
        family = memory.families.get(job_id)
        if family is not None:
            keys |= {k for k in family.keys if k in views}
    return keys, old_ids


def test_the_head_index_finds_exactly_what_the_scan_found(tmp_path: Path) -> None:
    rng = random.Random(16)
    now = 1_800_000_000.0
    timing = Timing(margin=900.0, jitter=0.0, retry_max=300.0)
    memory, history = Memory(), TokenHistory()
    keys = [ProfileKey(tmp_path / f"a{i}" / "auth-profiles.json", "qwen-portal:p")
            for i in range(24)]
    tokens = [f"T{i}" for i in range(8)]
    serial = 0

    def hold(key: ProfileKey, fp: str) -> None:
        creds = Credentials(f"acc-{fp}", f"ref-{fp}", int((now + 6 * 3600) * 1000))
        memory.views[key] = View(OpenClawStore(key.store), creds, None, fp, None)
        memory.keys_by_store[key.store].add(key)

    for key in keys:
        hold(key, rng.choice(tokens))
    fam.reconcile(memory, history, timing, now)
    for _ in range(400):
        touched = set(rng.sample(keys, rng.randint(1, 3)))
        move = rng.random()
        for key in touched:
            if move < 0.4:  # a rotation: the lineage moves on, the store follows
                old = memory.views[key].fp
                assert old is not None
                serial += 1
                new = f"R{serial}"
                history.link(history.newest(old), new)
                hold(key, new)
            elif move < 0.7:  # a login or a split: a token of its own
                serial += 1
                hold(key, f"L{serial}")
            else:  # a revert or a copy of another profile's token
                hold(key, rng.choice([v.fp for v in memory.views.values() if v.fp]))
        assert fam.affected(memory, history, touched) == _brute_force(memory, history, touched)
        fam.reconcile(memory, history, timing, now, touched)
        # the index is what reconcile left behind, never rebuilt behind its back
        assert memory.indexed_head == {f.id: f.head for f in memory.families.values()}


def test_a_family_whose_head_a_later_link_supersedes_is_found(tmp_path: Path) -> None:
    """The superseded heads are kept per link (``families._superseded_heads``), not
    intersected in full per refresh: a family left planned on a token that a link made
    *after* its planning supersedes must still be found from the lineage's new head."""
    now = 1_800_000_000.0
    timing = Timing(margin=900.0, jitter=0.0, retry_max=300.0)
    memory, history = Memory(), TokenHistory()
    a = ProfileKey(tmp_path / "a" / "auth-profiles.json", "qwen-portal:p")
    c = ProfileKey(tmp_path / "c" / "auth-profiles.json", "qwen-portal:p")
    for key, fp in ((a, "T1"), (c, "L1")):
        creds = Credentials(f"acc-{fp}", f"ref-{fp}", int((now + 6 * 3600) * 1000))
        memory.views[key] = View(OpenClawStore(key.store), creds, None, fp, None)
        memory.keys_by_store[key.store].add(key)
    fam.reconcile(memory, history, timing, now)
    assert fam.affected(memory, history, {c}) == _brute_force(memory, history, {c})
    history.link("T1", "L1")  # a's token seen replaced by the one c holds
    assert memory.family_of[a] in fam.affected(memory, history, {c})[1]
    assert fam.affected(memory, history, {c}) == _brute_force(memory, history, {c})
    fam.reconcile(memory, history, timing, now, {c})
    assert memory.family_of[a] == memory.family_of[c]  # one family now, on L1


def test_a_waiting_job_is_moved_in_place_and_fires_once_at_its_new_time() -> None:
    """``Jobs.scan_at`` on a job still waiting moves it (no new ``Job``, no signature check
    per re-plan: ~5 % of a storm's CPU) and it then runs once, at the new time."""
    from apscheduler.events import EVENT_JOB_ADDED, EVENT_JOB_MODIFIED

    from qwen_refresher.runtime.jobs import Jobs

    jobs = Jobs(2)
    seen: list[tuple[int, str]] = []
    jobs.scheduler.add_listener(lambda e: seen.append((e.code, e.job_id)),
                                EVENT_JOB_ADDED | EVENT_JOB_MODIFIED)
    runs: list[str] = []
    ran = threading.Event()

    def run(job_id: str) -> None:
        runs.append(job_id)
        ran.set()

    jobs.start()
    try:
        jobs.scan_at("scan:x", time.time() + 30, run, "scan:x")
        jobs.scan_at("scan:x", time.time() + 0.2, run, "scan:x")  # debounce moved: in place
        assert seen == [(EVENT_JOB_ADDED, "scan:x"), (EVENT_JOB_MODIFIED, "scan:x")]
        assert ran.wait(DEADLINE)
        time.sleep(0.3)
        assert runs == ["scan:x"]  # once
        assert jobs.scheduled() == set()
    finally:
        jobs.shutdown()


def test_families_wait_in_one_timetable_and_each_fires_once_at_its_latest_time() -> None:
    """2,000 families waiting are ONE APScheduler job (``DUE``), not 2,000 (~650 bytes and
    ~140 µs each); each family still runs exactly once, at the time it was last given
    (moved earlier, moved later, left alone within 50 ms), a removed one never, one due now
    at once, and ``scheduled()`` names every family waiting."""
    from qwen_refresher.runtime.jobs import DUE, Jobs

    jobs = Jobs(4)
    runs: dict[str, list[float]] = {}
    lock = threading.Lock()

    def run(job_id: str) -> None:
        with lock:
            runs.setdefault(job_id, []).append(time.time())

    jobs.start()
    try:
        now = time.time()
        for i in range(2000):
            jobs.family_at(f"refresh:idle{i}", now + 3600 + i, run)
        assert [job.id for job in jobs.scheduler.get_jobs()] == [DUE]
        assert len(jobs.scheduled()) == 2000
        plan = {"refresh:late": 0.9, "refresh:early": 0.3, "refresh:gone": 0.4,
                "refresh:now": 0.0}
        jobs.family_at("refresh:late", now + 0.2, run)
        jobs.family_at("refresh:late", now + 0.9, run)  # moved later: never at 0.2
        jobs.family_at("refresh:early", now + 30, run)
        jobs.family_at("refresh:early", now + 0.3, run)  # moved earlier
        jobs.family_at("refresh:early", now + 0.32, run)  # within 50 ms: left alone
        jobs.family_at("refresh:gone", now + 0.4, run)
        jobs.remove("refresh:gone")
        jobs.family_at("refresh:now", now - 5, run)  # overdue: at once
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and len(runs) < 3:
            time.sleep(0.02)
        time.sleep(0.3)
        assert sorted(runs) == ["refresh:early", "refresh:late", "refresh:now"]
        for job_id, times in runs.items():
            assert len(times) == 1, (job_id, times)  # once
            assert times[0] >= now + plan[job_id] - 0.06, (job_id, times[0] - now)
        assert len(jobs.scheduled()) == 2000 and "refresh:late" not in jobs.scheduled()
        jobs.family_at("refresh:late", time.time() + 0.1, run)  # it ran: waits again
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and len(runs["refresh:late"]) < 2:
            time.sleep(0.02)
        assert len(runs["refresh:late"]) == 2
    finally:
        jobs.shutdown()


def test_a_family_queued_for_a_worker_is_handed_over_once_however_often_it_is_replanned() -> None:
    """A busy machine: a family re-planned to "now" again and again while its run waits for a
    worker (the gateway writing its store during a paced storm) hands over ONE run, not one
    per re-plan (up to 64, then APScheduler's "skipped: maximum number of running instances"
    warnings); ``scheduled()`` counts it meanwhile; once its run started, a re-plan hands
    over again."""
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES

    from qwen_refresher.runtime.jobs import Jobs

    jobs = Jobs(1)
    skipped: list[str] = []
    jobs.scheduler.add_listener(lambda e: skipped.append(e.job_id), EVENT_JOB_MAX_INSTANCES)
    busy, gate = threading.Event(), threading.Event()
    runs: list[float] = []

    def block(_job_id: str) -> None:
        busy.set()
        gate.wait(DEADLINE)

    def run(_job_id: str) -> None:
        runs.append(time.time())

    jobs.start()
    try:
        jobs.family_at("refresh:blocker", time.time(), block)
        assert busy.wait(DEADLINE)  # the one worker is taken
        for _ in range(100):
            jobs.family_at("refresh:a", time.time(), run)
            time.sleep(0.003)  # the scheduler submits it to the pool meanwhile
        assert "refresh:a" in jobs.scheduled()
        gate.set()
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and not runs:
            time.sleep(0.02)
        time.sleep(0.3)
        assert len(runs) == 1, f"{len(runs)} runs of one family for 100 re-plans"
        assert skipped == []
        assert jobs.scheduled() == set()
        jobs.family_at("refresh:a", time.time(), run)  # it started: a re-plan runs again
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and len(runs) < 2:
            time.sleep(0.02)
        assert len(runs) == 2
    finally:
        gate.set()
        jobs.shutdown()


def test_a_handed_over_family_moved_back_to_waiting_is_handed_over_again_when_due() -> None:
    """A hand-over taken back before it reached a worker (re-planned later, or removed) leaves
    no mark behind: the next time the family is due it is handed over and runs. A mark left
    behind would keep it from ever running again, so one older than ``QUEUED_TRUST`` (left by
    some path nobody foresaw; made by hand here) is not trusted."""
    from qwen_refresher.runtime.jobs import QUEUED_TRUST, Jobs

    jobs = Jobs(1)
    runs: list[str] = []
    jobs.start()
    jobs.scheduler.pause()  # hand-overs stay in APScheduler's store, not yet at a worker
    try:
        jobs.family_at("refresh:c", time.time(), runs.append)
        assert jobs.scheduler.get_job("refresh:c") is not None
        jobs.family_at("refresh:c", time.time() + 3600, runs.append)  # back to waiting
        assert jobs.scheduler.get_job("refresh:c") is None
        jobs.family_at("refresh:d", time.time(), runs.append)
        jobs.remove("refresh:d")
        jobs.family_at("refresh:c", time.time(), runs.append)  # due again
        jobs.family_at("refresh:d", time.time(), runs.append)
        jobs._queued["refresh:e"] = time.monotonic() - QUEUED_TRUST - 1  # a stale mark
        assert "refresh:e" not in jobs.scheduled()  # an orphan to the next quiet rescan
        jobs.family_at("refresh:e", time.time(), runs.append)
        for job_id in ("refresh:c", "refresh:d", "refresh:e"):
            assert jobs.scheduler.get_job(job_id) is not None, job_id
        jobs.scheduler.resume()
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and len(runs) < 3:
            time.sleep(0.02)
        time.sleep(0.2)
        assert sorted(runs) == ["refresh:c", "refresh:d", "refresh:e"]
    finally:
        jobs.shutdown()


def test_pace_keeps_the_sends_apart_when_what_follows_a_slot_takes_varying_time() -> None:
    """``RateLimiter.acquire`` spaces slots; ``pace`` (right before a request leaves) spaces
    the sends, which the locks and re-read between slot and send would otherwise bunch: a
    late send and an on-time one reached the server closer than ``1 / rate`` (103 in one
    second at a limit of 100). Real threads, delays drawn between slot and send."""
    import itertools

    from qwen_refresher.ratelimit import RateLimiter

    rate = 100.0
    limiter = RateLimiter(lambda: rate)

    def min_gap() -> float:
        rng = random.Random(7)
        delays = [rng.choice((0.0, 0.0, 0.004, 0.018)) for _ in range(40)]
        sends: list[float] = []
        lock = threading.Lock()

        def request(delay: float) -> None:
            assert limiter.acquire()
            time.sleep(delay)  # the store locks and the re-read, slower under load
            assert limiter.pace()
            with lock:
                sends.append(time.monotonic())

        threads = [threading.Thread(target=request, args=(d,)) for d in delays]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        assert len(sends) == len(delays)
        sends.sort()
        return min(b - a for a, b in itertools.pairwise(sends))

    # Half an interval of slack, and the best of three rounds: on a loaded machine (the suite
    # runs on two workers) a thread can be descheduled between its send and its note. The
    # bug this guards against bunches sends in every round; noise does not, all three times.
    gaps = []
    for _ in range(3):
        gaps.append(min_gap())
        if gaps[-1] >= 0.5 / rate:
            break
    assert max(gaps) >= 0.5 / rate, f"sends {max(gaps) * 1000:.1f} ms apart at best"
    stop = threading.Event()
    stop.set()
    assert not limiter.pace(stop), "a stopping daemon sends nothing"
