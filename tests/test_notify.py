"""The notifier: one notice per needs_login episode, reminders, the recovered notice, assisted
re-login, and every channel for real (a hook script, apprise to a local HTTP endpoint,
a ``notify-send`` on PATH). Time is a fake clock: no test sleeps through a reminder interval.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher.config import Settings
from qwen_refresher.errors import ConfigError
from qwen_refresher.login import AssistedLogin
from qwen_refresher.logsetup import REDACTOR
from qwen_refresher.notify import Courier, Notice, check_notify_setup, desktop_command
from qwen_refresher.runtime.relogin import LoginEpisodes
from qwen_refresher.state import ProfileState, ProfileStatus
from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import OpenClawHome, all_tokens, assert_no_secrets, qwen_profile, wait_for
from tests.test_login import Clock, Log, hook_runs, hook_script

LOGIN_CMD = "openclaw models auth login --provider qwen-portal"
REASON = "server rejected the refresh token: invalid_request: Invalid refresh token or client_id"


class Recorder:
    """A local HTTP endpoint that records what apprise's ``json://`` URL POSTs to it."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.posts: list[dict[str, Any]] = []
        self.status = status
        self.delay = delay
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                time.sleep(recorder.delay)
                try:
                    recorder.posts.append(json.loads(body))
                except ValueError:
                    recorder.posts.append({"raw": body.decode(errors="replace")})
                self.send_response(recorder.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.server.server_address[1]}/notify"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("QWEN_REFRESHER_", "OPENCLAW_", "QWEN_HOME")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


def status(store: str | Path, state: ProfileState = "needs_login", *,
           profile: str = "qwen-portal:default", family: str | None = None,
           agent: str | None = "main", reason: str | None = REASON,
           kind: str = "openclaw") -> ProfileStatus:
    return ProfileStatus(
        store=str(store), store_kind=kind, agent=agent, profile=profile, family=family,
        state=state, expires_at=None, next_refresh_at=None, last_refresh_at=None, attempts=0,
        last_error=reason if state == "needs_login" else None,
        login_command=LOGIN_CMD if state == "needs_login" else None)


def settings(**kw: Any) -> Settings:
    kw.setdefault("notify_desktop", False)
    kw.setdefault("on_rotate", "none")
    return Settings(**kw)


def make(tmp_path: Path, recorder: Recorder | None = None, clock: Clock | None = None,
         **kw: Any) -> tuple[LoginEpisodes, Path, Log, Clock]:
    hook, out = hook_script(tmp_path, "needs_login")
    clock = clock or Clock()
    log = Log()
    urls = [recorder.url] if recorder is not None else []
    notifier = LoginEpisodes(settings(on_needs_login=hook, notify_urls=urls, **kw), log=log,
                             clock=clock)
    return notifier, out, log, clock


STORE = "/srv/agents/main/agent/auth-profiles.json"


# --------------------------------------------------------------------------- set-up checks


def test_check_notify_setup_without_urls_needs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "apprise", None)  # as if not installed
    check_notify_setup(settings())


def test_check_notify_setup_names_the_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "apprise", None)
    with pytest.raises(ConfigError) as info:
        check_notify_setup(settings(notify_urls=["ntfy://ntfy.sh/topic"]))
    assert info.value.setting == "notify_urls (QWEN_REFRESHER_NOTIFY_URLS)"
    assert info.value.problem == "apprise is not installed; pip install 'qwen-refresher[notify]'"
    assert info.value.exit_code == 78


def test_check_notify_setup_refuses_a_bad_url_without_echoing_it() -> None:
    check_notify_setup(settings(notify_urls=["json://127.0.0.1:9/", "tgram://123:ABC/456"]))
    with pytest.raises(ConfigError) as info:
        check_notify_setup(settings(notify_urls=["json://127.0.0.1:9/",
                                                 "nosuchservice://user:hunter2secret@host"]))
    assert "entry 2" in str(info.value) and "nosuchservice://" in str(info.value)
    assert "hunter2secret" not in str(info.value)


def test_notify_urls_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch,
                                                        recorder: Recorder) -> None:
    monkeypatch.setenv("QWEN_REFRESHER_NOTIFY_URLS", json.dumps([recorder.url]))
    assert settings().notify_urls == [recorder.url]


def test_desktop_only_on_a_desktop_session(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "notify-send"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    on = settings(notify_desktop=True)
    assert desktop_command(on, {"PATH": str(bin_dir), "DISPLAY": ":0"}) == str(tool)
    assert desktop_command(on, {"PATH": str(bin_dir), "WAYLAND_DISPLAY": "w"}) == str(tool)
    assert desktop_command(on, {"PATH": str(bin_dir),
                                "DBUS_SESSION_BUS_ADDRESS": "unix:x"}) == str(tool)
    assert desktop_command(on, {"PATH": str(bin_dir)}) is None
    assert desktop_command(on, {"PATH": str(tmp_path), "DISPLAY": ":0"}) is None
    assert desktop_command(settings(notify_desktop=False),
                           {"PATH": str(bin_dir), "DISPLAY": ":0"}) is None


def test_the_courier_delivers_what_it_is_given_and_decides_nothing(
        tmp_path: Path, recorder: Recorder) -> None:
    """notify is delivery only: the same notice sent twice goes out twice (deciding that a
    second notice is a duplicate is ``LoginEpisodes``'s job), to the hook and apprise."""
    hook, out = hook_script(tmp_path, "courier")
    log = Log()
    courier = Courier(settings(on_needs_login=hook, notify_urls=[recorder.url]), log=log)
    try:
        notice = Notice("needs_login", status(STORE), now=1000.0)
        courier.send(notice)
        courier.send(notice)
        assert courier.flush(10)
        assert [run["QWEN_REFRESHER_EVENT"] for run in hook_runs(out)] == ["needs_login"] * 2
        assert len(recorder.posts) == 2  # delivered (flush waited for the worker)
    finally:
        courier.close(2.0)
    courier.send(notice)  # closed: dropped, not queued for a worker that is gone
    assert courier.flush(0.5)
    assert len(hook_runs(out)) == 2


# --------------------------------------------------------------------------- episodes


def test_one_notice_per_episode_reminders_and_one_recovered(
        tmp_path: Path, recorder: Recorder) -> None:
    notifier, out, log, clock = make(tmp_path, recorder, remind_interval=0.5)
    try:
        assert "notify_url_invalid" not in log.events()
        notifier.update([status(STORE, "ok")])
        notifier.flush()
        assert hook_runs(out) == [] and recorder.posts == []

        notifier.update([status(STORE)])
        for _ in range(5):  # the daemon calls often; nothing new to say
            clock.now += 0.09
            notifier.update([status(STORE)])
        assert notifier.flush()
        runs = hook_runs(out)
        assert len(runs) == 1
        env = runs[0]
        assert env["QWEN_REFRESHER_EVENT"] == "needs_login"
        assert env["QWEN_REFRESHER_PROFILE"] == "qwen-portal:default"
        assert env["QWEN_REFRESHER_STORE"] == STORE
        assert env["QWEN_REFRESHER_AGENT"] == "main"
        assert env["QWEN_REFRESHER_REASON"] == REASON
        assert env["QWEN_REFRESHER_LOGIN_COMMAND"] == LOGIN_CMD
        assert "QWEN_REFRESHER_VERIFICATION_URL" not in env
        assert len(recorder.posts) == 1
        post = recorder.posts[0]
        assert post["title"] == "Qwen login needed: qwen-portal:default (agent main)"
        assert post["type"] == "warning"
        for needle in ("qwen-portal:default", STORE, "Invalid refresh token or client_id",
                       LOGIN_CMD, f"qwen-refresher login --store {STORE} --profile "
                                  "qwen-portal:default"):
            assert needle in post["message"]

        clock.now += 0.1  # 0.55 s after the notice: one reminder, then quiet again
        notifier.update([status(STORE)])
        notifier.update([status(STORE)])
        clock.now += 0.2
        notifier.update([status(STORE)])
        notifier.flush()
        assert [r["QWEN_REFRESHER_EVENT"] for r in hook_runs(out)] == ["needs_login", "reminder"]
        assert recorder.posts[1]["title"].startswith("Reminder: Qwen login needed")
        clock.now += 0.5
        notifier.update([status(STORE)])
        notifier.flush()
        assert [r["QWEN_REFRESHER_EVENT"] for r in hook_runs(out)].count("reminder") == 2

        notifier.update([status(STORE, "ok")])
        notifier.update([status(STORE, "ok")])
        clock.now += 5
        notifier.update([status(STORE, "ok")])
        notifier.flush()
        events = [r["QWEN_REFRESHER_EVENT"] for r in hook_runs(out)]
        assert events == ["needs_login", "reminder", "reminder", "recovered"]
        assert recorder.posts[-1]["title"] == "Qwen login restored: qwen-portal:default " \
                                              "(agent main)"
        assert recorder.posts[-1]["type"] == "success"
        assert len(recorder.posts) == 4

        # A second episode is a new one: notified once more.
        notifier.update([status(STORE)])
        notifier.update([status(STORE)])
        notifier.flush()
        assert [r["QWEN_REFRESHER_EVENT"] for r in hook_runs(out)].count("needs_login") == 2
    finally:
        notifier.close(5)


def test_every_profile_is_tracked_on_its_own(tmp_path: Path) -> None:
    notifier, out, _, clock = make(tmp_path, remind_interval=100)
    other = "/srv/agents/work/agent/auth-profiles.json"
    try:
        notifier.update([status(STORE), status(other, "ok", agent="work")])
        clock.now += 1
        notifier.update([status(STORE), status(other, agent="work")])
        notifier.update([status(STORE, "due"), status(other, agent="work")])
        notifier.flush()
        runs = [(r["QWEN_REFRESHER_EVENT"], r["QWEN_REFRESHER_STORE"]) for r in hook_runs(out)]
        assert runs == [("needs_login", STORE), ("needs_login", other), ("recovered", STORE)]
    finally:
        notifier.close(5)


def test_expired_or_invalid_is_not_a_recovery_and_a_vanished_profile_is_dropped(
        tmp_path: Path) -> None:
    notifier, out, _, _ = make(tmp_path, remind_interval=100)
    try:
        notifier.update([status(STORE)])
        notifier.update([status(STORE, "expired")])
        notifier.update([status(STORE, "invalid_store")])
        notifier.update([status(STORE)])
        notifier.update([])  # Qwen Code deletes its file on a refusal: gone, not recovered
        notifier.update([status(STORE, "ok")])
        notifier.flush()
        assert [r["QWEN_REFRESHER_EVENT"] for r in hook_runs(out)] == ["needs_login"]
    finally:
        notifier.close(5)


def test_update_never_blocks_on_slow_channels(tmp_path: Path) -> None:
    slow = Recorder(delay=1.5)
    script = tmp_path / "slow.sh"
    script.write_text("sleep 2\n")
    notifier = LoginEpisodes(settings(on_needs_login=f"sh {script}", notify_urls=[slow.url]),
                        log=Log(), clock=Clock())
    try:
        started = time.monotonic()
        for n in range(20):
            notifier.update([status(f"/srv/{n}/auth-profiles.json")])
        assert time.monotonic() - started < 0.5
    finally:
        started = time.monotonic()
        notifier.close(0.5)
        assert time.monotonic() - started < 1.5, "close is bounded"
        slow.close()


def test_failures_are_logged_and_never_stop_delivery(tmp_path: Path,
                                                     recorder: Recorder) -> None:
    failing = Recorder(status=500)
    marker = tmp_path / "ran"
    hook = f"touch {marker}.$QWEN_REFRESHER_EVENT; exit 3"
    log = Log()
    notifier = LoginEpisodes(settings(on_needs_login=hook,
                                 notify_urls=[failing.url, "json://127.0.0.1:1/", recorder.url]),
                        log=log, clock=Clock())
    try:
        notifier.update([status(STORE)])
        notifier.update([status(STORE, "ok")])
        assert notifier.flush(20)
        assert (tmp_path / "ran.needs_login").exists() and (tmp_path / "ran.recovered").exists()
        assert len(recorder.posts) == 2, "the working URL still got both notices"
        assert len(failing.posts) == 2
        assert log.events().count("on_needs_login_failed") == 2
        failed = [f for level, e, f in log.records if e == "notify_failed"]
        assert [f["channel"] for f in failed] == ["apprise", "apprise"]
        assert "127.0.0.1:1" not in log.text() and failing.url not in log.text(), \
            "notify URLs (which hold secrets) are never logged"
    finally:
        notifier.close(5)
        failing.close()


def test_desktop_notification_runs_notify_send(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    tool = bin_dir / "notify-send"
    tool.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DISPLAY", ":0")
    notifier = LoginEpisodes(settings(notify_desktop=True), log=Log(), clock=Clock())
    try:
        notifier.update([status(STORE)])
        notifier.update([status(STORE, "ok")])
        notifier.flush()
    finally:
        notifier.close(5)
    argv = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(argv) == 2
    assert "--urgency=critical" in argv[0] and "--urgency=normal" in argv[1]
    assert argv[0][-2] == "Qwen login needed: qwen-portal:default (agent main)"
    assert LOGIN_CMD in argv[0][-1]


def test_messages_never_carry_a_token(tmp_path: Path, recorder: Recorder) -> None:
    token = "fakeref-SECRET-" + "x" * 30
    REDACTOR.add(token)
    notifier, out, log, _ = make(tmp_path, recorder)
    leaky = status(STORE, reason=f"server said: bad token {token}")
    try:
        notifier.update([leaky])
        notifier.update([status(STORE, "ok")])
        notifier.flush()
    finally:
        notifier.close(5)
    assert len(recorder.posts) == 2
    assert "bad token [redacted]" in recorder.posts[0]["message"]
    assert_no_secrets([out.read_text(), json.dumps(recorder.posts), log.text()], [token])


def test_notice_text_for_qwen_code_and_a_code() -> None:
    from qwen_refresher.notify import LoginCode

    s = status("/home/u/.qwen/oauth_creds.json", profile="qwen-code", agent=None,
               kind="qwen-code")
    s["login_command"] = "qwen  (then /auth and choose Qwen OAuth)"
    code = LoginCode("https://chat.qwen.ai/authorize?user_code=ABCD-EFGH",
                     "https://chat.qwen.ai/authorize", "ABCD-EFGH", expires_at=1300.0)
    notice = Notice("needs_login", s, code, since=1000.0, now=1000.0)
    assert notice.title() == "Qwen login needed: qwen-code (Qwen Code)"
    body = notice.body()
    assert body.index(code.url) < body.index("qwen  (then /auth"), "the one-tap way comes first"
    assert "ABCD-EFGH; valid for 5 min" in body
    assert "qwen-refresher login --store /home/u/.qwen/oauth_creds.json --profile qwen-code" \
        in body
    assert notice.variables()["VERIFICATION_URL"] == code.url
    reminder = Notice("reminder", s, None, since=1000.0, now=1000.0 + 6 * 3600)
    assert "This has been so for 6.0 h." in reminder.body()


# --------------------------------------------------------------------------- assisted login


def _store(oc: OpenClawHome, fake: FakeQwen, agent: str, access: str | None = None,
           refresh: str | None = None) -> Path:
    if access is None or refresh is None:
        access, refresh, _ = fake.issue_tokens()
    return oc.write_store({"version": 1, "profiles": {
        "qwen-portal:default": qwen_profile(access, refresh, int(time.time() * 1000) - 1000),
        "anthropic:default": {"type": "api_key", "provider": "anthropic", "key": "k"}}},
        agent=agent)


def _assisted(tmp_path: Path, fake: FakeQwen, recorder: Recorder, clock: Clock,
              **kw: Any) -> tuple[LoginEpisodes, AssistedLogin, Path, Log]:
    hook, out = hook_script(tmp_path, "needs_login")
    log = Log()
    s = settings(token_url=fake.token_url, device_code_url=fake.device_code_url,
                 on_needs_login=hook, notify_urls=[recorder.url], auto_login=True, **kw)
    assisted = AssistedLogin(s, log=log, clock=clock)
    return LoginEpisodes(s, log=log, assisted_login=assisted, clock=clock), assisted, out, log


def test_assisted_relogin_end_to_end(oc: OpenClawHome, fake: FakeQwen, tmp_path: Path,
                                     recorder: Recorder) -> None:
    fake.configure(device_interval=0.05)
    path = _store(oc, fake, "main")
    clock = Clock()
    notifier, _, out, log = _assisted(tmp_path, fake, recorder, clock)
    try:
        notifier.update([status(path)])
        wait_for(lambda: bool(hook_runs(out)), 10, "the notice with the login link")
        env = hook_runs(out)[0]
        pending = fake.pending_device_codes()
        assert len(pending) == 1
        url = env["QWEN_REFRESHER_VERIFICATION_URL"]
        assert url == f"{fake.base_url}/authorize?user_code={pending[0]['user_code']}"
        wait_for(lambda: len(recorder.posts) == 1, 10, "the apprise notice")
        assert url in recorder.posts[0]["message"]
        assert pending[0]["user_code"] in recorder.posts[0]["message"]
        assert pending[0]["device_code"] not in json.dumps(recorder.posts)

        fake.approve(pending[0]["user_code"])  # the person taps "approve" on their phone
        wait_for(lambda: json.loads(path.read_bytes())["profiles"]["qwen-portal:default"]
                 ["refresh"] == fake.issued[-1].refresh_token, 10, "the new login on disk")
        doc = json.loads(path.read_bytes())
        assert doc["profiles"]["anthropic:default"]["key"] == "k"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        notifier.update([status(path)])
        notifier.update([status(path, "ok")])
        notifier.flush()
    finally:
        notifier.close(5)
    assert [r["QWEN_REFRESHER_EVENT"] for r in hook_runs(out)] == ["needs_login", "recovered"]
    assert len(recorder.posts) == 2
    assert_no_secrets([out.read_text(), json.dumps(recorder.posts), log.text()],
                      all_tokens(fake) + [c["device_code"] for c in pending])


def test_assisted_login_serves_a_whole_family_with_one_code(
        oc: OpenClawHome, fake: FakeQwen, tmp_path: Path, recorder: Recorder) -> None:
    fake.configure(device_interval=0.05)
    access, refresh, _ = fake.issue_tokens()
    main = _store(oc, fake, "main", access, refresh)
    work = _store(oc, fake, "work", access, refresh)
    clock = Clock()
    notifier, _, out, _ = _assisted(tmp_path, fake, recorder, clock)
    fam = [status(main, family="abc123"), status(work, family="abc123", agent="work")]
    try:
        notifier.update(fam)
        wait_for(lambda: len(hook_runs(out)) == 2, 10, "both notices")
        urls = {r["QWEN_REFRESHER_VERIFICATION_URL"] for r in hook_runs(out)}
        assert len(urls) == 1, "one code for the family"
        assert len([r for r in fake.requests if r.endpoint == "device_code"]) == 1
        fake.approve(fake.pending_device_codes()[0]["user_code"])

        def new(p: Path) -> str:
            return str(json.loads(p.read_bytes())["profiles"]["qwen-portal:default"]["refresh"])

        wait_for(lambda: new(main) == new(work) == fake.issued[-1].refresh_token, 10,
                 "both stores written")
    finally:
        notifier.close(5)


def test_an_expired_code_is_replaced_only_with_the_reminder(
        oc: OpenClawHome, fake: FakeQwen, tmp_path: Path, recorder: Recorder) -> None:
    fake.configure(device_interval=0.05, device_code_lifetime=0.4)
    path = _store(oc, fake, "main")
    clock = Clock()
    notifier, _, out, log = _assisted(tmp_path, fake, recorder, clock, remind_interval=30)

    def codes() -> int:
        return len([r for r in fake.requests if r.endpoint == "device_code"])

    try:
        notifier.update([status(path)])
        wait_for(lambda: "assisted_login_ended" in log.events(), 10, "the code to expire")
        for _ in range(20):  # the daemon keeps calling; no new code, no loop
            clock.now += 1
            notifier.update([status(path)])
        time.sleep(0.2)
        assert codes() == 1
        clock.now += 10  # 30 s after the first notice
        notifier.update([status(path)])
        wait_for(lambda: len(hook_runs(out)) == 2, 10, "the reminder")
        first, reminder = hook_runs(out)
        assert reminder["QWEN_REFRESHER_EVENT"] == "reminder"
        assert codes() == 2
        assert first["QWEN_REFRESHER_VERIFICATION_URL"] != \
            reminder["QWEN_REFRESHER_VERIFICATION_URL"]
    finally:
        notifier.close(5)


def test_recovering_another_way_cancels_the_assisted_login(
        oc: OpenClawHome, fake: FakeQwen, tmp_path: Path, recorder: Recorder) -> None:
    fake.configure(device_interval=0.05)
    path = _store(oc, fake, "main")
    clock = Clock()
    notifier, assisted, out, log = _assisted(tmp_path, fake, recorder, clock)
    try:
        notifier.update([status(path)])
        wait_for(lambda: bool(hook_runs(out)), 10, "the notice")
        assert "assisted_login_started" in log.events()
        assert assisted.running(str(path) + "#qwen-portal:default")
        notifier.update([status(path, "ok")])  # `openclaw models auth login` was run instead
        wait_for(lambda: not assisted.running(str(path) + "#qwen-portal:default"), 5,
                 "the flow to stop")
        before = path.read_bytes()
        code = fake.pending_device_codes()
        if code:
            fake.approve(code[0]["user_code"])
        time.sleep(0.3)
        assert path.read_bytes() == before, "a late approval must not overwrite the login"
    finally:
        notifier.close(5)


def test_a_failing_device_endpoint_still_notifies_without_a_link(
        oc: OpenClawHome, fake: FakeQwen, tmp_path: Path, recorder: Recorder) -> None:
    fake.inject("503", target="device_code")
    path = _store(oc, fake, "main")
    notifier, _, out, _ = _assisted(tmp_path, fake, recorder, Clock())
    try:
        notifier.update([status(path)])
        wait_for(lambda: bool(hook_runs(out)), 10, "the notice")
        assert "QWEN_REFRESHER_VERIFICATION_URL" not in hook_runs(out)[0]
        wait_for(lambda: bool(recorder.posts), 10, "the apprise notice")
        assert LOGIN_CMD in recorder.posts[0]["message"]
    finally:
        notifier.close(5)


def test_a_code_that_never_comes_does_not_swallow_the_notice(
        oc: OpenClawHome, fake: FakeQwen, tmp_path: Path, recorder: Recorder) -> None:
    fake.inject("timeout", target="device_code", delay=3)
    path = _store(oc, fake, "main")
    clock = Clock()
    notifier, _, out, log = _assisted(tmp_path, fake, recorder, clock, http_timeout=2)
    try:
        notifier.update([status(path)])
        time.sleep(0.2)
        notifier.flush()
        assert hook_runs(out) == [], "held back while the code is on its way"
        clock.now += 60
        notifier.update([status(path)])
        notifier.flush()
        assert len(hook_runs(out)) == 1
        assert "QWEN_REFRESHER_VERIFICATION_URL" not in hook_runs(out)[0]
        assert "assisted_login_code_late" in log.events()
    finally:
        notifier.close(5)
