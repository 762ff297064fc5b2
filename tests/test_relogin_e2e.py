"""Re-login end to end: the real daemon (``qwen-refresher run``) and the real CLI as subprocesses,
the fake Qwen server, real store files, a real hook and apprise to a local HTTP endpoint.

1. The refresh token is refused: the person is notified (hook + apprise) exactly once, runs
   ``qwen-refresher login`` somewhere else, approves, and the running daemon takes the new
   tokens up through its watch (no restart), refreshes them, and says "recovered".
2. With ``auto_login`` the daemon starts the device flow itself, the notice carries the link,
   the person approves, and the daemon writes the tokens: no terminal at all.
3. An assisted code that expires unapproved is replaced with the next reminder, not in a loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import (
    ROOT,
    DaemonProcess,
    OpenClawHome,
    all_tokens,
    assert_no_secrets,
    qwen_profile,
    wait_for,
)
from tests.test_login import hook_runs, hook_script
from tests.test_notify import Recorder

OTHER = {"anthropic:default": {"type": "api_key", "provider": "anthropic", "key": "sk-keep"}}


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.close()


def seed_rejected(oc: OpenClawHome, fake: FakeQwen) -> tuple[Path, str]:
    """A store whose refresh token the server refuses, due now (margin 5 > lifetime 4)."""
    access, refresh, expires = fake.issue_tokens(lifetime=4)
    fake.reject_token(refresh)
    path = oc.write_store({"version": 1, "profiles": {
        **OTHER, "qwen-portal:default": qwen_profile(access, refresh, expires)}})
    return path, refresh


def status_json(oc: OpenClawHome, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "qwen_refresher", "status", "--json",
                           "--state-dir", str(oc.our_state)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def states(oc: OpenClawHome, env: dict[str, str]) -> list[str]:
    return [p["state"] for p in status_json(oc, env)["profiles"]]


def refresh_of(path: Path) -> str:
    return str(json.loads(path.read_bytes())["profiles"]["qwen-portal:default"]["refresh"])


def events(out: Path) -> list[str]:
    return [r["QWEN_REFRESHER_EVENT"] for r in hook_runs(out)]


def daemon_env(oc: OpenClawHome, recorder: Recorder, tmp_path: Path,
               **extra: str) -> tuple[dict[str, str], Path, Path]:
    needs_hook, needs_out = hook_script(tmp_path, "needs_login")
    rotate_hook, rotate_out = hook_script(tmp_path, "on_rotate")
    env = oc.env(QWEN_REFRESHER_NOTIFY_URLS=json.dumps([recorder.url]),
                 QWEN_REFRESHER_ON_NEEDS_LOGIN=needs_hook,
                 QWEN_REFRESHER_ON_ROTATE=rotate_hook,
                 QWEN_REFRESHER_NOTIFY_DESKTOP="false", **extra)
    return env, needs_out, rotate_out


def approve_in_browser(url: str) -> None:
    """What the person's phone does: open the link, press "Approve" on the (fake) page."""
    parts = urllib.parse.urlsplit(url)
    code = urllib.parse.parse_qs(parts.query)["user_code"][0]
    form = urllib.parse.urlencode({"user_code": code, "action": "approve"}).encode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(
            f"{parts.scheme}://{parts.netloc}{parts.path}", data=form), timeout=10) as page:
        assert b"Approved" in page.read()


def test_daemon_picks_up_a_cli_login_without_restart(
        oc: OpenClawHome, fake: FakeQwen, recorder: Recorder, tmp_path: Path) -> None:
    fake.configure(device_interval=0.1)
    path, _ = seed_rejected(oc, fake)
    env, needs_out, rotate_out = daemon_env(oc, recorder, tmp_path)
    with DaemonProcess(oc, fake, "--store", str(path), margin="5", env=env) as daemon:
        daemon.wait_event("needs_login")
        wait_for(lambda: events(needs_out) == ["needs_login"], 15, "the on_needs_login hook",
                 daemon)
        wait_for(lambda: len(recorder.posts) == 1, 15, "the apprise notice", daemon)
        assert states(oc, env) == ["needs_login"]
        hook_env = hook_runs(needs_out)[0]
        assert hook_env["QWEN_REFRESHER_STORE"] == str(path)
        assert hook_env["QWEN_REFRESHER_PROFILE"] == "qwen-portal:default"
        assert "Invalid refresh token" in hook_env["QWEN_REFRESHER_REASON"]
        assert hook_env["QWEN_REFRESHER_LOGIN_COMMAND"] == \
            "openclaw models auth login --provider qwen-portal"
        message = recorder.posts[0]["message"]
        assert f"qwen-refresher login --store {path} --profile qwen-portal:default" in message
        assert "Invalid refresh token or client_id" in message

        # The person runs the login in some other shell, with no TTY, and approves.
        fake.configure(lifetime=8)  # short, so the daemon visibly refreshes the new login
        login = subprocess.Popen(
            [sys.executable, "-m", "qwen_refresher", "login", "--store", str(path),
             "--token-url", fake.token_url, "--device-code-url", fake.device_code_url],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        assert login.stdout is not None
        url = ""
        while "user_code=" not in url:
            url = login.stdout.readline()
            assert url, "login exited before printing the URL"
        approve_in_browser(url.strip())
        out, err = login.communicate(timeout=20)
        assert login.returncode == 0, err
        logged_in = fake.issued[-1].refresh_token
        assert refresh_of(path) == logged_in
        assert events(rotate_out) == ["login"], "the gateway was told to reload"

        # The running daemon notices through its watch, resumes, and refreshes the new login.
        wait_for(lambda: states(oc, env) == ["ok"], 15, "state ok again", daemon)
        wait_for(lambda: events(needs_out) == ["needs_login", "recovered"], 15,
                 "the recovered notice", daemon)
        wait_for(lambda: any(r.refresh_token == logged_in for r in fake.refresh_requests()),
                 20, "a refresh of the new login", daemon)
        wait_for(lambda: refresh_of(path) == fake.issued[-1].refresh_token != logged_in, 10,
                 "the rotated login on disk", daemon)
        assert recorder.posts[-1]["title"].startswith("Qwen login restored")
        assert daemon.proc.poll() is None, "no restart"
    doc = json.loads(path.read_bytes())
    assert doc["profiles"]["anthropic:default"] == OTHER["anthropic:default"]
    assert events(needs_out) == ["needs_login", "recovered"], "exactly once per episode"
    assert_no_secrets([daemon.output, out, err, needs_out.read_text(), rotate_out.read_text(),
                       json.dumps(recorder.posts)], all_tokens(fake))


def test_assisted_relogin_without_any_terminal(
        oc: OpenClawHome, fake: FakeQwen, recorder: Recorder, tmp_path: Path) -> None:
    fake.configure(device_interval=0.1)
    path, dead = seed_rejected(oc, fake)
    env, needs_out, rotate_out = daemon_env(oc, recorder, tmp_path,
                                            QWEN_REFRESHER_AUTO_LOGIN="true")
    with DaemonProcess(oc, fake, "--store", str(path), margin="5", env=env) as daemon:
        wait_for(lambda: len(hook_runs(needs_out)) == 1, 20, "the notice with a link", daemon)
        hook_env = hook_runs(needs_out)[0]
        url = hook_env["QWEN_REFRESHER_VERIFICATION_URL"]
        assert url.startswith(fake.base_url + "/authorize?user_code=")
        wait_for(lambda: len(recorder.posts) == 1, 15, "the apprise notice", daemon)
        assert url in recorder.posts[0]["message"]
        assert refresh_of(path) == dead
        approve_in_browser(url)  # tapped on the phone
        wait_for(lambda: refresh_of(path) != dead, 15, "the daemon writing the login", daemon)
        assert refresh_of(path) == next(i.refresh_token for i in fake.issued if i.via == "device")
        wait_for(lambda: states(oc, env) == ["ok"], 15, "state ok", daemon)
        wait_for(lambda: events(needs_out) == ["needs_login", "recovered"], 15,
                 "the recovered notice", daemon)
        assert "login" in events(rotate_out), "the gateway was told to reload"
    assert json.loads(path.read_bytes())["profiles"]["anthropic:default"] == \
        OTHER["anthropic:default"]
    codes = [r for r in fake.requests if r.endpoint == "device_code"]
    assert len(codes) == 1
    assert_no_secrets([daemon.output, needs_out.read_text(), rotate_out.read_text(),
                       json.dumps(recorder.posts)], all_tokens(fake))


def test_an_unapproved_code_is_replaced_with_the_reminder_not_in_a_loop(
        oc: OpenClawHome, fake: FakeQwen, recorder: Recorder, tmp_path: Path) -> None:
    fake.configure(device_interval=0.1, device_code_lifetime=1)
    path, _ = seed_rejected(oc, fake)
    env, needs_out, _ = daemon_env(oc, recorder, tmp_path, QWEN_REFRESHER_AUTO_LOGIN="true",
                                   QWEN_REFRESHER_REMIND_INTERVAL="6",
                                   QWEN_REFRESHER_SWEEP_INTERVAL="1")

    def device_codes() -> int:
        return len([r for r in fake.requests if r.endpoint == "device_code"])

    with DaemonProcess(oc, fake, "--store", str(path), margin="5", env=env) as daemon:
        wait_for(lambda: len(hook_runs(needs_out)) == 1, 20, "the first notice", daemon)
        started = time.monotonic()
        wait_for(lambda: daemon.has_event("assisted_login_ended"), 10, "the code to expire",
                 daemon)
        time.sleep(max(0.0, 4 - (time.monotonic() - started)))
        assert device_codes() == 1, "no new code before the reminder"
        wait_for(lambda: events(needs_out) == ["needs_login", "reminder"], 15, "the reminder",
                 daemon)
        assert device_codes() == 2
        first, reminder = hook_runs(needs_out)
        assert first["QWEN_REFRESHER_VERIFICATION_URL"] != \
            reminder["QWEN_REFRESHER_VERIFICATION_URL"]
