"""Failure kinds are types: the tree in ``errors.py``, what the engine produces against the real
fake Qwen server, the metric labels that come from them, and the Protocols the seams are typed
with.

The engine tests run ``Engine.run`` in-process on real OpenClaw store files in tmp_path, with
the real lock protocol and the real OAuth client talking to ``testing/fake_qwen/`` on
127.0.0.1; each fault is the server's (or the file system's), not a stub's.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

import pytest

from qwen_refresher import errors, metrics
from qwen_refresher.engine import Engine, Member, Outcome, Result, in_lock_order, lock_order_key
from qwen_refresher.history import TokenHistory
from qwen_refresher.journal import Journal
from qwen_refresher.models import Credentials
from qwen_refresher.protocols import (
    HealthEndpoint,
    Logger,
    MetricsSink,
    NotifierLike,
    StopSignal,
)
from qwen_refresher.qwen import QwenOAuthClient
from qwen_refresher.stores.openclaw import OpenClawStore
from qwen_refresher.testing.fake_qwen import QWEN_CLIENT_ID, FakeQwen, FakeQwenConfig

PROFILE = "qwen-portal:default"
SALT = b"errors-test-salt"
OWN_KINDS = [k for k in errors.kinds() if k.__module__ == errors.__name__]


# -- the tree ----------------------------------------------------------------------------------


def test_every_kind_has_an_exit_code_and_a_label() -> None:
    codes = {errors.EX_FAILURE, errors.EX_NEEDS_LOGIN, errors.EX_USAGE, errors.EX_TEMPFAIL,
             errors.EX_CONFIG}
    assert len(OWN_KINDS) >= 30
    for kind in OWN_KINDS:
        assert kind.exit_code in codes, kind
        assert re.fullmatch(r"[a-z][a-z0-9_]*", kind.metric_label), kind


def test_no_two_kinds_share_a_label_by_accident() -> None:
    """A label is shared only by inheritance (a SlowDown *is* a rate limit, every config
    problem is "config"): each label is declared by exactly one class. Two declarations of one
    label would lump unrelated failures together in the metric."""
    declared: dict[str, type] = {}
    for kind in OWN_KINDS:
        if "metric_label" in vars(kind):
            assert kind.metric_label not in declared, (kind, declared.get(kind.metric_label))
            declared[kind.metric_label] = kind
    for kind in OWN_KINDS:
        assert issubclass(kind, declared[kind.metric_label]), kind


def test_every_refresh_failure_kind_ends_in_an_engine_result() -> None:
    results = set(get_args(Result))
    for kind in OWN_KINDS:
        if kind.result is not None:
            assert kind.result in results, kind
    assert set(errors.refresh_results()) == {
        "transient", "rejected", "unavailable", "lock_timeout", "write_failed"}


def test_the_drawn_tree_is_the_code() -> None:
    """The table in errors.py's docstring names each kind's exit code, label and result: it
    must say what the classes say, or it is a second, drifting copy."""
    doc = errors.__doc__ or ""
    rows = re.findall(r"^[\s│├└─]*([A-Z]\w+)\s+(\d+)\s+([a-z0-9_]+)\s+([a-z_]+|-)\s", doc, re.M)
    assert len(rows) >= 30
    for name, code, label, result in rows:
        kind = getattr(errors, name)
        assert (kind.exit_code, kind.metric_label, kind.result) == (
            int(code), label, None if result == "-" else result), name
    drawn = {name for name, *_ in rows} | {"RotatedUnusableAccess"}
    assert drawn == {k.__name__ for k in OWN_KINDS}


def test_the_kinds_that_lived_elsewhere_are_the_same_classes() -> None:
    from qwen_refresher import discovery, login, qwen, settings_core

    assert qwen.SlowDown is errors.SlowDown
    assert issubclass(errors.SlowDown, errors.RateLimited)
    assert login.LoginWriteError is errors.LoginWriteError
    assert discovery.ConfigUnusable is settings_core.ConfigUnusable is errors.ConfigUnusable
    assert isinstance(errors.ConfigUnusable("x"), ValueError)  # as callers long caught it
    assert str(errors.ConfigUnusable("is not valid JSON5")) == "is not valid JSON5"
    assert login.EX_INTERRUPTED == errors.EX_INTERRUPTED == 130


def test_the_status_path_kinds_are_in_the_tree_but_not_on_its_import_path() -> None:
    """SettingsError and StateFileProblem live in the tree (exit code, label) like every kind;
    settings_core and published serve them by their old names, and import errors only when a
    problem is met, so a health check's ``status`` does not pay for the tree."""
    from qwen_refresher import published, settings_core, status

    assert settings_core.SettingsError is status.SettingsError is errors.SettingsError
    assert published.StateFileProblem is status.StateFileProblem is errors.StateFileProblem
    bad = errors.SettingsError("margin (QWEN_REFRESHER_MARGIN)", "not a duration")
    assert isinstance(bad, errors.ConfigError) and isinstance(bad, ValueError)
    assert (bad.exit_code, bad.metric_label) == (78, "config")
    problem = errors.StateFileProblem("/s/state.json", "is a FIFO")
    assert (problem.exit_code, problem.metric_label, problem.result) == (1, "state_file", None)
    assert problem.as_dict() == {"path": "/s/state.json", "problem": "is a FIFO"}
    code = ("import sys, qwen_refresher.status, qwen_refresher.commands.status; "
            "print(sorted(m for m in ('qwen_refresher.errors', 'pathlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_a_restated_failure_keeps_its_kind() -> None:
    limited = errors.RateLimited("HTTP 429 from token endpoint", retry_after=3.0)
    again = limited.restated("cannot start a login: HTTP 429 from token endpoint")
    assert type(again) is errors.RateLimited and again.retry_after == 3.0
    assert str(again) == again.reason == "cannot start a login: HTTP 429 from token endpoint"
    slow = errors.SlowDown().restated("polling: slow_down")  # a kind whose __init__ takes no text
    assert type(slow) is errors.SlowDown and str(slow) == "polling: slow_down"


def test_an_outcome_takes_its_result_from_the_kind() -> None:
    outcome = Outcome.failed(errors.RateLimited("HTTP 429 from token endpoint"))
    assert (outcome.result, outcome.reason) == ("transient", "HTTP 429 from token endpoint")
    assert outcome.failure is not None and outcome.failure.metric_label == "http_429"
    with pytest.raises(TypeError):
        Outcome.failed(errors.ServiceError("systemctl failed"))  # no refresh ends in that


def test_metrics_labels_come_from_the_types() -> None:
    refresh_labels = {k.metric_label for k in OWN_KINDS if k.result is not None}
    assert refresh_labels | {"other"} <= set(metrics.REASONS)
    assert "not_due" not in metrics.RESULTS  # a run that was not due is never counted
    assert set(metrics.RESULTS) == {"rotated", "adopted", "synced", *errors.refresh_results()}
    sink = metrics.Metrics(list)
    # exactly the labels of the kinds that can end a refresh (fleet kinds too, once loaded)
    assert set(sink.reasons) == {k.metric_label for k in errors.kinds()
                                 if k.result is not None} | {"other"}
    sink.refresh_finished("transient", 0.1, metrics.failure_label(errors.RequestTimeout("t")))
    text = sink.render()[0].decode()
    assert 'qwen_refresher_refresh_failures_total{reason="timeout"} 1.0' in text
    for label in refresh_labels:  # every label exists from the start, at 0
        assert f'qwen_refresher_refresh_failures_total{{reason="{label}"}}' in text


# -- the engine produces the kind, against the real fake server ---------------------------------


@pytest.fixture
def fake() -> Iterator[FakeQwen]:
    with FakeQwen(FakeQwenConfig(lifetime=3600)) as server:
        yield server


class World:
    def __init__(self, tmp: Path, fake: FakeQwen, token_url: str | None = None,
                 timeout: float = 5.0) -> None:
        self.tmp = tmp
        self.fake = fake
        state = tmp / "state"
        state.mkdir(mode=0o700, exist_ok=True)
        self.client = QwenOAuthClient(token_url or fake.token_url, fake.device_code_url,
                                      QWEN_CLIENT_ID, timeout=timeout)
        self.stop = threading.Event()
        self.engine = Engine(client=self.client, salt=SALT,
                             history=TokenHistory(state / "lineage.log"),
                             journal=Journal(state), lock_timeout=2.0, stop=self.stop)

    def store(self, agent: str, creds: Credentials | None) -> OpenClawStore:
        path = self.tmp / "agents" / agent / "agent" / "auth-profiles.json"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if creds is not None:
            doc = {"version": 1, "profiles": {PROFILE: {
                "type": "oauth", "provider": "qwen-portal", "access": creds.access,
                "refresh": creds.refresh, "expires": creds.expires_ms}}}
            path.write_text(json.dumps(doc, indent=2) + "\n")
            os.chmod(path, 0o600)
        return OpenClawStore(path)

    def issued(self) -> Credentials:
        access, refresh, expires = self.fake.issue_tokens()
        return Credentials(access=access, refresh=refresh, expires_ms=expires)

    def run(self, *stores: OpenClawStore) -> Outcome:
        return self.engine.run([Member(s, PROFILE) for s in stores], due_at=0)


@pytest.fixture
def world(tmp_path: Path, fake: FakeQwen) -> Iterator[World]:
    w = World(tmp_path, fake)
    yield w
    w.client.close()


def assert_kind(outcome: Outcome, kind: type[errors.QwenRefresherError], label: str,
                result: str) -> None:
    assert type(outcome.failure) is kind, (outcome.failure, outcome.reason)
    assert outcome.result == result == kind.result
    assert metrics.failure_label(outcome.failure) == label
    assert outcome.reason  # the people's text is still there


@pytest.mark.parametrize(("fault", "kind", "label"), [
    ("429", errors.RateLimited, "http_429"),
    ("503", errors.ServerError, "http_5xx"),
    ("500", errors.ServerError, "http_5xx"),
    ("403", errors.UnexpectedStatus, "http_4xx"),
    ("html200", errors.UnusableAnswer, "bad_response"),
    ("empty200", errors.UnusableAnswer, "bad_response"),
])
def test_a_server_fault_is_its_kind(world: World, fault: str,
                                    kind: type[errors.QwenRefresherError], label: str) -> None:
    old = world.issued()
    main = world.store("main", old)
    world.fake.inject(fault)
    outcome = world.run(main)
    assert_kind(outcome, kind, label, "transient")
    assert len(world.fake.refresh_requests()) == 1


def test_a_rate_limit_keeps_its_retry_after(world: World) -> None:
    main = world.store("main", world.issued())
    world.fake.inject("429", retry_after=7)
    outcome = world.run(main)
    assert_kind(outcome, errors.RateLimited, "http_429", "transient")
    assert outcome.retry_after == pytest.approx(7)


def test_a_timeout_is_a_timeout(tmp_path: Path, fake: FakeQwen) -> None:
    w = World(tmp_path, fake, timeout=0.3)
    try:
        main = w.store("main", w.issued())
        fake.inject("timeout", delay=5)
        assert_kind(w.run(main), errors.RequestTimeout, "timeout", "transient")
    finally:
        w.client.close()


def test_a_dropped_connection_is_a_network_error(world: World) -> None:
    main = world.store("main", world.issued())
    world.client.refresh(world.issued().refresh)  # warm a keep-alive connection
    world.fake.inject("drop")
    assert_kind(world.run(main), errors.NetworkError, "network", "transient")


def test_a_refused_connection_is_a_network_error(tmp_path: Path, fake: FakeQwen) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    w = World(tmp_path, fake, token_url=f"http://127.0.0.1:{port}/api/v1/oauth2/token",
              timeout=1.0)
    try:
        main = w.store("main", w.issued())
        assert_kind(w.run(main), errors.NetworkError, "network", "transient")
    finally:
        w.client.close()


def test_a_rejected_token_is_rejected_and_remembered_as_such(world: World) -> None:
    old = world.issued()
    main = world.store("main", old)
    world.fake.reject_token(old.refresh)
    assert_kind(world.run(main), errors.RefreshTokenRejected, "rejected", "rejected")
    # the second run sends nothing: the history's rejection is typed the same way
    again = world.run(main)
    assert_kind(again, errors.RefreshTokenRejected, "rejected", "rejected")
    assert len(world.fake.refresh_requests()) == 1


def test_stopping_before_sending_is_not_sent(world: World) -> None:
    main = world.store("main", world.issued())
    world.stop.set()
    assert_kind(world.run(main), errors.NotSent, "cancelled", "transient")
    assert world.fake.refresh_requests() == []


def test_a_missing_store_is_unavailable(world: World) -> None:
    missing = world.store("ghost", None)
    outcome = world.run(missing)
    assert isinstance(outcome.failure, errors.StoreUnreadable)
    assert outcome.result == "unavailable"
    assert metrics.failure_label(outcome.failure) == "unavailable"


def test_a_malformed_store_is_unavailable(world: World) -> None:
    main = world.store("main", world.issued())
    main.path.write_text("{ not json")
    outcome = world.run(main)
    assert_kind(outcome, errors.StoreMalformed, "unavailable", "unavailable")


def test_a_live_lock_is_a_lock_timeout(world: World) -> None:
    main = world.store("main", world.issued())
    world.engine.lock_timeout = 0.3
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    main.lock_path().write_text(json.dumps({"pid": os.getpid(), "createdAt": created}))
    outcome = world.run(main)
    assert_kind(outcome, errors.LockTimeout, "lock_timeout", "lock_timeout")
    assert world.fake.refresh_requests() == []


def test_a_member_that_cannot_be_written_is_write_failed(world: World) -> None:
    old = world.issued()
    main = world.store("main", old)
    broken = world.store("work", old)
    broken.path.write_text("{ this is not json")
    outcome = world.run(main, broken)
    assert isinstance(outcome.failure, errors.StoreWriteError)
    assert outcome.result == "write_failed"
    assert metrics.failure_label(outcome.failure) == "write_failed"
    assert str(broken.path) in (outcome.reason or "")


def test_success_carries_no_failure(world: World) -> None:
    main = world.store("main", world.issued())
    outcome = world.run(main)
    assert outcome.result == "rotated" and outcome.failure is None


def test_no_failure_text_leaks_a_token(world: World) -> None:
    old = world.issued()
    main = world.store("main", old)
    for fault in ("429", "503", "403", "html200"):
        world.fake.inject(fault)
        outcome = world.run(main)
        for text in (outcome.reason or "", str(outcome.failure), repr(outcome.failure)):
            assert old.refresh not in text and old.access not in text


# -- one lock order ------------------------------------------------------------------------------


def test_one_lock_order_for_engine_and_login(tmp_path: Path) -> None:
    a = OpenClawStore(tmp_path / "b" / "auth-profiles.json")
    b = OpenClawStore(tmp_path / "a" / "auth-profiles.json")
    twin = OpenClawStore(tmp_path / "a" / "auth-profiles.json")  # a second object, one file
    ordered = in_lock_order([a, b, twin])
    assert ordered == [b, a]  # one per lock file, sorted: never waits on itself
    assert [lock_order_key(s) for s in ordered] == sorted(lock_order_key(s) for s in (a, b))
    # the login path sorts its targets by the same key
    import inspect

    from qwen_refresher import login

    assert "lock_order_key" in inspect.getsource(login.write_login)


# -- Protocols -----------------------------------------------------------------------------------


def test_the_real_parts_satisfy_the_protocols(tmp_path: Path) -> None:
    from qwen_refresher.config import load_settings
    from qwen_refresher.health import HealthServer
    from qwen_refresher.logsetup import get_logger
    from qwen_refresher.runtime.relogin import LoginEpisodes

    assert isinstance(threading.Event(), StopSignal)
    sink = metrics.Metrics(list)
    assert isinstance(sink, MetricsSink)
    log = get_logger()
    assert isinstance(log, Logger) and isinstance(log.bind(x=1), Logger)
    health = HealthServer("127.0.0.1", 0, live_fn=lambda: True, profiles_fn=list,
                          metrics=sink)
    assert isinstance(health, HealthEndpoint)
    settings = load_settings({"state_dir": tmp_path / "state"})
    notifier = LoginEpisodes(settings, log=log)
    try:
        assert isinstance(notifier, NotifierLike)
    finally:
        notifier.close(timeout=1.0)
    assert not isinstance(object(), StopSignal)


def test_a_lock_honours_any_stop_signal(tmp_path: Path) -> None:
    """Store.lock takes a StopSignal, not a threading.Event only: a stop set while we wait
    for someone else's lock ends the wait at once."""

    class Stop:
        def __init__(self) -> None:
            self.asked = 0

        def is_set(self) -> bool:
            self.asked += 1
            return True

        def wait(self, timeout: float | None = None) -> bool:
            self.asked += 1
            return True

    store = OpenClawStore(tmp_path / "auth-profiles.json")
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    store.lock_path().write_text(json.dumps({"pid": os.getpid(), "createdAt": created}))
    stop = Stop()
    started = time.monotonic()
    with pytest.raises(errors.LockTimeout):
        store.lock(timeout=10, stop=stop).acquire()
    assert time.monotonic() - started < 2
    assert stop.asked >= 1


# -- end to end: the real daemon counts each failure under its kind's label --------------------


def test_the_daemon_counts_each_failure_under_its_kinds_label(tmp_path: Path) -> None:
    """A real daemon, the real fake server failing three different ways in a row: /metrics
    names each failure by its type (a 403 used to be "other": nothing in its text matched),
    and the reasons in the log stay the human ones."""
    import urllib.request

    from tests.harness import DaemonProcess, OpenClawHome, seed_qwen_store, wait_for

    with FakeQwen(FakeQwenConfig(lifetime=3600)) as server:
        oc = OpenClawHome(tmp_path)
        seed_qwen_store(oc, server, lifetime=4)
        for fault in ("403", "503", "429"):
            server.inject(fault, retry_after=1 if fault == "429" else None)
        with DaemonProcess(oc, server, env=oc.env(QWEN_REFRESHER_LISTEN="127.0.0.1:0")) as d:
            port = d.wait_event("health_listening")["address"].rsplit(":", 1)[1]

            def scrape() -> str:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=5) as resp:
                    return str(resp.read().decode())

            wait_for(lambda: 'qwen_refresher_refresh_total{result="rotated"} 1.0' in scrape(),
                     40, "a rotation after three failures", d)
            text = scrape()
            for label in ("http_4xx", "http_5xx", "http_429"):
                assert f'qwen_refresher_refresh_failures_total{{reason="{label}"}} 1.0' in text
            assert 'qwen_refresher_refresh_failures_total{reason="other"} 0.0' in text
            assert 'qwen_refresher_refresh_total{result="transient"} 3.0' in text
            reasons = [e.get("reason", "") for e in d.events() if e.get("event") ==
                       "refresh_failed"]
            assert any("HTTP 403" in r for r in reasons), reasons


def test_the_troubleshooting_table_names_every_reason() -> None:
    """docs/troubleshooting.md lists the reason labels a refresh can fail with; a new kind
    without a row (or a row for a label nothing produces) fails here."""
    doc = (Path(__file__).parent.parent / "docs" / "troubleshooting.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z0-9_]+)` \|\s*`?(\w*)`?\s*\|", doc, re.M))
    own = {k.metric_label for k in OWN_KINDS if k.result is not None} | {errors.OTHER}
    assert set(rows) == own
    for label, kind in rows.items():
        if kind:
            assert getattr(errors, kind).metric_label == label, label


_CRASH_ONCE = '''
from qwen_refresher import engine

_run = engine.Engine.run
_calls = []


def run(self, *args, **kwargs):
    _calls.append(1)
    if len(_calls) == 1:
        raise RuntimeError("an unforeseen bug")
    return _run(self, *args, **kwargs)


engine.Engine.run = run
'''


def test_a_crashed_refresh_is_counted_as_internal_not_other(tmp_path: Path) -> None:
    """The real daemon, its first Engine.run raising (injected through sitecustomize into the
    daemon's own process): the crash is an InternalError, counted under "internal"."""
    import urllib.request

    from tests.harness import DaemonProcess, OpenClawHome, seed_qwen_store, wait_for

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_CRASH_ONCE)
    root = Path(__file__).resolve().parent.parent
    with FakeQwen(FakeQwenConfig(lifetime=3600)) as server:
        oc = OpenClawHome(tmp_path)
        seed_qwen_store(oc, server, lifetime=4)
        env = oc.env(QWEN_REFRESHER_LISTEN="127.0.0.1:0", PYTHONPATH=f"{site}{os.pathsep}{root}")
        with DaemonProcess(oc, server, "--retry-max", "2", env=env) as d:
            port = d.wait_event("health_listening")["address"].rsplit(":", 1)[1]
            d.wait_event("refresh_crashed", 20)

            def scrape() -> str:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=5) as resp:
                    return str(resp.read().decode())

            wait_for(lambda: 'qwen_refresher_refresh_total{result="rotated"} 1.0' in scrape(),
                     30, "the retry after the crash rotates", d)
            text = scrape()
    assert 'qwen_refresher_refresh_failures_total{reason="internal"} 1.0' in text
    assert 'qwen_refresher_refresh_failures_total{reason="other"} 0.0' in text
    assert 'qwen_refresher_refresh_total{result="transient"} 1.0' in text
