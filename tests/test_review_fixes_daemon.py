"""Regressions for defects a hostile review reproduced against the daemon, each end to end.

1. a SIGHUP (reload) while a refresh reads the server's answer must not close the HTTP client
   under it: the server has rotated, the answer is the only copy of the new tokens;
2. an unexpected exception in a family job (a lock file whose pid is 1e20, NaN or nested a
   million deep; or any bug) is a transient failure with back-off, never a profile stopped
   forever, and in ``run --once`` never the end of the other families' turn;
3. an ``on_rotate`` still failing when the daemon stops is run again after the restart;
4. a hung ``on_rotate`` never takes a refresh worker: other families are refreshed on time;
5. a ``state.json`` of an unexpected shape is skipped with one warning, never a crash.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher.lockfile import OPENCLAW, FileLock
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

PROFILE = "qwen-portal:default"


def _store(oc: OpenClawHome, fake: FakeQwen, lifetime: float, agent: str = "main") -> Path:
    access, refresh, expires = fake.issue_tokens(lifetime=lifetime)
    return oc.write_store({"version": 1, "profiles": {PROFILE: qwen_profile(access, refresh,
                                                                              expires)}},
                          agent=agent)


def _expires_in(oc: OpenClawHome, agent: str = "main") -> float:
    expires_ms: int = oc.read_store(agent)["profiles"][PROFILE]["expires"]
    return expires_ms / 1000 - time.time()


def _rows(oc: OpenClawHome) -> list[dict[str, Any]]:
    try:
        doc = json.loads((oc.our_state / "state.json").read_text())
    except (OSError, ValueError):
        return []
    rows = doc.get("profiles") if isinstance(doc, dict) else None
    return rows if isinstance(rows, list) else []


def _hook_row(oc: OpenClawHome) -> dict[str, Any] | None:
    for row in _rows(oc):
        if row.get("profile") == PROFILE and isinstance(row.get("hook"), dict):
            hook: dict[str, Any] = row["hook"]
            return hook
    return None


def _names(daemon: DaemonProcess) -> list[str]:
    return [str(e.get("event")) for e in daemon.events()]


# -- 1. a reload never closes the client under an in-flight refresh ---------------------------

def test_sighup_while_the_answer_is_in_flight_keeps_the_rotated_tokens(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    _store(oc, fake, lifetime=4)  # margin 3: due at +1 s
    fake.inject("delay", delay=3.0)  # the answer takes 3 s: the reload lands meanwhile
    with DaemonProcess(oc, fake, "--sweep-interval", "600", "--retry-max", "2") as daemon:
        wait_for(lambda: not fake.pending_faults, 15, "the refresh request in flight", daemon)
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reloaded", 10)
        daemon.wait_event("rotated", 15)
        time.sleep(1.5)  # a lost answer would show as a failure and a retry by now
        names = _names(daemon)
    assert names.index("reloaded") < names.index("rotated"), \
        "the reload did not wait for the refresh, and the refresh kept its answer"
    assert "refresh_failed" not in names and "needs_login" not in names, names
    assert len(fake.refresh_requests()) == 1, "the spent token was never sent again"
    assert fake.reuse_count == 0
    assert _expires_in(oc) > 60, "the store holds the rotated tokens"


# -- 2. an unexpected exception is a transient failure, never a stopped profile ----------------

#: Deep enough for json's RecursionError, short enough (< MAX_LOCK_BYTES) to be parsed.
_DEEP = "[" * 2000 + "]" * 2000


@pytest.mark.parametrize("pid", ["1e20", "NaN", "-Infinity", _DEEP, "12.5", "true"],
                         ids=["1e20", "nan", "-inf", "deep", "fraction", "bool"])
def test_a_lock_file_with_a_pid_no_process_can_have_is_judged_by_its_mtime(
        tmp_path: Path, pid: str) -> None:
    """Never an exception: fresh, it is a held lock (we wait); old, it is stale (taken)."""
    lock_path = tmp_path / "auth-profiles.json.lock"
    content = f'{{"pid": {pid}, "createdAt": "2020-01-01T00:00:00.000Z"}}'
    lock_path.write_text(content)
    with pytest.raises(Exception) as held:
        FileLock(lock_path, OPENCLAW, timeout=0.3).acquire()
    assert type(held.value).__name__ == "LockTimeout", repr(held.value)
    assert lock_path.read_text() == content, "a held lock is left as it is"
    old = time.time() - 60
    os.utime(lock_path, (old, old))
    lock = FileLock(lock_path, OPENCLAW, timeout=3)
    lock.acquire()
    try:
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()


@pytest.mark.parametrize("pid", ["1e20", _DEEP], ids=["1e20", "deep"])
def test_a_hostile_lock_file_delays_the_refresh_but_never_stops_the_profile(
        oc: OpenClawHome, fake: FakeQwen, pid: str) -> None:
    store = _store(oc, fake, lifetime=4)
    lock = store.with_name(store.name + ".lock")
    lock.write_text(f'{{"pid": {pid}, "createdAt": "2020-01-01T00:00:00.000Z"}}')
    env = oc.env(QWEN_REFRESHER_LOCK_TIMEOUT="1")
    with DaemonProcess(oc, fake, "--sweep-interval", "600", "--retry-max", "2",
                       env=env) as daemon:
        wait_for(lambda: "refresh_failed" in _names(daemon), 15, "a lock timeout", daemon)
        lock.unlink()  # the holder is gone: the next retry refreshes
        daemon.wait_event("rotated", 15)
        names = _names(daemon)
    assert "refresh_crashed" not in names, "a hostile pid is not an error of ours"
    assert _expires_in(oc) > 60


_CRASH_ONCE = '''
import os
from qwen_refresher import engine

_run = engine.Engine.run
_calls = []

def run(self, *args, **kwargs):
    _calls.append(1)
    if len(_calls) == 1:
        with open(os.environ["TEST_CRASH_SECRET_FILE"]) as f:
            secret = f.read()
        raise RuntimeError("unforeseen bug holding " + secret)
    return _run(self, *args, **kwargs)

engine.Engine.run = run
'''


def _crash_first_refresh(oc: OpenClawHome, tmp_path: Path, secret: str,
                         **extra: str) -> dict[str, str]:
    """The daemon's environment with a fault injected into its own process: the first
    ``Engine.run`` raises (an exception nobody foresaw, with a secret in its message)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_CRASH_ONCE)
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    return oc.env(PYTHONPATH=f"{site}{os.pathsep}{ROOT}",
                  TEST_CRASH_SECRET_FILE=str(secret_file), **extra)


def test_an_unexpected_exception_in_a_refresh_is_retried_with_backoff(
        oc: OpenClawHome, fake: FakeQwen, tmp_path: Path) -> None:
    store = _store(oc, fake, lifetime=4)
    refresh = oc.read_store()["profiles"][PROFILE]["refresh"]
    env = _crash_first_refresh(oc, tmp_path, refresh)
    with DaemonProcess(oc, fake, "--sweep-interval", "600", "--retry-max", "2",
                       env=env) as daemon:
        crash = daemon.wait_event("refresh_crashed", 15)
        daemon.wait_event("rotated", 15)
        wait_for(lambda: [(r.get("state"), r.get("last_error")) for r in _rows(oc)]
                 == [("ok", None)], 5, "state.json to show the recovery", daemon)
        status = subprocess.run([sys.executable, "-m", "qwen_refresher", "status"], cwd=ROOT,
                                env=oc.env(), capture_output=True, text=True, timeout=30,
                                check=False)
        names = _names(daemon)
    assert "RuntimeError" in crash.get("exception", ""), "logged with its traceback"
    assert PROFILE in json.dumps(crash["profiles"]) and str(store) in json.dumps(
        crash["profiles"]), crash
    assert names.count("refresh_crashed") == 1
    assert len(fake.refresh_requests()) == 1
    assert _expires_in(oc) > 60
    assert status.returncode == 0, status.stdout + status.stderr
    assert "refreshing" not in status.stdout
    assert_no_secrets([daemon.output, status.stdout], [refresh, *all_tokens(fake)])


def test_run_once_survives_an_unexpected_exception_and_refreshes_the_others(
        oc: OpenClawHome, fake: FakeQwen, tmp_path: Path) -> None:
    _store(oc, fake, lifetime=2)
    _store(oc, fake, lifetime=2, agent="other")
    secret = oc.read_store()["profiles"][PROFILE]["refresh"]
    env = _crash_first_refresh(oc, tmp_path, secret)
    proc = subprocess.run([sys.executable, "-m", "qwen_refresher", "run", "--once",
                           "--token-url", fake.token_url, "--device-code-url",
                           fake.device_code_url, "--margin", "3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # one due family was not refreshed: said so, no crash
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    names = [e.get("event") for e in events]
    assert names.count("refresh_crashed") == 1, names
    done = next(e for e in events if e.get("event") == "once_done")
    assert (done["due"], done["refreshed"], done["failed"]) == (2, 1, 1), done
    assert len(fake.refresh_requests()) == 1, "the other family had its turn"
    rows = _rows(oc)
    assert len(rows) == 2 and all(r["state"] != "refreshing" for r in rows), rows
    assert_no_secrets([out, (oc.our_state / "state.json").read_text()],
                      [secret, *all_tokens(fake)])


# -- 3. a failing on_rotate survives a restart ------------------------------------------------

def test_a_failing_reload_is_run_again_after_a_restart(
        oc: OpenClawHome, fake: FakeQwen, tmp_path: Path) -> None:
    _store(oc, fake, lifetime=4)
    runs, gate = tmp_path / "runs", tmp_path / "gateway-up"
    hook = (f"echo \"$QWEN_REFRESHER_PROFILE $QWEN_REFRESHER_EXPIRES_MS\" >> {runs}; "
            f"if [ -e {gate} ]; then exit 0; fi; echo gateway busy; exit 1")
    args = ("--sweep-interval", "600", "--on-rotate", hook)
    with DaemonProcess(oc, fake, *args) as daemon:
        daemon.wait_event("on_rotate_failed", 15)
        wait_for(lambda: (_hook_row(oc) or {}).get("failing_since") is not None, 5,
                 "state.json to say the gateway was not told", daemon)
    failing_since = (_hook_row(oc) or {})["failing_since"]
    before = len(runs.read_text().splitlines())
    with DaemonProcess(oc, fake, *args) as daemon:
        wait_for(lambda: len(runs.read_text().splitlines()) > before, 10,
                 "the hook to run again after the restart", daemon)
        time.sleep(0.5)
        row = _hook_row(oc) or {}
        assert row.get("failing_since") == failing_since, \
            f"still failing since the first failure: {row}"
        gate.touch()
        wait_for(lambda: (_hook_row(oc) or {}).get("ok") is True, 20,
                 "the retried hook to succeed", daemon)
        names = _names(daemon)
    assert "on_rotate_resumed" in names and "on_rotate_recovered" in names, names
    assert len(fake.refresh_requests()) == 1, "telling the gateway never refreshes again"
    store_expires = oc.read_store()["profiles"][PROFILE]["expires"]
    assert runs.read_text().splitlines()[-1] == f"{PROFILE} {store_expires}", \
        "the hook is told of the tokens the store holds"
    assert (_hook_row(oc) or {}).get("failing_since") is None


# -- 4. a hung on_rotate never takes a refresh worker -----------------------------------------

def test_a_hung_reload_does_not_delay_other_families(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    for agent in ("a1", "a2", "a3"):
        _store(oc, fake, lifetime=6, agent=agent)  # all due at +3 s, expired at +6 s
    expiry = min(q.expires_ms for q in fake.issued) / 1000
    env = oc.env(QWEN_REFRESHER_HOOK_TIMEOUT="6", QWEN_REFRESHER_MAX_CONCURRENT_REFRESHES="1")
    with DaemonProcess(oc, fake, "--sweep-interval", "600", "--on-rotate", "sleep 60",
                       env=env) as daemon:
        wait_for(lambda: len(fake.refresh_requests()) >= 3, 15, "three refreshes", daemon)
    served = sorted(q.at for q in fake.issued if q.via == "refresh")
    assert len(served) == 3
    assert served[-1] < expiry - 1, \
        f"last family refreshed {served[-1] - expiry:+.1f}s from its expiry: starved by a hook"


# -- 5. a state.json of an unexpected shape ----------------------------------------------------

BAD_STATES: list[Any] = [
    {"schema_version": 1, "daemon": {}, "profiles": [{"store": "/x"}], "stores": [],
     "rejected": {"ab": [None, "x"]}},
    {"schema_version": 1, "profiles": "everything", "rejected": ["ab"]},
    {"schema_version": 1, "profiles": [None, 3, {"store": 1, "profile": []},
                                       {"store": "/s", "profile": "p", "last_refresh_at": "x",
                                        "hook": {"ok": "yes", "failing_since": []}}],
     "rejected": {"ab": [1e400, 2]}},
]


@pytest.mark.parametrize("doc", BAD_STATES, ids=["r10", "wrong-containers", "wrong-fields"])
def test_a_malformed_state_json_is_skipped_with_one_warning(
        oc: OpenClawHome, fake: FakeQwen, doc: Any) -> None:
    _store(oc, fake, lifetime=4)
    oc.our_state.mkdir(mode=0o700)
    path = oc.our_state / "state.json"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    with DaemonProcess(oc, fake, "--sweep-interval", "600") as daemon:
        daemon.wait_event("started", 15)
        daemon.wait_event("rotated", 15)
        warnings = [e for e in daemon.events()
                    if e.get("event") in ("state_entries_ignored", "state_ignored")]
        assert daemon.proc.poll() is None
    assert len(warnings) == 1, warnings
    assert warnings[0]["file"] == str(path)
    rows = _rows(oc)
    assert [r["profile"] for r in rows] == [PROFILE], "rewritten from what the daemon knows"
