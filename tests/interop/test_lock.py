"""Scenario 5: one lock, two programs. While qwen-refresher holds OpenClaw's lock OpenClaw waits
(and then uses what we wrote); while OpenClaw holds it, the daemon waits."""

from __future__ import annotations

import json
import time

import pytest

from qwen_refresher.models import Credentials
from qwen_refresher.stores.openclaw import OpenClawStore
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
    probe_result,
)

pytestmark = pytest.mark.interop

#: How long we keep the lock after OpenClaw has started probing.
HOLD_AFTER_PROBE_START = 3.0
#: How long the fake sits on OpenClaw's refresh request (OpenClaw holds its lock meanwhile).
OPENCLAW_HOLD = 5.0


def test_openclaw_waits_for_our_lock_then_uses_our_token(
        openclaw: OpenClaw, oc: OpenClawHome, fake: FakeQwen) -> None:
    access, refresh, expires_ms = fake.issue_tokens(lifetime=-60)  # OpenClaw must lock to refresh
    oc.write_store({"version": 1, "profiles": {DEFAULT_PROFILE: qwen_profile(access, refresh,
                                                                             expires_ms)}})
    fresh = Credentials(*fake.issue_tokens(lifetime=3600))
    store = OpenClawStore(openclaw.store_path)
    sessions = oc.state / "agents" / "main" / "sessions"  # made as each probe target starts

    with store.lock().held():
        run = openclaw.start(*PROBE)
        wait_for(sessions.exists, 60, "OpenClaw to start probing")
        time.sleep(HOLD_AFTER_PROBE_START)
        assert run.running(), "OpenClaw finished while we held its lock"
        store.write(store.read(), {DEFAULT_PROFILE: fresh})
        released = time.time()
    report = run.wait().json()

    result = probe_result(report)
    assert result["status"] == "ok", report["auth"]["probes"]
    probes = report["auth"]["probes"]
    # It was inside the probe, before we let go, and finished only after.
    assert probes["startedAt"] / 1000 < released - HOLD_AFTER_PROBE_START + 1
    assert probes["finishedAt"] / 1000 > released
    # Under its lock it re-read the store, found our token valid, and refreshed nothing.
    assert fake.refresh_requests() == []
    chats = [r for r in fake.requests if r.endpoint == "chat"]
    assert [c.access_token for c in chats] == [fresh.access]
    document = oc.read_store()
    assert document["profiles"][DEFAULT_PROFILE] == qwen_profile(fresh.access, fresh.refresh,
                                                                 fresh.expires_ms)
    assert document["lastGood"] == {"qwen-portal": DEFAULT_PROFILE}


def test_the_daemon_waits_while_openclaw_holds_the_lock(
        openclaw: OpenClaw, oc: OpenClawHome, fake: FakeQwen) -> None:
    access, refresh, expires_ms = fake.issue_tokens(lifetime=-60)
    oc.write_store({"version": 1, "profiles": {DEFAULT_PROFILE: qwen_profile(access, refresh,
                                                                             expires_ms)}})
    # OpenClaw's refresh request gets no answer for OPENCLAW_HOLD seconds, and then none at
    # all: OpenClaw holds its lock that long, and the refresh token stays unspent.
    fake.inject("timeout", delay=OPENCLAW_HOLD)
    lock_file = openclaw.store_path.with_name(openclaw.store_path.name + ".lock")

    run = openclaw.start(*PROBE)

    def held_by_openclaw() -> bool:
        try:
            return bool(json.loads(lock_file.read_text())["pid"] == run.proc.pid)
        except (OSError, ValueError, KeyError):
            return False

    wait_for(held_by_openclaw, 60, "OpenClaw to take its lock")
    daemon = DaemonProcess(oc, fake, "--once", margin="60")
    daemon.wait_event("store_found")  # next: lock the store and refresh the expired profile
    assert held_by_openclaw(), "OpenClaw let go before the daemon got to the lock"
    assert daemon.proc.wait(60) == 0, daemon.output
    daemon.stop()
    run.wait()

    openclaw_try, daemon_try = fake.refresh_requests()
    assert openclaw_try.user_agent == OPENCLAW_USER_AGENT
    assert openclaw_try.outcome == "fault:timeout"
    assert (daemon_try.refresh_token, daemon_try.outcome) == (refresh, "ok")
    # The daemon got the lock only once OpenClaw had given up on its request and let go.
    assert daemon_try.at > openclaw_try.at
    rotated = fake.issued[-1]
    on_disk = oc.read_store()["profiles"][DEFAULT_PROFILE]
    assert (on_disk["access"], on_disk["refresh"]) == (rotated.access_token,
                                                       rotated.refresh_token)
    assert not lock_file.exists()
    assert_no_secrets([daemon.output], all_tokens(fake))
