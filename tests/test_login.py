"""``qwen-refresher login``, ``write_login``, ``linked_targets`` and ``AssistedLogin``.

Everything runs against the real fake Qwen server and real files: the device flow over HTTP
(pending, slow_down, approval, expiry, denial), the store under OpenClaw's own lock, and the
CLI as a subprocess without a TTY.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher import errors, login
from qwen_refresher.config import Settings
from qwen_refresher.errors import DeviceFlowError, StoreError, StoreMalformed
from qwen_refresher.login import (
    AssistedLogin,
    LoginWriteError,
    linked_targets,
    write_login,
)
from qwen_refresher.models import Credentials, ProfileKey
from qwen_refresher.stores import OpenClawStore, QwenCodeStore
from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import (
    ROOT,
    OpenClawHome,
    all_tokens,
    assert_no_secrets,
    openclaw_json,
    qwen_profile,
    wait_for,
)

OTHER_PROFILES = {
    "anthropic:default": {"type": "api_key", "provider": "anthropic", "key": "sk-ant-keep"},
    "openai:work": {"type": "oauth", "provider": "openai", "access": "o-acc", "refresh": "o-ref",
                    "expires": 1_900_000_000_000, "email": "a@b"},
}


class Log:
    """Stands in for the structlog logger: records (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def bind(self, **fields: Any) -> Log:
        return self

    def _add(self, level: str, event: str, **fields: Any) -> None:
        with self._lock:
            self.records.append((level, event, fields))

    def debug(self, event: str, **f: Any) -> None:
        self._add("debug", event, **f)

    def info(self, event: str, **f: Any) -> None:
        self._add("info", event, **f)

    def warning(self, event: str, **f: Any) -> None:
        self._add("warning", event, **f)

    def error(self, event: str, **f: Any) -> None:
        self._add("error", event, **f)

    def exception(self, event: str, **f: Any) -> None:
        self._add("exception", event, **f)

    def events(self) -> list[str]:
        with self._lock:
            return [e for _, e, _ in self.records]

    def text(self) -> str:
        with self._lock:
            return json.dumps(self.records, default=str)


@pytest.fixture
def env(oc: OpenClawHome, monkeypatch: pytest.MonkeyPatch) -> OpenClawHome:
    """This process's environment pointed at the throw-away home (settings read os.environ)."""
    for name in list(os.environ):
        if name.startswith(("QWEN_REFRESHER_", "OPENCLAW_", "QWEN_HOME")):
            monkeypatch.delenv(name)
    for name, value in oc.env().items():
        monkeypatch.setenv(name, value)
    oc.state.mkdir(mode=0o700, exist_ok=True)  # OpenClaw has run here (onboarding made it)
    return oc


@pytest.fixture
def quick(fake: FakeQwen) -> FakeQwen:
    fake.configure(device_interval=0.05)
    return fake


def settings_for(fake: FakeQwen, **extra: Any) -> Settings:
    return Settings(token_url=fake.token_url, device_code_url=fake.device_code_url,
                    **extra)


def creds(fake: FakeQwen, lifetime: float = 3600) -> Credentials:
    access, refresh, expires = fake.issue_tokens(lifetime=lifetime)
    return Credentials(access=access, refresh=refresh, expires_ms=expires)


def seed(oc: OpenClawHome, fake: FakeQwen, agent: str = "main",
         profiles: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any], Credentials]:
    c = creds(fake)
    doc = {"version": 1,
           "profiles": {**OTHER_PROFILES,
                        "qwen-portal:default": qwen_profile(c.access, c.refresh, c.expires_ms),
                        **(profiles or {})},
           "order": {"qwen-portal": ["qwen-portal:default"]}}
    return oc.write_store(doc, agent=agent), doc, c


def hook_script(tmp_path: Path, name: str = "hook") -> tuple[str, Path]:
    """A real hook that appends its QWEN_REFRESHER_* environment as one JSON line."""
    out = tmp_path / f"{name}.jsonl"
    script = tmp_path / f"{name}.py"
    script.write_text(
        "import json, os\n"
        f"with open({str(out)!r}, 'a') as fh:\n"
        "    fh.write(json.dumps({k: v for k, v in os.environ.items()\n"
        "                         if k.startswith('QWEN_REFRESHER_')}) + '\\n')\n")
    return f"{sys.executable} {script}", out


def hook_runs(out: Path) -> list[dict[str, str]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def args(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {"store": None, "profile": None, "no_qr": False, "config": None,
                            "token_url": None, "device_code_url": None, "state_dir": None}
    base.update(kw)
    return argparse.Namespace(**base)


def outcomes(fake: FakeQwen, endpoint: str = "token") -> list[str]:
    return [r.outcome for r in fake.requests
            if r.endpoint == endpoint and r.grant_type != "refresh_token"]


# --------------------------------------------------------------------------- write_login


def test_write_login_replaces_tokens_and_leaves_everything_else_byte_identical(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    path, doc, _ = seed(oc, fake)
    os.chmod(path, 0o640)  # a file holding tokens is always written 0600 (as OpenClaw does)
    new = creds(fake)
    written = write_login([(OpenClawStore(path), "qwen-portal:default")], new, lock_timeout=5)
    assert written == [ProfileKey(path, "qwen-portal:default")]
    doc["profiles"]["qwen-portal:default"].update(
        access=new.access, refresh=new.refresh, expires=new.expires_ms)
    assert path.read_bytes() == openclaw_json(doc)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not Path(str(path) + ".lock").exists()


def test_write_login_creates_a_missing_store_private(oc: OpenClawHome, fake: FakeQwen) -> None:
    path = oc.store_path("fresh")
    new = creds(fake)
    write_login([(OpenClawStore(path), "qwen-portal:default")], new, lock_timeout=5)
    assert json.loads(path.read_bytes()) == {
        "version": 1,
        "profiles": {"qwen-portal:default": {
            "type": "oauth", "provider": "qwen-portal", "access": new.access,
            "refresh": new.refresh, "expires": new.expires_ms}},
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (path.parent, path.parent.parent, path.parent.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_write_login_creates_qwen_code_file(tmp_path: Path, fake: FakeQwen) -> None:
    path = tmp_path / "qhome" / ".qwen" / "oauth_creds.json"
    new = creds(fake)
    write_login([(QwenCodeStore(path), "qwen-code")], new, lock_timeout=5)
    doc = json.loads(path.read_bytes())
    assert doc["access_token"] == new.access and doc["refresh_token"] == new.refresh
    assert doc["expiry_date"] == new.expires_ms and doc["token_type"] == "Bearer"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not (path.parent / "oauth_creds.lock").exists()


def test_write_login_waits_for_openclaws_lock(oc: OpenClawHome, fake: FakeQwen) -> None:
    path, _, _ = seed(oc, fake)
    lock = Path(str(path.resolve()) + ".lock")
    lock.write_text(json.dumps({"pid": os.getpid(), "createdAt": time.strftime(
        "%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}, indent=2))
    released_at: list[float] = []

    def release() -> None:
        time.sleep(0.5)
        released_at.append(time.monotonic())
        lock.unlink()

    thread = threading.Thread(target=release)
    thread.start()
    new = creds(fake)
    write_login([(OpenClawStore(path), "qwen-portal:default")], new, lock_timeout=10)
    done = time.monotonic()
    thread.join()
    assert released_at and done >= released_at[0], "wrote while OpenClaw held the lock"
    assert json.loads(path.read_bytes())["profiles"]["qwen-portal:default"]["refresh"] == \
        new.refresh


def test_write_login_writes_what_it_can_then_raises(oc: OpenClawHome, fake: FakeQwen) -> None:
    stuck, _, old = seed(oc, fake, agent="stuck")
    fine, _, _ = seed(oc, fake, agent="fine")
    lock = Path(str(stuck.resolve()) + ".lock")
    lock.write_text(json.dumps({"pid": os.getpid(), "createdAt": time.strftime(
        "%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}))
    new = creds(fake)
    with pytest.raises(LoginWriteError) as info:
        write_login([(OpenClawStore(stuck), "qwen-portal:default"),
                     (OpenClawStore(fine), "qwen-portal:default")], new, lock_timeout=0.3)
    assert isinstance(info.value, StoreError)
    assert info.value.written == [ProfileKey(fine, "qwen-portal:default")]
    assert "lock" in str(info.value) and str(fine) in str(info.value)
    assert_no_secrets([str(info.value)], [new.access, new.refresh])
    assert json.loads(fine.read_bytes())["profiles"]["qwen-portal:default"]["refresh"] == \
        new.refresh
    assert json.loads(stuck.read_bytes())["profiles"]["qwen-portal:default"]["refresh"] == \
        old.refresh


def test_write_login_never_grafts_tokens_onto_another_provider(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    path, _, _ = seed(oc, fake)
    before = path.read_bytes()
    for profile in ("anthropic:default", "something-else"):
        with pytest.raises(StoreError, match=r"refusing|must be named"):
            write_login([(OpenClawStore(path), profile)], creds(fake), lock_timeout=1)
    assert path.read_bytes() == before


def test_write_login_refuses_a_malformed_store(oc: OpenClawHome, fake: FakeQwen) -> None:
    path = oc.write_store(b'{"version": 1, "profiles": {')
    with pytest.raises(LoginWriteError, match="not valid JSON"):
        write_login([(OpenClawStore(path), "qwen-portal:default")], creds(fake), lock_timeout=1)
    assert path.read_bytes() == b'{"version": 1, "profiles": {'


# --------------------------------------------------------------------------- linked_targets


def test_linked_targets_finds_every_holder_of_the_same_refresh_token(
        env: OpenClawHome, fake: FakeQwen) -> None:
    main, _, shared = seed(env, fake, agent="main")
    c = shared
    env.write_store({"version": 1, "profiles": {
        "qwen-portal:default": qwen_profile(c.access, c.refresh, c.expires_ms),
        "qwen-portal:other": qwen_profile(*fake.issue_tokens())}}, agent="work")
    seed(env, fake, agent="unrelated")
    qwen = env.home / ".qwen" / "oauth_creds.json"
    qwen.parent.mkdir(mode=0o700)
    qwen.write_text(json.dumps({"access_token": c.access, "refresh_token": c.refresh,
                                "token_type": "Bearer", "expiry_date": c.expires_ms}))
    settings = settings_for(fake)
    found = linked_targets(OpenClawStore(main), "qwen-portal:default", settings)
    names = [(s.path, p) for s, p in found]
    assert names[0] == (main, "qwen-portal:default")
    assert sorted(names[1:]) == sorted([(env.store_path("work"), "qwen-portal:default"),
                                        (qwen, "qwen-code")])
    assert isinstance(dict((s.path, s) for s, _ in found)[qwen], QwenCodeStore)


def test_linked_targets_of_a_missing_store_is_just_the_target(
        env: OpenClawHome, fake: FakeQwen) -> None:
    seed(env, fake, agent="work")
    target = OpenClawStore(env.store_path("main"))
    assert [(s.path, p) for s, p in linked_targets(target, "qwen-portal:default",
                                                   settings_for(fake))] == \
        [(target.path, "qwen-portal:default")]


def test_linked_targets_refuses_an_unusable_target_before_any_login(
        env: OpenClawHome, fake: FakeQwen) -> None:
    path = env.write_store(b"not json")
    with pytest.raises(StoreMalformed):
        linked_targets(OpenClawStore(path), "qwen-portal:default", settings_for(fake))


# --------------------------------------------------------------------------- run(args)


def _approve_when_pending(fake: FakeQwen, *, deny: bool = False, after_polls: int = 2
                          ) -> threading.Thread:
    def worker() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            codes = [c for c in fake.pending_device_codes() if c["polls"] >= after_polls]
            if codes:
                (fake.deny if deny else fake.approve)(codes[0]["user_code"])
                return
            time.sleep(0.02)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    return thread


def test_login_full_flow_pending_slow_down_success(
        env: OpenClawHome, quick: FakeQwen, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    fake = quick
    path, doc, old = seed(env, fake)
    fake.reject_token(old.refresh)
    hook, out = hook_script(tmp_path)
    monkeypatch.setenv("QWEN_REFRESHER_ON_ROTATE", hook)
    fake.inject("slow_down", count=2)
    approver = _approve_when_pending(fake, after_polls=2)
    rc = login.run(args(token_url=fake.token_url, device_code_url=fake.device_code_url))
    approver.join()
    captured = capsys.readouterr()
    assert rc == 0
    polls = outcomes(fake)
    assert polls.count("fault:slow_down") == 2
    assert polls.count("pending") >= 2
    assert polls[-1] == "ok"
    # Two slow_downs: every later poll waits 0.05 * 1.5 * 1.5 s, not the 0.05 s interval.
    times = [r.monotonic for r in fake.requests if r.endpoint == "token"]
    after = times[polls.index("fault:slow_down") + 1:]
    assert min(b - a for a, b in itertools.pairwise(after)) >= 0.1
    issued = fake.issued[-1]
    assert issued.via == "device"
    written = json.loads(path.read_bytes())
    expires = written["profiles"]["qwen-portal:default"]["expires"]
    assert abs(expires - issued.expires_ms) < 2000, "expires is epoch milliseconds"
    doc["profiles"]["qwen-portal:default"].update(
        access=issued.access_token, refresh=issued.refresh_token, expires=expires)
    assert path.read_bytes() == openclaw_json(doc), "only the three token fields changed"
    url_line = next(line for line in captured.out.splitlines() if "user_code=" in line)
    assert url_line.strip().startswith(fake.base_url + "/authorize?user_code=")
    assert "enter the code" in captured.out
    assert "█" not in captured.out and "▀" not in captured.out, "no QR code without a TTY"
    assert "Logged in" in captured.err
    runs = hook_runs(out)
    assert len(runs) == 1 and runs[0]["QWEN_REFRESHER_EVENT"] == "login"
    assert runs[0]["QWEN_REFRESHER_PROFILE"] == "qwen-portal:default"
    assert runs[0]["QWEN_REFRESHER_STORE"] == str(path)
    assert_no_secrets([captured.out, captured.err, out.read_text()], all_tokens(fake))


def test_login_draws_a_qr_code_on_a_terminal(
        env: OpenClawHome, quick: FakeQwen, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    for no_qr in (False, True):
        screen = Tty()
        monkeypatch.setattr(sys, "stdout", screen)
        quick.configure(auto_approve_after=1)
        rc = login.run(args(token_url=quick.token_url, device_code_url=quick.device_code_url,
                            no_qr=no_qr))
        assert rc == 0
        drawn = any(ch in screen.getvalue() for ch in "█▀▄")
        assert drawn is not no_qr
        if drawn:
            # A QR block: many lines of equal width below the URL.
            qr_lines = [ln for ln in screen.getvalue().splitlines() if "▀" in ln or "▄" in ln]
            assert len(qr_lines) >= 10


def test_login_creates_the_main_agents_store_by_default(
        env: OpenClawHome, quick: FakeQwen) -> None:
    quick.configure(auto_approve_after=0)
    path = env.store_path("main")
    assert not path.exists()
    assert login.run(args(token_url=quick.token_url, device_code_url=quick.device_code_url)) == 0
    profile = json.loads(path.read_bytes())["profiles"]["qwen-portal:default"]
    assert profile["type"] == "oauth" and profile["provider"] == "qwen-portal"
    assert profile["refresh"] == quick.issued[-1].refresh_token
    assert profile["access"] == quick.issued[-1].access_token
    assert profile["expires"] >= time.time() * 1000 + 3500_000
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_login_without_openclaw_creates_nothing_and_says_what_to_run(
        env: OpenClawHome, quick: FakeQwen, capsys: pytest.CaptureFixture[str]) -> None:
    """No OpenClaw state dir, no --store: a new store nobody reads would be a silent mistake."""
    env.state.rmdir()
    quick.configure(auto_approve_after=0)
    with pytest.raises(errors.LoginTargetMissing) as caught:
        login.run(args(token_url=quick.token_url, device_code_url=quick.device_code_url))
    assert caught.value.exit_code == 64
    assert not env.state.exists()
    assert quick.requests == []  # no device code was asked for
    assert "does not exist" in capsys.readouterr().err
    assert "qwen-refresher login --store" in str(caught.value)
    # Naming the store is the way through.
    target = env.store_path("main")
    assert login.run(args(token_url=quick.token_url, device_code_url=quick.device_code_url,
                          store=str(target))) == 0
    assert target.exists()


def test_login_names_the_url_it_cannot_reach(env: OpenClawHome) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/api/v1/oauth2/device/code"
    with pytest.raises(errors.TransientOAuthError) as caught:
        login.run(args(token_url=f"http://127.0.0.1:{port}/t", device_code_url=url))
    assert url in str(caught.value)


def test_waiting_shows_a_countdown_on_a_terminal_and_plain_lines_elsewhere() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Tty()
    with login._Countdown(time.monotonic() + 125, screen) as countdown:
        countdown.sleep(1.2)
    text = screen.getvalue()
    assert "waiting for approval, 2m0" in text and "left" in text and "\r" in text
    plain = io.StringIO()
    with login._Countdown(time.monotonic() + 125, plain) as countdown:
        countdown.last_plain -= 61
        countdown.sleep(0.1)
    assert plain.getvalue().startswith("still waiting for approval, 2m0")
    assert "\r" not in plain.getvalue()


def test_login_also_writes_linked_stores(env: OpenClawHome, quick: FakeQwen) -> None:
    main, _, shared = seed(env, quick, agent="main")
    work = env.write_store({"version": 1, "profiles": {
        "qwen-portal:default": qwen_profile(shared.access, shared.refresh, shared.expires_ms)}},
        agent="work")
    alone, _, lone = seed(env, quick, agent="alone")
    quick.configure(auto_approve_after=0)
    assert login.run(args(token_url=quick.token_url, device_code_url=quick.device_code_url)) == 0
    new = quick.issued[-1].refresh_token
    for path in (main, work):
        assert json.loads(path.read_bytes())["profiles"]["qwen-portal:default"]["refresh"] == new
    assert json.loads(alone.read_bytes())["profiles"]["qwen-portal:default"]["refresh"] == \
        lone.refresh


def test_login_qwen_code_store(env: OpenClawHome, quick: FakeQwen, tmp_path: Path) -> None:
    path = tmp_path / "q" / "oauth_creds.json"
    quick.configure(auto_approve_after=0)
    assert login.run(args(store=str(path), token_url=quick.token_url,
                          device_code_url=quick.device_code_url)) == 0
    assert json.loads(path.read_bytes())["refresh_token"] == quick.issued[-1].refresh_token


@pytest.mark.parametrize("how", ["expiry", "denial"])
def test_login_fails_clearly_and_writes_nothing(
        env: OpenClawHome, quick: FakeQwen, how: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = seed(env, quick)
    before = path.read_bytes()
    if how == "expiry":
        quick.configure(device_code_lifetime=0.4)
    else:
        _approve_when_pending(quick, deny=True, after_polls=1)
    started = time.monotonic()
    with pytest.raises(DeviceFlowError) as info:
        login.run(args(token_url=quick.token_url, device_code_url=quick.device_code_url))
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert ("expired" if how == "expiry" else "denied") in message
    assert "nothing was written" in message and "qwen-refresher login --store" in message
    assert info.value.exit_code == 2
    assert path.read_bytes() == before
    polls = outcomes(quick)
    assert "pending" in polls and "ok" not in polls
    if how == "denial":
        assert polls[-1] == "denied"
    captured = capsys.readouterr()
    assert_no_secrets([captured.out, captured.err, message], all_tokens(quick))


def test_login_refuses_to_overwrite_another_providers_profile(
        env: OpenClawHome, quick: FakeQwen) -> None:
    path, _, _ = seed(env, quick)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="refusing"):
        login.run(args(profile="anthropic:default", token_url=quick.token_url,
                       device_code_url=quick.device_code_url))
    assert outcomes(quick, "device_code") == [], "refused before asking for a code"
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- the CLI


def _cli(env: OpenClawHome, fake: FakeQwen, *extra: str,
         environ: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qwen_refresher", "login", "--token-url", fake.token_url,
         "--device-code-url", fake.device_code_url, *extra],
        cwd=ROOT, env=environ or env.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _first_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    box: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            box.append(line)

    threading.Thread(target=read, daemon=True).start()
    wait_for(lambda: any("user_code=" in line for line in box), 15, "the URL on stdout")
    return next(line for line in box if "user_code=" in line).strip()


@pytest.fixture
def cli_fake(quick: FakeQwen) -> Iterator[FakeQwen]:
    quick.configure(device_interval=0.1)
    yield quick


def test_cli_without_tty_prints_the_url_waits_and_writes(
        env: OpenClawHome, cli_fake: FakeQwen) -> None:
    path, _, _ = seed(env, cli_fake)
    proc = _cli(env, cli_fake, "--store", str(path))
    url = _first_url(proc)
    user_code = re.search(r"user_code=([A-Z-]+)", url)
    assert user_code is not None
    time.sleep(0.3)
    assert proc.poll() is None, "it waits for the approval"
    cli_fake.approve(user_code.group(1))
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert json.loads(path.read_bytes())["profiles"]["qwen-portal:default"]["refresh"] == \
        cli_fake.issued[-1].refresh_token
    assert_no_secrets([url, err], all_tokens(cli_fake))


@pytest.mark.parametrize("how", ["deny", "expire"])
def test_cli_exits_2_when_denied_or_expired(env: OpenClawHome, cli_fake: FakeQwen,
                                            how: str) -> None:
    if how == "expire":
        cli_fake.configure(device_code_lifetime=0.5)
    proc = _cli(env, cli_fake)
    url = _first_url(proc)
    if how == "deny":
        code = re.search(r"user_code=([A-Z-]+)", url)
        assert code is not None
        cli_fake.deny(code.group(1))
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 2
    assert ("denied" if how == "deny" else "expired") in err
    assert not env.store_path().exists()


def test_cli_ctrl_c_cancels_with_130(env: OpenClawHome, cli_fake: FakeQwen) -> None:
    proc = _cli(env, cli_fake)
    _first_url(proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130
    assert "login cancelled" in err
    assert "Traceback" not in err
    assert not env.store_path().exists()


# --------------------------------------------------------------------------- AssistedLogin


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_assisted_login_writes_runs_on_rotate_and_reports(
        env: OpenClawHome, quick: FakeQwen, tmp_path: Path) -> None:
    path, _, old = seed(env, quick)
    hook, out = hook_script(tmp_path)
    written: list[list[ProfileKey]] = []
    ended: list[BaseException | None] = []
    codes: list[Any] = []
    log = Log()
    assisted = AssistedLogin(settings_for(quick, on_rotate=hook), log=log,
                             on_written=written.append)
    assert assisted.start([(OpenClawStore(path), "qwen-portal:default")], "fam1", codes.append,
                          on_end=ended.append)
    wait_for(lambda: bool(codes), 5, "the code")
    assert assisted.running("fam1")
    assert not assisted.start([(OpenClawStore(path), "qwen-portal:default")], "fam1",
                              codes.append), "one flow per family"
    quick.approve(codes[0].user_code)
    wait_for(lambda: bool(ended), 10, "the end of the flow")
    assisted.close()
    assert ended == [None]
    assert written == [[ProfileKey(path, "qwen-portal:default")]]
    new = quick.issued[-1]
    assert json.loads(path.read_bytes())["profiles"]["qwen-portal:default"]["refresh"] == \
        new.refresh_token != old.refresh
    runs = hook_runs(out)
    assert [r["QWEN_REFRESHER_EVENT"] for r in runs] == ["login"]
    assert "assisted_login_written" in log.events()
    assert_no_secrets([log.text(), out.read_text()], all_tokens(quick))


def test_assisted_login_does_not_loop_on_an_expired_code(
        env: OpenClawHome, quick: FakeQwen) -> None:
    quick.configure(device_code_lifetime=0.3)
    clock = Clock()
    ended: list[BaseException | None] = []
    assisted = AssistedLogin(settings_for(quick, remind_interval=100), log=Log(), clock=clock)
    target = [(OpenClawStore(env.store_path()), "qwen-portal:default")]
    assert assisted.start(target, "fam", lambda auth: None, on_end=ended.append)
    wait_for(lambda: bool(ended), 5, "the code to expire")
    assert isinstance(ended[0], DeviceFlowError) and "expired" in str(ended[0])
    clock.now += 50
    assert not assisted.start(target, "fam", lambda auth: None), "no new code before remind"
    assert assisted.start(target, "other-family", lambda auth: None), "families are separate"
    clock.now += 50
    assert assisted.start(target, "fam", lambda auth: None, on_end=ended.append)
    assisted.close()
    assert len(outcomes(quick, "device_code")) == 3
    assert not env.store_path().exists()


def test_assisted_login_cancel_and_close_stop_polling(env: OpenClawHome, quick: FakeQwen) -> None:
    ended: list[BaseException | None] = []
    assisted = AssistedLogin(settings_for(quick), log=Log())
    target = [(OpenClawStore(env.store_path()), "qwen-portal:default")]
    assert assisted.start(target, "fam", lambda auth: None, on_end=ended.append)
    wait_for(lambda: "pending" in outcomes(quick), 5, "polling")
    assisted.cancel("fam")
    wait_for(lambda: bool(ended), 5, "the cancellation")
    assert "cancelled" in str(ended[0])
    polls = len(outcomes(quick))
    time.sleep(0.3)
    assert len(outcomes(quick)) == polls, "no polling after cancel"
    assisted.close()
    assert not assisted.start(target, "new", lambda auth: None), "closed"
