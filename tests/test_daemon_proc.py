"""The one daemon runner of tests and benchmarks (``qwen_refresher.testing.daemon_proc``):
its environment is clean, its waits and its stop have deadlines, and its failure messages
never quote a token. Real subprocesses (tiny Python scripts standing in for the daemon where
the point is the runner, the real daemon where the point is the start)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from qwen_refresher.testing.daemon_proc import (
    DaemonProc,
    daemon_env,
    redact,
    run_argv,
)
from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import DaemonProcess, OpenClawHome, seed_qwen_store


def script(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", code]


def test_the_environment_is_scrubbed_and_private(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin", "QWEN_REFRESHER_MARGIN": "1", "OPENCLAW_STATE_DIR": "/real",
            "CLAWDBOT_STATE_DIR": "/real2", "QWEN_HOME": "/q", "XDG_CONFIG_HOME": "/mine",
            "XDG_RUNTIME_DIR": "/run/user/0", "NOTIFY_SOCKET": "/run/systemd/notify",
            "WATCHDOG_USEC": "1"}
    env = daemon_env(root=tmp_path, home=tmp_path / "h", openclaw_state=tmp_path / "oc",
                     our_state=tmp_path / "st", base=base, QWEN_REFRESHER_LISTEN="127.0.0.1:0")
    assert env["PATH"] == "/usr/bin"
    for gone in ("QWEN_REFRESHER_MARGIN", "CLAWDBOT_STATE_DIR", "QWEN_HOME", "XDG_RUNTIME_DIR",
                 "NOTIFY_SOCKET", "WATCHDOG_USEC"):
        assert gone not in env
    assert env["OPENCLAW_STATE_DIR"] == str(tmp_path / "oc")
    assert env["XDG_CONFIG_HOME"] == str(tmp_path / "xdg-config")
    assert env["QWEN_REFRESHER_STATE_DIR"] == str(tmp_path / "st")
    assert env["QWEN_REFRESHER_NOTIFY_DESKTOP"] == "false"
    assert env["QWEN_REFRESHER_LISTEN"] == "127.0.0.1:0"  # extra wins


def test_run_argv_leaves_out_what_is_not_given(fake: FakeQwen) -> None:
    argv = run_argv(fake, "--once", margin=None, jitter="0", prefix=["setpriv", "--x"])
    assert argv[:2] == ["setpriv", "--x"]
    assert argv[2:6] == [sys.executable, "-m", "qwen_refresher", "run"]
    assert "--margin" not in argv and "--listen" not in argv
    assert argv[-3:] == ["--jitter", "0", "--once"]
    assert argv[argv.index("--token-url") + 1] == fake.token_url


def test_redact_names_secrets_by_number_and_length_only() -> None:
    text = "a=SECRETVALUE1 b=fakeref-AbC_d-9 c=fakeacc-xyz"
    out = redact(text, ["SECRETVALUE1", ""])
    assert "SECRETVALUE1" not in out and "AbC_d" not in out and "xyz" not in out
    assert "<secret #0 len 12>" in out
    assert "fakeref-<redacted>" in out and "fakeacc-<redacted>" in out


def test_a_process_that_exits_early_fails_the_wait_at_once_and_redacted(tmp_path: Path) -> None:
    token = "fakeref-" + "S" * 40
    code = (f'import json; print(json.dumps({{"event": "boom", "token": "{token}"}}));'
            'print("Traceback (most recent call last):"); raise SystemExit(3)')
    proc = DaemonProc(script(code), env={"PATH": "/usr/bin"}, secrets=lambda: [token])
    started = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        proc.wait_event("started", timeout=30)
    assert time.monotonic() - started < 10  # did not sit out the 30 s
    message = str(failure.value)
    assert "exited (3)" in message
    assert "boom" in message and token not in message and "SSSSSSSS" not in message
    assert proc.stop(timeout=5) == 3
    assert proc.count("boom") == 1
    assert proc.tracebacks() == (1, 0)
    assert proc.records[0]["token"] == token  # the raw record is kept for the leak checks


def test_a_wait_that_times_out_says_so(tmp_path: Path) -> None:
    proc = DaemonProc(script("import time; print('{\"event\": \"x\"}'); time.sleep(60)"),
                      env={"PATH": "/usr/bin"})
    with proc:
        assert proc.wait_event("x", timeout=10)["event"] == "x"
        with pytest.raises(AssertionError, match=r"timed out after 0\.3s"):
            proc.wait_event("never", timeout=0.3)
    assert proc.proc.returncode == -signal.SIGTERM


def test_stop_kills_a_process_that_ignores_sigterm_after_its_deadline() -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "print('{\"event\": \"ready\"}'); time.sleep(60)")
    proc = DaemonProc(script(code), env={"PATH": "/usr/bin"})
    proc.wait_event("ready", timeout=10)
    started = time.monotonic()
    assert proc.stop(timeout=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_log_lines_are_teed_to_a_file(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    proc = DaemonProc(script("print('{\"event\": \"a\"}'); print('plain')"),
                      env={"PATH": "/usr/bin"}, log_file=log)
    proc.wait(lambda: proc.proc.poll() is not None and len(proc.lines) == 2, timeout=10)
    proc.stop(timeout=5)
    assert log.read_text() == '{"event": "a"}\nplain\n'
    assert proc.other == ["plain"]
    assert proc.output == '{"event": "a"}\nplain'


def test_the_real_daemon_starts_ready_and_stops_cleanly(oc: OpenClawHome,
                                                        fake: FakeQwen) -> None:
    seed_qwen_store(oc, fake, lifetime=3600)
    with DaemonProcess(oc, fake, margin="60", listen="127.0.0.1:0") as daemon:
        started = daemon.wait_ready(timeout=30)
        assert started["profiles"] == 1
        assert daemon.health_address is not None
        status, _ = daemon.http_get("/healthz")
        assert status == 200
        assert daemon.stop() == 0
    assert daemon.tracebacks()[0] == 0
