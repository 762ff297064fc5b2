"""Scenario 2: the daemon rotates before expiry, so OpenClaw never refreshes by itself."""

from __future__ import annotations

import pytest

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import (
    DaemonProcess,
    OpenClawHome,
    all_tokens,
    assert_no_secrets,
    qwen_profile,
)
from tests.interop.openclaw import (
    DEFAULT_PROFILE,
    OPENCLAW_USER_AGENT,
    OpenClaw,
    probe_result,
    refresher_status,
    status_row,
)

pytestmark = pytest.mark.interop


def test_openclaw_uses_the_daemons_token_and_sends_no_refresh(
        openclaw: OpenClaw, oc: OpenClawHome, fake: FakeQwen) -> None:
    access, refresh, expires_ms = fake.issue_tokens(lifetime=30)  # inside the 60 s margin
    oc.write_store({"version": 1, "profiles": {DEFAULT_PROFILE: qwen_profile(access, refresh,
                                                                             expires_ms)}})
    with DaemonProcess(oc, fake, margin="60") as daemon:
        daemon.wait_event("rotated")
        rotated = fake.issued[-1]
        assert rotated.via == "refresh" and rotated.replaced == refresh
        before = oc.read_store()["profiles"][DEFAULT_PROFILE]
        assert (before["access"], before["refresh"]) == (rotated.access_token,
                                                        rotated.refresh_token)

        report = openclaw.probe()  # the daemon keeps running meanwhile

        status, status_text = refresher_status(oc, fake)
    assert probe_result(report)["status"] == "ok", report["auth"]["probes"]
    # One refresh in all, the daemon's; OpenClaw found a valid token and never refreshed.
    refreshes = fake.refresh_requests()
    assert [r.refresh_token for r in refreshes] == [refresh]
    assert all(r.user_agent != OPENCLAW_USER_AGENT for r in refreshes)
    chats = [r for r in fake.requests if r.endpoint == "chat"]
    assert [c.access_token for c in chats] == [rotated.access_token]
    # OpenClaw's bookkeeping write after the probe kept the daemon's tokens.
    document = oc.read_store()
    assert document["profiles"][DEFAULT_PROFILE] == before
    assert document["lastGood"] == {"qwen-portal": DEFAULT_PROFILE}
    assert status_row(status, oc, openclaw.store_path, DEFAULT_PROFILE)["state"] == "ok"
    assert_no_secrets([daemon.output, status_text], all_tokens(fake))
