"""``qwen-refresher status`` against real files: stores, a published state, the daemon's flock.

A "running daemon" is simulated by holding ``<state_dir>/daemon.lock`` in this test process
(``state.DaemonLock``), exactly as the daemon holds it, and publishing ``state.json`` with
``state.write_state``. The CLI itself runs as a subprocess (``python -m qwen_refresher status``),
and every byte it prints is checked for the tokens the test wrote into the stores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from qwen_refresher import published, status
from qwen_refresher import state as state_mod
from qwen_refresher.commands import status as command
from qwen_refresher.state import DaemonLock, ProfileStatus, PublishedState, write_state
from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import (
    ROOT,
    DaemonProcess,
    OpenClawHome,
    assert_no_secrets,
    qwen_profile,
    wait_for,
)

HOUR = 3600.0
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
HEAVY_PACKAGES = ("pydantic", "pydantic_settings", "structlog", "httpx", "apscheduler",
                  "watchdog", "prometheus_client", "tenacity")
HEAVY_MODULES = ("qwen_refresher.config", "qwen_refresher.daemon", "qwen_refresher.engine")


def imports_after(argv: list[str], also: tuple[str, ...] = ()) -> str:
    """Python code that runs the CLI, then prints (to stderr) the heavy modules it loaded."""
    return ("import sys\nfrom qwen_refresher.cli import main\nrc = main(" + repr(argv) + ")\n"
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_PACKAGES!r} "
            f"or m in {HEAVY_MODULES + also!r})\n"
            "print(rc, heavy, file=sys.stderr)\n")


class Env:
    """One throw-away installation: OpenClaw home, Qwen Code dir, our state dir, secrets."""

    def __init__(self, root: Path) -> None:
        self.oc = OpenClawHome(root)
        self.state_dir = self.oc.our_state
        self.secrets: list[str] = []
        self.lock: DaemonLock | None = None
        self._n = 0

    # -- files ----------------------------------------------------------------------------
    def tokens(self) -> tuple[str, str]:
        self._n += 1
        access = f"ACCESS-{self._n}-{os.urandom(8).hex()}"
        refresh = f"REFRESH-{self._n}-{os.urandom(8).hex()}"
        self.secrets += [access, refresh]
        return access, refresh

    def openclaw(self, expires_in: float, agent: str = "main",
                 profile: str = "qwen-portal:default") -> Path:
        access, refresh = self.tokens()
        exp = int((time.time() + expires_in) * 1000)
        doc = {"version": 1, "profiles": {
            profile: qwen_profile(access, refresh, exp),
            "anthropic:default": {"type": "api_key", "provider": "anthropic", "key": "sk-x"},
        }}
        self.secrets.append("sk-x")
        return self.oc.write_store(doc, agent=agent)

    def qwen_code(self, expires_in: float) -> Path:
        access, refresh = self.tokens()
        path = self.oc.home / ".qwen" / "oauth_creds.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"access_token": access, "refresh_token": refresh,
                                    "token_type": "Bearer",
                                    "expiry_date": int((time.time() + expires_in) * 1000)}))
        return path

    def expires_at(self, path: Path, profile: str = "qwen-portal:default") -> float:
        return float(self.oc.read_store(path=path)["profiles"][profile]["expires"]) / 1000

    # -- the daemon's side ----------------------------------------------------------------
    def hold_lock(self) -> None:
        self.lock = DaemonLock(self.state_dir)
        self.lock.acquire()

    def publish(self, profiles: list[ProfileStatus], *, pid: int | None = None,
                stores: list[dict[str, Any]] | None = None) -> None:
        now = time.time()
        doc: PublishedState = {
            "schema_version": 1,
            "daemon": {"pid": os.getpid() if pid is None else pid, "version": "9.9.9",
                       "started_at": now - 2 * HOUR, "updated_at": now,
                       "next_sweep_at": now + 300},
            "profiles": profiles,
            "stores": stores if stores is not None else  # type: ignore[typeddict-item]
            [{"path": p["store"], "kind": p["store_kind"], "error": None} for p in profiles],
            "consumed": [],
        }
        time.sleep(0.002)  # published strictly after the stores were written
        write_state(self.state_dir, doc)

    def row(self, store: Path, state: str = "ok", *, expires_at: float | None = None,
            profile: str = "qwen-portal:default", **extra: Any) -> ProfileStatus:
        row: dict[str, Any] = {
            "store": str(store), "store_kind": "openclaw", "agent": "main", "profile": profile,
            "family": None, "state": state,
            "expires_at": self.expires_at(store, profile) if expires_at is None else expires_at,
            "next_refresh_at": time.time() + 5 * HOUR, "last_refresh_at": time.time() - 600,
            "attempts": 0, "last_error": None,
            "login_command": "openclaw models auth login --provider qwen-portal",
        }
        row.update(extra)
        return row  # type: ignore[return-value]

    # -- running status -------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = self.oc.env(**extra)
        env.pop("QWEN_REFRESHER_LOG_FORMAT", None)
        return env

    def run(self, *args: str, env: dict[str, str] | None = None, stdout: Any = subprocess.PIPE,
            cli: bool = False) -> subprocess.CompletedProcess[str]:
        """``status`` with ``args``: the real CLI in a subprocess when ``cli``, else in-process
        through ``status.main`` (same code, no interpreter start: keeps the suite fast)."""
        if cli:
            proc = subprocess.run([sys.executable, "-m", "qwen_refresher", "status", *args],
                                  cwd=ROOT, env=env or self.env(), stdout=stdout,
                                  stderr=subprocess.PIPE, text=True, timeout=30)
        else:
            out, err = io.StringIO(), io.StringIO()
            with mock.patch.dict(os.environ, env or self.env(), clear=True), \
                    contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = status.main(list(args))
            proc = subprocess.CompletedProcess(["status", *args], code, out.getvalue(),
                                               err.getvalue())
        assert_no_secrets([proc.stdout or "", proc.stderr], self.secrets)
        return proc

    def json(self, *args: str, **kw: Any) -> tuple[int, dict[str, Any]]:
        proc = self.run("--json", *args, **kw)
        assert proc.stderr == ""
        return proc.returncode, json.loads(proc.stdout)  # the whole stdout is one document


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    if e.lock is not None:
        e.lock.release()


def states(doc: dict[str, Any]) -> dict[str, str]:
    return {p["profile"]: p["state"] for p in doc["profiles"]}


# -- daemon not running ---------------------------------------------------------------------


def test_not_running_reads_the_stores_itself(env: Env) -> None:
    env.openclaw(6 * HOUR)
    env.openclaw(5 * 60, agent="work")  # inside the 15 min margin
    env.qwen_code(6 * HOUR)
    code, doc = env.json(cli=True)
    assert code == 3
    assert doc["daemon"]["running"] is False and doc["source"] == "stores"
    by_store = {(Path(p["store"]).parts[-3], p["profile"]): p["state"] for p in doc["profiles"]}
    assert by_store == {("main", "qwen-portal:default"): "ok",
                        ("work", "qwen-portal:default"): "due",
                        ("home", "qwen-code"): "ok"}
    text = env.run(cli=True)
    assert text.returncode == 3
    assert "daemon: not running" in text.stdout
    assert "~/.openclaw/agents/work/agent/auth-profiles.json" in text.stdout


def test_empty_state_dir_and_no_store(env: Env) -> None:
    code, doc = env.json(cli=True)
    assert code == 3  # not running outranks "no profile found"
    assert doc["profiles"] == [] and doc["summary"] == "no qwen-portal profile found"
    assert not env.state_dir.exists(), "status must not create the state dir"
    assert "no qwen-portal profile found" in env.run().stdout


def test_expired_token_outranks_a_stopped_daemon(env: Env) -> None:
    env.openclaw(-60)
    code, doc = env.json()
    assert code == 2
    assert states(doc) == {"qwen-portal:default": "expired"}
    assert doc["profiles"][0]["expires_in_seconds"] < 0


def test_malformed_store_is_reported_not_fatal(env: Env) -> None:
    good = env.openclaw(6 * HOUR)
    broken = env.oc.write_store(b'{"version": 1, "profiles": {', agent="broken")
    code, doc = env.json()
    assert code == 3
    rows = {p["store"]: p for p in doc["profiles"]}
    assert rows[str(good)]["state"] == "ok"
    assert rows[str(broken)]["state"] == "invalid_store"
    assert rows[str(broken)]["profile"] is None  # the whole file, no profile known
    assert "not valid JSON" in rows[str(broken)]["last_error"]
    assert {s["store"]: bool(s["error"]) for s in doc["stores"]} == {str(good): False,
                                                                     str(broken): True}
    env.hold_lock()  # a daemon that has not published yet: the broken store is a degradation
    code, _ = env.json()
    assert code == 1


def test_profile_with_a_problem_is_invalid_store(env: Env) -> None:
    access, _ = env.tokens()
    env.oc.write_store({"version": 1, "profiles": {"qwen-portal:default": {
        "type": "oauth", "provider": "qwen-portal", "access": access, "expires": 1}}})
    code, doc = env.json()
    assert code == 3 and states(doc) == {"qwen-portal:default": "invalid_store"}
    assert "refresh is missing" in doc["profiles"][0]["last_error"]


def test_needs_login_survives_the_daemon_stopping_until_a_new_login(env: Env) -> None:
    store = env.openclaw(-60)  # the daemon was refused; the store still holds that token
    env.publish([env.row(store, "needs_login", last_error="refresh token rejected (HTTP 400)")],
                pid=999_999)
    code, doc = env.json()
    assert code == 2 and states(doc) == {"qwen-portal:default": "needs_login"}
    assert doc["profiles"][0]["last_error"] == "refresh token rejected (HTTP 400)"
    assert doc["profiles"][0]["login_command"].startswith("openclaw models auth login")
    text = env.run().stdout
    assert "needs a new login: run `qwen-refresher login --store " in text
    assert "(or `openclaw models auth login" in text
    env.openclaw(6 * HOUR)  # someone logged in again: new tokens, new expiry
    code, doc = env.json()
    assert code == 3 and states(doc) == {"qwen-portal:default": "ok"}


def test_store_known_only_to_the_last_daemon_is_still_checked(env: Env) -> None:
    elsewhere = env.oc.write_store({"version": 1, "profiles": {"qwen-portal:x": qwen_profile(
        *env.tokens(), int((time.time() + HOUR) * 1000))}}, path=env.oc.root / "custom.json")
    env.publish([env.row(elsewhere, profile="qwen-portal:x")], pid=999_999)
    code, doc = env.json()
    assert code == 3
    assert [(p["store"], p["state"]) for p in doc["profiles"]] == [(str(elsewhere), "ok")]


# -- daemon running -------------------------------------------------------------------------


def test_running_and_all_good(env: Env) -> None:
    main = env.openclaw(6 * HOUR)
    qwen = env.qwen_code(6 * HOUR)
    env.hold_lock()
    env.publish([env.row(main, family="fam-1"),
                 {**env.row(main, family="fam-1"), "store": str(qwen), "store_kind": "qwen-code",
                  "agent": None, "profile": "qwen-code",
                  "expires_at": time.time() + 6 * HOUR}])
    code, doc = env.json()
    assert code == 0
    assert doc["source"] == "daemon"
    assert doc["daemon"]["running"] is True and doc["daemon"]["pid"] == os.getpid()
    assert doc["daemon"]["version"] == "9.9.9"
    assert 2 * HOUR - 60 < doc["daemon"]["uptime_seconds"] < 2 * HOUR + 60
    assert doc["summary"].startswith("2 profiles ok, next refresh in 4h5")
    assert doc["families"] == [{"id": "fam-1", "members": [
        {"store": str(main), "profile": "qwen-portal:default"},
        {"store": str(qwen), "profile": "qwen-code"}]}]
    quiet = env.run("--quiet", cli=True)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    text = env.run(cli=True).stdout
    assert f"daemon: running, pid {os.getpid()}, up 2h0" in text
    assert "share one refresh token" in text


def test_json_schema(env: Env) -> None:
    store = env.openclaw(6 * HOUR)
    env.hold_lock()
    env.publish([env.row(store, "retrying", attempts=3, last_error="HTTP 503 from token url")])
    code, doc = env.json(cli=True)
    assert code == 1
    assert doc["schema_version"] == 1
    assert set(doc) >= {"schema_version", "generated_at", "exit_code", "summary", "daemon",
                        "profiles", "stores", "families"}
    assert doc["exit_code"] == code
    (p,) = doc["profiles"]
    for key in ("store", "profile", "state", "expires_at", "next_refresh_at", "last_refresh_at",
                "last_error", "expires_in_seconds", "next_refresh_in_seconds", "attempts"):
        assert key in p
    for ts in (doc["generated_at"], p["expires_at"], p["next_refresh_at"], p["last_refresh_at"],
               doc["daemon"]["started_at"], doc["daemon"]["updated_at"]):
        assert ISO_Z.match(ts), ts
    assert isinstance(p["expires_in_seconds"], float)
    assert 6 * HOUR - 60 < p["expires_in_seconds"] <= 6 * HOUR
    assert (p["state"], p["attempts"], p["last_error"]) == ("retrying", 3,
                                                            "HTTP 503 from token url")
    assert p["login_command"] is None  # only shown when a login is what helps


@pytest.mark.parametrize(("state", "expected"), [
    ("ok", 0), ("due", 0), ("refreshing", 0), ("retrying", 1), ("invalid_store", 1),
    ("needs_login", 2), ("expired", 2),
])
def test_exit_code_for_each_published_state(env: Env, state: str, expected: int) -> None:
    store = env.openclaw(6 * HOUR if state != "expired" else -60)
    env.hold_lock()
    env.publish([env.row(store, state)])
    assert env.run("--quiet", cli=True).returncode == expected


def test_running_with_a_broken_store_shows_it(env: Env) -> None:
    good = env.openclaw(6 * HOUR)
    broken = str(env.oc.store_path("broken"))
    env.hold_lock()
    env.publish([env.row(good)], stores=[
        {"path": str(good), "kind": "openclaw", "error": None},
        {"path": broken, "kind": "openclaw", "error": "is not valid JSON: Expecting value"}])
    code, doc = env.json()
    assert code == 1
    assert [(p["store"], p["profile"], p["state"]) for p in doc["profiles"]] == [
        (str(good), "qwen-portal:default", "ok"), (broken, None, "invalid_store")]
    text = env.run().stdout
    assert "(whole file)" in text and "is not valid JSON" in text


def test_running_with_no_profile_is_degraded(env: Env) -> None:
    env.hold_lock()
    env.publish([])
    code, doc = env.json()
    assert code == 1 and doc["summary"] == "no qwen-portal profile found"


def test_most_severe_wins(env: Env) -> None:
    a = env.openclaw(6 * HOUR)
    b = env.openclaw(6 * HOUR, agent="work")
    env.hold_lock()
    env.publish([env.row(a, "retrying"), env.row(b, "needs_login")])
    assert env.run("--quiet").returncode == 2


def test_rotation_since_the_last_publish_shows_the_new_expiry(env: Env) -> None:
    store = env.openclaw(10 * 60)
    env.hold_lock()
    env.publish([env.row(store, "due", next_refresh_at=time.time())])
    time.sleep(0.01)
    env.openclaw(6 * HOUR)  # OpenClaw or Qwen Code rotated it after our publish
    code, doc = env.json()
    (p,) = doc["profiles"]
    assert p["state"] == "ok" and p["expires_in_seconds"] > 5 * HOUR
    assert code == 0


def test_published_ok_that_has_since_expired_is_expired(env: Env) -> None:
    """The daemon's last word was "ok", but the token ran out since (a stuck daemon): status
    must not repeat "ok" about an expired token, as openclaw models status does."""
    store = env.openclaw(-30)
    env.hold_lock()
    env.publish([env.row(store, "ok")])
    code, doc = env.json()
    assert code == 2 and states(doc) == {"qwen-portal:default": "expired"}


def test_state_of_an_older_daemon_is_not_trusted(env: Env) -> None:
    store = env.openclaw(6 * HOUR)
    env.hold_lock()
    env.publish([env.row(store, "needs_login", expires_at=0.0)], pid=os.getpid() + 12345)
    code, doc = env.json()
    assert doc["source"] == "stores" and states(doc) == {"qwen-portal:default": "ok"}
    assert code == 0


def test_garbage_state_file_does_not_crash_status(env: Env) -> None:
    env.openclaw(6 * HOUR)
    env.hold_lock()
    (env.state_dir / "state.json").write_text('{"schema_version": 1, "daemon": {"pid": '
                                              f'{os.getpid()}}}, "profiles": [1, {{"x": 2}}]}}')
    code, doc = env.json()
    assert doc["source"] == "daemon" and doc["profiles"] == []
    assert code == 1


def test_fast_path_imports_nothing_heavy(env: Env) -> None:
    """Health checks run status every few seconds: no pydantic & co., and with a daemon that
    has published since the stores changed, not even the store adapters, typing, argparse
    (``cli._fast_status``) or pathlib (with urllib.parse and ipaddress, half a bare start)."""
    store = env.openclaw(6 * HOUR)
    env.hold_lock()
    env.publish([env.row(store)])
    code = imports_after(["status", "--quiet"],
                         also=("qwen_refresher.stores", "typing", "dataclasses", "pathlib",
                               "argparse", "qwen_refresher.errors", "qwen_refresher.paths"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env.env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.stderr.strip() == "0 []", proc.stderr


def test_slow_path_imports_nothing_heavy_either(env: Env) -> None:
    env.openclaw(6 * HOUR)
    proc = subprocess.run([sys.executable, "-c", imports_after(["status", "--json"])],
                          cwd=ROOT, env=env.env(), capture_output=True, text=True, timeout=30)
    assert proc.stderr.strip() == "3 []", proc.stderr
    assert json.loads(proc.stdout)["profiles"][0]["state"] == "ok"
    assert_no_secrets([proc.stdout], env.secrets)


# -- settings ---------------------------------------------------------------------------------


def test_settings_from_env_file_and_flags(env: Env) -> None:
    custom = env.oc.write_store({"version": 1, "profiles": {"qwen-portal:c": qwen_profile(
        *env.tokens(), int((time.time() + HOUR) * 1000))}}, path=env.oc.root / "c.json")
    env.openclaw(6 * HOUR)
    config = env.oc.root / "config.toml"
    config.write_text(f'stores = ["{custom}"]\ndiscover = false\nmargin = "2h"\n'
                      'listen = "127.0.0.1:1"\n')  # keys status does not need are ignored
    code, doc = env.json("--config", str(config))
    assert code == 3
    assert [(p["profile"], p["state"]) for p in doc["profiles"]] == [("qwen-portal:c", "due")]
    # env beats the file
    _, doc = env.json(env=env.env(QWEN_REFRESHER_CONFIG=str(config),
                                  QWEN_REFRESHER_DISCOVER="true", QWEN_REFRESHER_MARGIN="1m"))
    assert sorted(states(doc).items()) == [("qwen-portal:c", "ok"), ("qwen-portal:default", "ok")]
    # flags beat env
    _, doc = env.json("--store", str(custom), env=env.env(
        QWEN_REFRESHER_STORES=json.dumps(["/nonexistent.json"]), QWEN_REFRESHER_DISCOVER="0"))
    assert [p["profile"] for p in doc["profiles"]] == ["qwen-portal:c"]
    _, doc = env.json(env=env.env(QWEN_REFRESHER_STORES=json.dumps([str(custom)]),
                                  QWEN_REFRESHER_DISCOVER="no"))
    assert [p["profile"] for p in doc["profiles"]] == ["qwen-portal:c"]


def test_qwen_code_can_be_left_out(env: Env) -> None:
    env.qwen_code(6 * HOUR)
    _, doc = env.json(env=env.env(QWEN_REFRESHER_QWEN_CODE="false"))
    assert doc["profiles"] == []


@pytest.mark.parametrize("bad", [{"QWEN_REFRESHER_STORES": "/not/json"},
                                 {"QWEN_REFRESHER_MARGIN": "soon"},
                                 {"QWEN_REFRESHER_DISCOVER": "maybe"},
                                 {"QWEN_REFRESHER_CONFIG": "/nonexistent/config.toml"}])
def test_bad_setting_exits_78(env: Env, bad: dict[str, str]) -> None:
    proc = env.run(env=env.env(**bad), cli=True)
    assert proc.returncode == 78
    assert "invalid setting" in proc.stderr and proc.stdout == ""
    assert env.run("--quiet", env=env.env(**bad)).stderr == ""


def test_state_dir_flag(env: Env, tmp_path: Path) -> None:
    store = env.openclaw(6 * HOUR)
    other = tmp_path / "other-state"
    env.state_dir = other
    env.hold_lock()
    env.publish([env.row(store, "refreshing")])
    _, doc = env.json("--state-dir", str(other))
    assert doc["daemon"]["running"] and states(doc) == {"qwen-portal:default": "refreshing"}


# -- output -----------------------------------------------------------------------------------


def test_colour_only_on_a_tty(env: Env) -> None:
    store = env.openclaw(6 * HOUR)
    env.hold_lock()
    env.publish([env.row(store, "needs_login")])
    assert "\033[" not in env.run().stdout
    tty_env = {k: v for k, v in env.env(TERM="xterm").items() if k != "NO_COLOR"}
    primary, secondary = pty.openpty()
    try:
        for args, coloured in (((), True), (("--no-color",), False)):
            proc = env.run(*args, stdout=secondary, env=tty_env, cli=True)
            assert proc.returncode == 2
            out = os.read(primary, 65536).decode()
            assert ("\033[31;1mneeds_login" in out) is coloured
            assert_no_secrets([out], env.secrets)
    finally:
        os.close(primary)
        os.close(secondary)


def test_text_rows_are_aligned_and_short(env: Env) -> None:
    a = env.openclaw(6 * HOUR)
    b = env.openclaw(6 * HOUR, agent="a-much-longer-agent-name")
    env.hold_lock()
    env.publish([env.row(a), env.row(b, "retrying", agent="a-much-longer-agent-name",
                                     last_error="x" * 500 + "\nsecond line")])
    lines = env.run().stdout.splitlines()
    header, row1, row2 = lines[:3]
    col = header.index("STATE")
    assert row1[col:].startswith("ok ") and row2[col:].startswith("retrying ")
    assert max(len(line) for line in lines[:3]) < 300  # the 500-char error is cut
    assert "second line" not in lines[2]


def test_no_secret_in_any_output(env: Env) -> None:
    """Every run above already asserts this; here every state and format at once."""
    stores = [env.openclaw(6 * HOUR, agent=f"a{i}") for i in range(3)]
    env.qwen_code(-5)
    env.hold_lock()
    env.publish([env.row(s, st) for s, st in zip(stores, ("ok", "needs_login", "retrying"),
                                                 strict=True)])
    outputs = [env.run(*args, cli=True)
               for args in ((), ("--json",), ("--quiet",), ("--no-color",))]
    assert_no_secrets([p.stdout + p.stderr for p in outputs], env.secrets)
    env.lock.release()  # type: ignore[union-attr]
    env.lock = None
    outputs = [env.run(*args) for args in ((), ("--json",))]
    assert_no_secrets([p.stdout + p.stderr for p in outputs], env.secrets)
    assert all(secret not in (env.state_dir / "state.json").read_text() for secret in env.secrets)


# -- in-process: parser, run(), summary, contract with state.py ------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    status.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["status", *argv])


def test_add_parser_and_run_in_process(env: Env, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in env.env().items():
        monkeypatch.setenv(key, value)
    env.openclaw(6 * HOUR)
    args = parse("--json", "--state-dir", str(env.state_dir))
    assert args.handler is status.run
    assert status.run(args) == 3
    out = capsys.readouterr().out
    assert json.loads(out)["profiles"][0]["state"] == "ok"
    assert_no_secrets([out], env.secrets)
    with pytest.raises(SystemExit):
        parse("--json", "--quiet")  # one output mode at a time


def p(state: str, profile: str = "qwen-portal:default", next_in: float | None = None,
      now: float = 1_000_000.0) -> ProfileStatus:
    return {"store": "/h/.openclaw/agents/main/agent/auth-profiles.json",
            "store_kind": "openclaw", "agent": "main", "profile": profile, "family": None,
            "state": state, "expires_at": now + HOUR,  # type: ignore[typeddict-item]
            "next_refresh_at": None if next_in is None else now + next_in,
            "last_refresh_at": None, "attempts": 0, "last_error": None, "login_command": None}


def test_summary_line() -> None:
    now = 1_000_000.0
    assert status.summary_line([], now) == "no qwen-portal profile found"
    two_ok = [p("ok", next_in=5 * HOUR + 41 * 60), p("ok", "qwen-portal:b", 6 * HOUR)]
    assert status.summary_line(two_ok, now) == "2 profiles ok, next refresh in 5h41m"
    assert status.summary_line([p("needs_login")], now) == "qwen-portal:default needs login"
    assert status.summary_line([p("needs_login"), p("ok", "b", 60)], now) == \
        "qwen-portal:default needs login, 1 ok, next refresh in 1m00s"
    assert status.summary_line([p("retrying", next_in=-1), p("ok", "b")], now) == \
        "2 profiles: 1 retrying, 1 ok, next refresh now"
    assert status.summary_line([p("expired"), p("needs_login", "b"), p("needs_login", "c")],
                               now) == "b and c need login, qwen-portal:default expired"
    other_agent = p("needs_login")
    other_agent["agent"] = "work"
    assert status.summary_line([p("ok"), other_agent], now) == \
        "qwen-portal:default (work) needs login, 1 ok"  # same id in two agents: say which


def test_exit_code_rules() -> None:
    assert status.exit_code([p("ok")], True) == 0
    assert status.exit_code([p("ok")], False) == 3
    assert status.exit_code([], True) == 1
    assert status.exit_code([], False) == 3
    assert status.exit_code([p("retrying")], False) == 3
    assert status.exit_code([p("expired")], False) == 2
    assert status.exit_code([p("ok")], True, [{"path": "/x", "kind": "openclaw",
                                               "error": "is empty"}]) == 1


def test_derive_state_margin() -> None:
    assert status.derive_state(1000.0, 1000.0, 900) == "expired"
    assert status.derive_state(1900.0, 1000.0, 900) == "due"
    assert status.derive_state(1901.0, 1000.0, 900) == "ok"


def test_one_reader_of_the_lock_and_the_state(env: Env) -> None:
    """status, the daemon's state module and published are one reader now: the names are the
    same objects (no restated copy that could drift), and they read what the daemon writes."""
    assert status.daemon_pid is state_mod.daemon_pid is published.daemon_pid
    assert status.read_published is state_mod.read_published is published.read_published
    assert (status.STATE_FILE, status.DAEMON_LOCK, status.SCHEMA_VERSION) == (
        state_mod.STATE_FILE, state_mod.DAEMON_LOCK, state_mod.SCHEMA_VERSION)
    assert status.daemon_pid(env.state_dir) is None
    assert status.read_published(env.state_dir) == (None, 0.0)
    env.hold_lock()
    assert status.daemon_pid(env.state_dir) == os.getpid()
    env.publish([])
    doc, mtime = status.read_published(env.state_dir)
    assert doc == state_mod.read_state(env.state_dir) and doc is not None
    assert mtime == (env.state_dir / "state.json").stat().st_mtime
    env.lock.release()  # type: ignore[union-attr]
    env.lock = None
    assert status.daemon_pid(env.state_dir) is None


@pytest.mark.parametrize("argv", [
    [], ["--json"], ["--quiet"], ["-q"], ["--no-color"], ["--json", "--no-color"],
    ["--state-dir", "/s"], ["--state-dir=/s"], ["--state-dir="], ["--config", "c.toml", "-q"],
    ["--store", "/a.json", "--store=/b.json"], ["--json", "--json"],
])
def test_the_fast_parser_gives_what_argparse_gives(argv: list[str]) -> None:
    """``cli`` skips argparse for the plain forms health checks use (about a third of the
    run); what it builds must be exactly what ``add_parser``'s parser builds."""
    simple = command.parse_simple(argv)
    assert simple is not None
    assert simple.as_dict() == {k: v for k, v in vars(parse(*argv)).items()}


@pytest.mark.parametrize("argv", [
    ["--help"], ["-h"], ["--js"], ["--json", "--quiet"], ["--state-dir"], ["--state-dir", "-q"],
    ["extra"], ["--store"], ["-qq"], ["--", "x"], ["--verbose"],
])
def test_everything_else_is_left_to_argparse(argv: list[str]) -> None:
    assert command.parse_simple(argv) is None


# -- against the real daemon ------------------------------------------------------------------


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_against_the_real_daemon(env: Env, fake: FakeQwen) -> None:
    """The contract end to end: what the daemon publishes is what status reads; when the daemon
    stops, status notices through the flock and falls back to the stores."""
    access, refresh, _ = fake.issue_tokens(lifetime=6 * HOUR)
    env.secrets += [access, refresh]
    env.oc.write_store({"version": 1, "profiles": {"qwen-portal:default": qwen_profile(
        access, refresh, int((time.time() + 6 * HOUR) * 1000))}})
    with DaemonProcess(env.oc, fake, env=env.oc.env(), margin="900") as daemon:
        wait_for(lambda: "qwen-portal:default" in _text(env.state_dir / "state.json"), 20,
                 "a published state", daemon)
        code, doc = env.json(cli=True)
        assert code == 0, doc
        assert doc["source"] == "daemon" and doc["daemon"]["pid"] == daemon.proc.pid
        (p,) = doc["profiles"]
        assert p["state"] == "ok" and p["next_refresh_in_seconds"] > 5 * HOUR
        assert daemon.stop() == 0
    code, doc = env.json(cli=True)
    assert code == 3 and doc["daemon"]["running"] is False
    assert states(doc) == {"qwen-portal:default": "ok"}
    assert doc["profiles"][0]["family"] is not None  # remembered from the last publish


def test_the_reused_row_encoder_writes_what_json_dumps_writes() -> None:
    """``--json`` encodes rows with one reused C encoder (``_row_encoder``): byte for byte
    what ``json.dumps`` gives, hostile strings, floats and nesting included."""
    dumps_row = command._row_encoder()
    rows: list[object] = [
        {"a": 1.5, "b": None, "c": True, "d": [1, 2.25, "x"], "e": {"nested": "\u202e\x1b]52;"}},
        {"profile": "qwen-portal:\ud800", "n": 10**20, "f": 1e-7, "t": "}, {\n\"quoted\""},
        {}, [], "text", 3,
    ]
    for row in rows:
        assert dumps_row(row) == json.dumps(row)


def test_a_fleet_member_shows_the_fleet_and_exits_1_while_it_is_unavailable(env: Env) -> None:
    """state.json's ``fleet`` part (``fleet.published.fleet_report``): its lines are shown, and
    an unavailable fleet (no host refreshes anything) is a degradation, exit 1."""
    store = env.openclaw(6 * HOUR)
    env.hold_lock()
    env.publish([env.row(store)])
    doc = state_mod.read_state(env.state_dir)
    assert doc is not None
    for available, code in ((True, 0), (False, 1)):
        fleet = {"host": "h1", "members": ["a", "b", "c"], "key": "k", "available": available,
                 "unavailable_since": None if available else time.time() - 60,
                 "problem": None if available else "no quorum"}
        write_state(env.state_dir, {**doc, "fleet": fleet})  # type: ignore[typeddict-unknown-key]
        got, out = env.json()
        assert got == code and out["fleet"]["exit_code"] == code, out
        assert out["fleet"]["lines"][0].startswith("fleet: this host is h1")
        text = env.run().stdout
        assert ("fleet unavailable since" in text) is (not available), text
    write_state(env.state_dir, doc)
    assert env.json()[1]["fleet"] is None


@pytest.mark.parametrize("ts", [0.0, 1.9, 59.999, 86399.5, 86400.0, 951782400.0, 1_700_000_000.25,
                                4_102_444_799.0, 1_764_720_000.75])
def test_iso_is_strftimes_text(ts: float) -> None:
    """``--json`` formats times by arithmetic after one ``strftime`` per day: the same text."""
    assert command.iso(ts) == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def test_json_rows_written_directly_are_json_dumps_text() -> None:
    """``--json`` writes each row with one f-string (``_json_row``); it must be exactly
    ``json.dumps`` of the row's dict, for every kind of value a coerced row can hold."""
    now = 1_700_000_000.123
    hook = {"ok": False, "at": now, "returncode": None, "timed_out": True, "output": "x\u202e\n",
            "failing_since": now - 5, "failures": 3, "next_retry_at": None}
    rows: list[ProfileStatus] = [
        p("ok", next_in=3600.5), p("needs_login"), p("expired", "\ud800\x1b[2J\"q\"\\"),
        {**p("retrying"), "agent": None, "family": "f" * 64, "expires_at": None,  # type: ignore[typeddict-item]
         "last_refresh_at": now - 0.0004, "attempts": 7, "last_error": "é \u0000 boom",
         "login_command": "openclaw models auth login", "hook": hook},
        {**p("invalid_store", ""), "store": "/h/ä/auth-profiles.json"},  # type: ignore[typeddict-item]
    ]
    rows[1]["login_command"] = "openclaw models auth login --provider qwen-portal"
    for row in rows:
        assert command._json_row(row, now) == json.dumps(command._json_profile(row, now))


# --- one home for a status row (issue 14) -------------------------------------------------------

#: (``hook`` is NotRequired, but with postponed annotations the TypedDict cannot tell at run time)
ROW_KEYS = set(ProfileStatus.__annotations__) - {"hook"}


def test_status_rows_are_built_in_one_place_only() -> None:
    """The daemon's publisher, status's own rows and the reader of state.json all build a row
    with ``published.profile_row``: a dict literal spelling out a row anywhere else is a second
    home that drifts (it did: four copies, before). ``commands/status.py`` spells out the
    ``--json`` document, a rendering (ISO times, seconds left), not a row."""
    root = Path(status.__file__).parent
    literal = re.compile(r'"login_command"\s*:')
    builders = sorted(str(path.relative_to(root)) for path in root.rglob("*.py")
                      if literal.search(path.read_text(encoding="utf-8")))
    assert builders == ["commands/status.py", "published.py"]


def test_a_published_row_reads_back_as_the_row_that_was_built() -> None:
    hook = {"ok": False, "at": 5.0, "returncode": 3, "timed_out": False, "output": "x",
            "failing_since": 4.0, "failures": 2, "next_retry_at": 9.0}
    row = published.profile_row("/s/auth-profiles.json", "openclaw", "main", "qwen-portal:a",
                                "retrying", "fam", 10.0, 11.0, 12.0, 2, "http 503", "login")
    row["hook"] = hook  # type: ignore[typeddict-item]
    assert set(row) - {"hook"} == ROW_KEYS
    doc: PublishedState = {"schema_version": 1, "daemon": {}, "profiles": [row],  # type: ignore[typeddict-item]
                           "stores": [published.store_row("/s/auth-profiles.json", "openclaw",
                                                          None)]}
    assert published.published_profiles(json.loads(json.dumps(doc))) == [row]
    assert published.published_stores(doc) == [
        {"path": "/s/auth-profiles.json", "kind": "openclaw", "error": None}]
