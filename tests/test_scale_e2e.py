"""Issue 16, the real daemon: cheap sweeps that still catch what events missed, and a storm
that the rate limit spreads.

Performance itself is measured by ``benchmarks/`` (not timed tests); these prove that the
shortcuts taken for it keep the behaviour.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time

from qwen_refresher.ratelimit import RateLimiter
from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import DaemonProcess, OpenClawHome, qwen_profile, wait_for

SIX_HOURS = 6 * 3600.0


def _doc(access: str, refresh: str, expires: int) -> dict[str, object]:
    return {"version": 1, "profiles": {"qwen-portal:default": qwen_profile(access, refresh,
                                                                            expires)},
            "order": {"qwen-portal": ["qwen-portal:default"]}}


def test_sweep_catches_a_missed_same_size_rewrite_that_kept_its_mtime(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    """A sweep reads only stores whose stat() changed. A rewrite that keeps inode, size and
    mtime (``cp -p``, a restore tool, ``touch -d``) still changes ctime, and the sweep must
    see it. Events are pushed an hour away (debounce), so only the sweep can."""
    path = oc.write_store(_doc(*fake.issue_tokens(lifetime=SIX_HOURS)))
    env = oc.env(QWEN_REFRESHER_DEBOUNCE="3600")
    with DaemonProcess(oc, fake, "--sweep-interval", "1", env=env, margin="900") as daemon:
        daemon.wait_event("started")
        time.sleep(3.5)  # past the racy window: sweeps now trust the store's stat()
        assert fake.refresh_requests() == []
        before = os.stat(path)
        access, refresh, expires = fake.issue_tokens(lifetime=120)  # inside the margin: due
        data = (json.dumps(_doc(access, refresh, expires), indent=2) + "\n").encode()
        with open(path, "r+b") as fh:  # in place, as OpenClaw writes
            fh.write(data)
            fh.truncate()
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
            (before.st_ino, before.st_size, before.st_mtime_ns), "precondition: same triple"
        wait_for(lambda: any(r.refresh_token == refresh
                             for r in fake.refresh_requests()), 15,
                 "the sweep to find the rewritten store and refresh its due token", daemon)


def test_storm_is_held_to_max_refresh_rate(oc: OpenClawHome, fake: FakeQwen) -> None:
    """Every family due at once, many allowed in flight: the server sees at most
    ``max_refresh_rate`` requests in any second, and every family is still refreshed."""
    families = 24
    for i in range(families):
        oc.write_store(_doc(*fake.issue_tokens(lifetime=60)), agent=f"a{i:02d}")
    env = oc.env(QWEN_REFRESHER_MAX_REFRESH_RATE="8",
                 QWEN_REFRESHER_MAX_CONCURRENT_REFRESHES="16")
    with DaemonProcess(oc, fake, env=env, margin="900") as daemon:
        wait_for(lambda: len(fake.refresh_requests()) >= families, 30,
                 f"{families} refreshes", daemon)
        # Many stores found at once: one summary line, not a line per store (those are at
        # debug level, which this run does not log).
        found = [e for e in daemon.events() if e.get("event") in ("store_found", "stores_found")]
        assert [(e["event"], e["count"], e["kinds"]) for e in found] == \
            [("stores_found", families, {"openclaw": families})], found
    # 8/s with starts spaced 1/8 s: any 1 s window holds at most 8 (+1 at its edges).
    assert fake.max_rate(1.0) <= 9, f"{fake.max_rate(1.0)} requests in one second"
    times = sorted(r.monotonic for r in fake.refresh_requests())
    assert times[-1] - times[0] >= (families - 1) / 8 * 0.8, "the storm was not spread"


def test_rate_limiter_spaces_callers_and_stops_at_once() -> None:
    limiter = RateLimiter(lambda: 50.0)
    starts: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        assert limiter.acquire()
        with lock:
            starts.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    starts.sort()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 20
    assert starts[-1] - starts[0] >= 19 / 50 * 0.9, gaps
    # A daemon stopping while callers wait for far-away slots: they return False at once.
    slow = RateLimiter(lambda: 0.5)
    stop = threading.Event()
    assert slow.acquire(stop)  # the first slot is now
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(slow.acquire(stop)))
    began = time.monotonic()
    waiter.start()
    time.sleep(0.1)
    stop.set()
    waiter.join(5)
    assert results == [False] and time.monotonic() - began < 1.0
    assert not slow.acquire(None, timeout=0.5), "a slot 2 s away is beyond the timeout"
