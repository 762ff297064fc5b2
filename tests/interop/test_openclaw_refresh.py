"""Scenario 3: OpenClaw refreshing by itself spends the refresh token and keeps the dead one on
disk (its bug in 2026.3.24); the daemon then asks for a login once, and a login restores it."""

from __future__ import annotations

import time

import pytest

from qwen_refresher.testing.fake_qwen import FakeQwen, IssuedTokens
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
    LOGIN_COMMAND,
    OPENCLAW_USER_AGENT,
    OpenClaw,
    probe_result,
    refresher,
    refresher_status,
    status_row,
)

pytestmark = pytest.mark.interop


def openclaw_spends_the_token(openclaw: OpenClaw, oc: OpenClawHome,
                              fake: FakeQwen) -> tuple[str, IssuedTokens]:
    """An expired profile, no daemon: OpenClaw refreshes it, uses the new access token, and
    saves nothing. Returns the dead refresh token and what the server issued for it."""
    access, refresh, expires_ms = fake.issue_tokens(lifetime=-60)
    oc.write_store({"version": 1, "profiles": {DEFAULT_PROFILE: qwen_profile(access, refresh,
                                                                             expires_ms)}})
    report = openclaw.probe()

    assert probe_result(report)["status"] == "ok", report["auth"]["probes"]
    (request,) = fake.refresh_requests()
    assert (request.refresh_token, request.outcome) == (refresh, "ok")
    assert request.user_agent == OPENCLAW_USER_AGENT
    issued = fake.issued[-1]
    assert issued.replaced == refresh
    chats = [r for r in fake.requests if r.endpoint == "chat"]
    assert [c.access_token for c in chats] == [issued.access_token]
    # The bug: the rotated tokens live only in that process; the file keeps the spent ones.
    on_disk = oc.read_store()["profiles"][DEFAULT_PROFILE]
    assert (on_disk["access"], on_disk["refresh"], on_disk["expires"]) == (
        access, refresh, expires_ms)
    return refresh, issued


def test_openclaw_locks_itself_out_and_the_daemon_asks_for_one_login(
        openclaw: OpenClaw, oc: OpenClawHome, fake: FakeQwen) -> None:
    dead, _ = openclaw_spends_the_token(openclaw, oc, fake)

    # OpenClaw's next run is locked out: the user-visible error of openclaw issue 36982.
    again = probe_result(openclaw.probe())
    assert again["status"] != "ok"
    assert "refresh token expired or invalid" in again["error"]
    assert [r.refresh_token for r in fake.refresh_requests()] == [dead, dead]

    with DaemonProcess(oc, fake, margin="60") as daemon:
        daemon.wait_event("needs_login")
        status, status_text = refresher_status(oc, fake)
        row = status_row(status, oc, openclaw.store_path, DEFAULT_PROFILE)
        assert row["state"] == "needs_login"
        assert row["login_command"] == LOGIN_COMMAND
        assert status["exit_code"] == 2
        # Rather than looping: one attempt with the dead token, then silence (a retry loop
        # would show within its first back-off, 1 s).
        seen = len(fake.refresh_requests())
        daemon_tries = [r for r in fake.refresh_requests() if r.user_agent != OPENCLAW_USER_AGENT]
        assert [(r.refresh_token, r.outcome) for r in daemon_tries] == [(dead, "reused")]
        time.sleep(2)

        # `qwen-refresher login` (device code; the fake approves at the first poll).
        fake.configure(auto_approve_after=0, device_interval=0.2)
        login = refresher(oc, fake, "login", "--store", str(openclaw.store_path), "--no-qr")
        assert login.returncode == 0, login.stdout + login.stderr
        device = fake.issued[-1]
        assert device.via == "device"
        wait_for(lambda: status_row(refresher_status(oc, fake)[0], oc, openclaw.store_path,
                                    DEFAULT_PROFILE)["state"] == "ok", 15, "state ok after login",
                 daemon)
    assert len(fake.refresh_requests()) == seen, "the daemon retried a rejected token"

    report = openclaw.probe()
    assert probe_result(report)["status"] == "ok", report["auth"]["probes"]
    assert [r.endpoint for r in fake.requests][-1] == "chat"
    assert fake.requests[-1].access_token == device.access_token
    on_disk = oc.read_store()["profiles"][DEFAULT_PROFILE]
    assert (on_disk["access"], on_disk["refresh"]) == (device.access_token,
                                                       device.refresh_token)
    assert_no_secrets([daemon.output, status_text, login.stdout, login.stderr],
                      all_tokens(fake))


def test_auto_login_restores_the_family_openclaw_spent(
        openclaw: OpenClaw, oc: OpenClawHome, fake: FakeQwen) -> None:
    dead, _ = openclaw_spends_the_token(openclaw, oc, fake)
    fake.configure(auto_approve_after=0, device_interval=0.2)

    with DaemonProcess(oc, fake, "--auto-login", margin="60") as daemon:
        daemon.wait_event("needs_login")
        wait_for(lambda: any(i.via == "device" for i in fake.issued), 20,
                 "the daemon's device-code login", daemon)
        device = next(i for i in fake.issued if i.via == "device")
        wait_for(lambda: oc.read_store()["profiles"][DEFAULT_PROFILE]["refresh"]
                 == device.refresh_token, 15, "the login's tokens in the store", daemon)
        wait_for(lambda: status_row(refresher_status(oc, fake)[0], oc, openclaw.store_path,
                                    DEFAULT_PROFILE)["state"] == "ok", 15, "state ok", daemon)
        _, status_text = refresher_status(oc, fake)
    daemon_tries = [r for r in fake.refresh_requests() if r.user_agent != OPENCLAW_USER_AGENT]
    assert [(r.refresh_token, r.outcome) for r in daemon_tries] == [(dead, "reused")]
    on_disk = oc.read_store()["profiles"][DEFAULT_PROFILE]
    assert on_disk["access"] == device.access_token
    # Clients compute the expiry from their own clock: within a second of the server's.
    assert abs(on_disk["expires"] - device.expires_ms) < 1000
    assert_no_secrets([daemon.output, status_text], all_tokens(fake))
