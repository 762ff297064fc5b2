"""Scenario 6: half a minute (a minute with ``--long``) of OpenClaw's bookkeeping writes (after
each probe) interleaved with the daemon's rotations of short-lived tokens. Nothing may be
reverted for good, no token set may be torn, and no refresh token may be sent twice."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import (
    DaemonProcess,
    OpenClawHome,
    all_tokens,
    assert_no_secrets,
    qwen_profile,
    wait_for,
)
from tests.interop.openclaw import (
    DEFAULT_PROFILE,
    OPENCLAW_USER_AGENT,
    PROBE,
    OpenClaw,
    OpenClawRun,
    probe_result,
    refresher_status,
    status_row,
)

pytestmark = pytest.mark.interop

#: Half a minute by default (several rotations, ~6 of them); a minute with ``--long``; the
#: variable overrides both.
SOAK_SECONDS = float(os.environ.get("QWEN_INTEROP_SOAK_SECONDS", "30"))
LONG_SOAK_SECONDS = float(os.environ.get("QWEN_INTEROP_SOAK_SECONDS", "60"))
#: Token lifetime at the fake and the daemon's margin: a rotation every few seconds.
LIFETIME, MARGIN = 20, 15
#: OpenClaw runs at the same time (each is one Node process: the suite must fit 2 cores).
WORKERS = 2
OTHER = {"type": "api_key", "provider": "anthropic", "key": "sk-ant-interop"}


@dataclass
class Watcher:
    """Reads the store every few milliseconds, as a third program would, and keeps what it saw."""

    path: Path
    seen: list[tuple[str, str, int]] = field(default_factory=list)  # (access, refresh, expires)
    torn: list[int] = field(default_factory=list)  # sizes of reads that were not JSON
    other_changed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        last = b""
        while not self.stop.wait(0.005):
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                continue
            if data == last:
                continue
            last = data
            try:
                document = json.loads(data)
            except ValueError:
                self.torn.append(len(data))
                continue
            entry = document["profiles"][DEFAULT_PROFILE]
            triple = (entry["access"], entry["refresh"], entry["expires"])
            if not self.seen or self.seen[-1] != triple:
                self.seen.append(triple)
            if document["profiles"].get("anthropic:default") != OTHER:
                self.other_changed += 1


@pytest.mark.timeout(LONG_SOAK_SECONDS + 180)
def test_bookkeeping_and_rotations_interleaved(
        openclaw: OpenClaw, oc: OpenClawHome, fake: FakeQwen,
        request: pytest.FixtureRequest) -> None:
    soak = LONG_SOAK_SECONDS if request.config.getoption("--long") else SOAK_SECONDS
    fake.configure(lifetime=LIFETIME)
    access, refresh, expires_ms = fake.issue_tokens()
    oc.write_store({"version": 1, "profiles": {DEFAULT_PROFILE: qwen_profile(access, refresh,
                                                                             expires_ms),
                                               "anthropic:default": OTHER},
                    "order": {"qwen-portal": [DEFAULT_PROFILE]}})
    watcher = Watcher(openclaw.store_path)
    reader = threading.Thread(target=watcher.run, daemon=True)
    runs: list[OpenClawRun] = []
    deadline = time.monotonic() + soak

    def probe_until_deadline() -> None:
        while time.monotonic() < deadline:
            runs.append(openclaw.start(*PROBE).wait())

    with DaemonProcess(oc, fake, margin=str(MARGIN)) as daemon:
        reader.start()
        workers = [threading.Thread(target=probe_until_deadline) for _ in range(WORKERS)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        # The last word is the daemon's: whatever OpenClaw did last, the newest tokens win.
        newest = fake.issued[-1]
        wait_for(lambda: bool(watcher.seen) and watcher.seen[-1][1] == newest.refresh_token,
                 10, "the newest tokens on disk", daemon)
        status, status_text = refresher_status(oc, fake)
        watcher.stop.set()
        reader.join()

    chain = [i.refresh_token for i in fake.issued]
    rotations = len(chain) - 1
    reverts = sum(1 for a, b in zip(watcher.seen, watcher.seen[1:])
                  if chain.index(b[1]) < chain.index(a[1]))
    undone = sum(1 for e in daemon.events() if e.get("event") == "revert_undone")
    print(f"\nsoak: {len(runs)} OpenClaw probes, {rotations} rotations, {len(watcher.seen)} "
          f"token sets seen on disk, {reverts} reverts seen ({undone} undone by the daemon), "
          f"{len(watcher.torn)} non-JSON reads {watcher.torn[:5]}")

    assert rotations >= soak / LIFETIME, "the daemon hardly rotated"
    assert len(runs) >= WORKERS * 2
    for run in runs:
        assert probe_result(run.json())["status"] == "ok", run.describe()
    # No refresh token sent twice, by anyone; OpenClaw never refreshed at all.
    refreshes = fake.refresh_requests()
    assert all(n == 1 for n in Counter(r.refresh_token for r in refreshes).values())
    assert fake.reuse_count == 0
    assert all(r.outcome == "ok" and r.user_agent != OPENCLAW_USER_AGENT for r in refreshes)
    # Nothing torn: every token set ever on disk is one the server issued as a set...
    issued = {i.refresh_token: i for i in fake.issued}
    for seen_access, seen_refresh, seen_expires in watcher.seen:
        match = issued[seen_refresh]
        assert seen_access == match.access_token
        assert abs(seen_expires - match.expires_ms) < 1000
    assert watcher.other_changed == 0
    # ...and the daemon never took a half-written file for a broken one.
    assert not any(e.get("event") in ("store_invalid", "profile_invalid", "needs_login",
                                      "write_failed") for e in daemon.events()), daemon.output
    # Nothing reverted for good.
    final = oc.read_store()
    assert final["profiles"][DEFAULT_PROFILE]["refresh"] == chain[-1]
    assert final["profiles"]["anthropic:default"] == OTHER
    assert final["lastGood"] == {"qwen-portal": DEFAULT_PROFILE}
    assert status_row(status, oc, openclaw.store_path, DEFAULT_PROFILE)["state"] == "ok"
    assert_no_secrets([daemon.output, status_text], all_tokens(fake))
