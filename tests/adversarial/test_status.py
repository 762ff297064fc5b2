"""``status`` against a daemon that is busy with an expired token, and against files in our
state dir that are not plain files.

A health check must see exit 2 the moment any token is past its expiry, whatever the daemon
says it is doing; and it runs every few seconds, so no file it reads may hang it (a FIFO
blocks ``open``), feed it forever (``/dev/zero``) or make it read a gigabyte. Each case runs
the real CLI in a subprocess with a hard timeout and measures how long it took.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.adversarial.registry import Case, case, params
from tests.harness import ROOT, assert_no_secrets
from tests.test_status import HOUR, Env

#: A health check runs every few seconds: status must answer well within this, in every case.
BUDGET = 2.0


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    if e.lock is not None:
        e.lock.release()


def run_status(env: Env, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """The real CLI, timed; a hang fails the test after 10 s instead of blocking the suite."""
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "qwen_refresher", "status", *args],
                              cwd=ROOT, env=env.env(), capture_output=True, text=True,
                              timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"status {' '.join(args)} hung for more than 10 s")
    took = time.monotonic() - started
    assert_no_secrets([proc.stdout, proc.stderr], env.secrets)
    return proc, took


# -- exit 2 for a token past its expiry, whatever the daemon is doing ------------------------

BUSY = [
    Case("status-expired-while-refreshing", "status",
         "the daemon publishes 'refreshing' for a token already past its expiry",
         "status exits 2 for any profile past its expiry, whatever its state"),
    Case("status-expired-while-retrying", "status",
         "the daemon publishes 'retrying' (after server errors) for an expired token",
         "status exits 2 and names the profile as expired in the summary"),
    Case("status-expired-while-ok", "status",
         "a stuck daemon last published 'ok' for a token that has run out since",
         "status judges the expiry against the clock now, not the published state"),
]


@pytest.mark.adversarial
@pytest.mark.parametrize("c", params(BUSY))
def test_expired_token_exits_2_whatever_the_daemon_does(env: Env, c: Case) -> None:
    state = c.name.rsplit("-", 1)[1]
    store = env.openclaw(-120)  # expired two minutes ago
    env.hold_lock()
    env.publish([env.row(store, state, attempts=3, last_error="HTTP 503 from token server")])
    proc, took = run_status(env, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 2, (state, doc["summary"])
    assert doc["exit_code"] == 2
    assert "expired" in doc["summary"]
    assert doc["profiles"][0]["expires_in_seconds"] < 0
    text, _ = run_status(env)
    assert text.returncode == 2 and "expired" in text.stdout
    quiet, _ = run_status(env, "--quiet")
    assert quiet.returncode == 2 and quiet.stdout == ""


@pytest.mark.adversarial
@case("status-valid-token-while-retrying", "status",
      "the daemon retries a token that is still valid",
      "still exit 1 (degraded), not 2: the agents are served until expiry")
def test_retrying_a_valid_token_is_still_degraded_only(env: Env) -> None:
    store = env.openclaw(2 * HOUR)
    env.hold_lock()
    env.publish([env.row(store, "retrying", attempts=2)])
    proc, _ = run_status(env, "--json")
    assert proc.returncode == 1


# -- files in our state dir that are not plain files ------------------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()


def _dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _sparse(path: Path) -> None:
    with path.open("wb") as fh:
        fh.truncate(1 << 30)  # 1 GiB of holes: costs no disk, costs a gigabyte to read


def _dangling(path: Path) -> None:
    path.symlink_to(path.parent / "nowhere.json")


def _garbage(path: Path) -> None:
    path.write_bytes(b"\xff\xfe{{{" + b"[" * 100_000)


MAKERS: dict[str, Callable[[Path], None]] = {
    "fifo": _fifo, "dir": _directory, "dev-zero": _dev_zero, "sparse-1g": _sparse,
    "dangling": _dangling, "garbage": _garbage,
}
PROBLEM = {"fifo": "FIFO", "dir": "directory", "dev-zero": "symlink", "sparse-1g": "bytes",
           "dangling": "symlink", "garbage": "JSON"}

STATE_FILES = [
    Case("status-state-json-fifo", "status",
         "state.json in our state dir is a FIFO (open() blocks until a writer comes)",
         "opened O_NONBLOCK|O_NOFOLLOW, type checked with fstat; status names the file"),
    Case("status-state-json-dir", "status", "state.json is a directory",
         "refused by type before reading; the stores are read directly instead"),
    Case("status-state-json-dev-zero", "status",
         "state.json is a symlink to /dev/zero (an endless read)",
         "symlinks are refused (O_NOFOLLOW) and every read is capped"),
    Case("status-state-json-sparse-1g", "status",
         "state.json is a 1 GiB sparse file",
         "the size is checked with fstat before reading: refused, named, no GiB read"),
    Case("status-state-json-dangling", "status", "state.json is a dangling symlink",
         "refused as a symlink, named; status falls back to reading the stores"),
    Case("status-state-json-garbage", "status",
         "state.json holds non-UTF-8 bytes and 100k nested brackets",
         "parsed inside a guard: the file is named as unreadable, no traceback"),
]


@pytest.mark.adversarial
@pytest.mark.parametrize("running", [True, False], ids=["daemon", "no-daemon"])
@pytest.mark.parametrize("c", params(STATE_FILES))
def test_state_json_that_is_not_a_plain_file(env: Env, c: Case, running: bool) -> None:
    kind = c.name.removeprefix("status-state-json-")
    store = env.openclaw(6 * HOUR)
    env.state_dir.mkdir(mode=0o700, exist_ok=True)
    if running:
        env.hold_lock()
    state_json = env.state_dir / "state.json"
    MAKERS[kind](state_json)
    proc, took = run_status(env, "--json")
    assert took < BUDGET, f"status took {took:.2f}s"
    assert proc.stderr == "", proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    # The stores are still read, and the bad file is named with what is wrong with it.
    assert [p["state"] for p in doc["profiles"] if p["store"] == str(store)] == ["ok"]
    problems = doc["problems"]
    assert [p["path"] for p in problems] == [str(state_json)], problems
    assert PROBLEM[kind] in problems[0]["problem"], problems
    assert proc.returncode == (1 if running else 3)  # a broken state file is a degradation
    text, took = run_status(env)
    assert took < BUDGET
    assert str(state_json).replace(str(env.oc.home), "~") in text.stdout
    assert PROBLEM[kind] in text.stdout


LOCK_FILES = [
    Case("status-daemon-lock-fifo", "status",
         "daemon.lock in our state dir is a FIFO",
         "opened non-blocking and type-checked; status names it instead of hanging"),
    Case("status-daemon-lock-dev-zero", "status",
         "daemon.lock is a symlink to /dev/zero",
         "refused as a symlink (O_NOFOLLOW), named in the output"),
]


@pytest.mark.adversarial
@pytest.mark.parametrize("c", params(LOCK_FILES))
def test_daemon_lock_that_is_not_a_plain_file(env: Env, c: Case) -> None:
    kind = c.name.removeprefix("status-daemon-lock-")
    env.openclaw(6 * HOUR)
    env.state_dir.mkdir(mode=0o700, exist_ok=True)
    lock = env.state_dir / "daemon.lock"
    MAKERS[kind](lock)
    proc, took = run_status(env, "--json")
    assert took < BUDGET, f"status took {took:.2f}s"
    doc: dict[str, Any] = json.loads(proc.stdout)
    assert [p["path"] for p in doc["problems"]] == [str(lock)]
    assert PROBLEM[kind] in doc["problems"][0]["problem"]
    assert proc.returncode == 3  # no daemon can hold a lock that is not a file
