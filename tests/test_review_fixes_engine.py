"""Regressions for three defects a hostile review found in the refresh path, each a way to
lose a login that the server had not taken away:

1. SIGTERM cut a request whose body was already sent: the server rotated, the answer with
   the only live refresh token was dropped, and the restarted daemon sent the spent token.
2. A 200 with a valid new refresh token but an access token failing the store rules was
   thrown away whole: the spent token was sent again.
3. After a restart, a lineage head no store held and no memory remembered made plan and
   engine disagree for ever: a busy loop on OpenClaw's lock, never a refresh, nothing said.
   Also: no run that changed nothing is ever rescheduled "now" without a back-off.

The first three run the real daemon as a subprocess against the package's fake server; the
back-off rule is checked in-process on a real Daemon (real store, real planner), because no
honest outside scenario makes plan and engine disagree once (3) is fixed.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher import errors
from qwen_refresher.config import load_settings
from qwen_refresher.daemon import IDLE_RETRY_BASE, IDLE_RETRY_CAP, Daemon
from qwen_refresher.engine import Member, Outcome
from qwen_refresher.qwen import QwenOAuthClient
from qwen_refresher.state import load_salt
from qwen_refresher.stores.base import MAX_TOKEN_LENGTH
from qwen_refresher.testing.fake_qwen import QWEN_CLIENT_ID, FakeQwen
from tests.harness import (
    DaemonProcess,
    OpenClawHome,
    all_tokens,
    assert_no_secrets,
    qwen_profile,
    wait_for,
)

PROFILE = "qwen-portal:default"


@pytest.fixture
def fake() -> Iterator[FakeQwen]:
    with FakeQwen(lifetime=600) as server:
        yield server


def seed(tmp_path: Path, fake: FakeQwen, lifetime: float) -> tuple[OpenClawHome, str]:
    home = OpenClawHome(tmp_path)
    access, refresh, expires = fake.issue_tokens(lifetime)
    home.write_store({"version": 1, "profiles": {PROFILE: qwen_profile(access, refresh,
                                                                       expires)}})
    return home, refresh


def hold_first_answer(fake: FakeQwen, change: Callable[[Any], None]) -> None:
    """Wrap the fake's token answer: the server rotates as usual, and ``change`` alters the
    first answer (or delays it) after the rotation has happened."""
    original = fake._token_reply
    first = threading.Event()

    def reply(issued: Any) -> Any:
        answer = original(issued)
        if not first.is_set():
            first.set()
            change(answer)
        return answer

    fake._token_reply = reply  # type: ignore[method-assign]


def profile(home: OpenClawHome) -> dict[str, Any]:
    doc = home.read_store()
    entry: dict[str, Any] = doc["profiles"][PROFILE]
    return entry


# -- 1. SIGTERM while the answer is on its way ----------------------------------------------

def test_sigterm_waits_for_an_answer_already_on_its_way(tmp_path: Path, fake: FakeQwen,
                                                        ) -> None:
    """The server rotates at once and answers 5 s later (well within the request deadline);
    SIGTERM arrives meanwhile. The daemon must bring that answer home (journal and store)
    and still exit within 10 s."""
    in_flight = threading.Event()

    def slow(_answer: Any) -> None:
        in_flight.set()
        time.sleep(5.0)

    hold_first_answer(fake, slow)
    home, first_refresh = seed(tmp_path, fake, lifetime=4)
    daemon = DaemonProcess(home, fake, "--sweep-interval", "600", "--http-timeout", "15")
    try:
        wait_for(in_flight.is_set, 15, "the refresh request to reach the server", daemon)
        time.sleep(0.5)
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        rc = daemon.proc.wait(12)
        took = time.monotonic() - started
    finally:
        daemon.stop()
    assert rc == 0
    assert took < 10, f"SIGTERM took {took:.1f}s"
    assert len(fake.issued) == 2, "the server rotated exactly once"
    held = profile(home)
    assert held["refresh"] == fake.issued[-1].refresh_token != first_refresh, \
        "the answer the server sent was dropped: the store holds the spent token"
    assert held["access"] == fake.issued[-1].access_token
    assert not daemon.has_event("refresh_failed")
    assert_no_secrets(daemon.lines, all_tokens(fake))
    # And the restarted daemon carries on with the live token, no lost login.
    with DaemonProcess(home, fake, "--sweep-interval", "600") as again:
        again.wait_event("started", 15)
        time.sleep(1.0)
        assert not again.has_event("needs_login")
    assert fake.reuse_count == 0


def test_no_request_is_started_once_stop_is_set(fake: FakeQwen) -> None:
    """A request never sent spends nothing: stopping must not send one (it could be cut)."""
    _, refresh, _ = fake.issue_tokens()
    stop = threading.Event()
    stop.set()
    with QwenOAuthClient(fake.token_url, fake.device_code_url, QWEN_CLIENT_ID) as client:
        with pytest.raises(errors.TransientOAuthError, match="stopping"):
            client.refresh(refresh, stop=stop)
    assert fake.refresh_requests() == []


# -- 2. a rotation whose access token is unusable -------------------------------------------

def spoil_access(answer: Any) -> None:
    body = json.loads(answer.body)
    body["access_token"] = "A" * (MAX_TOKEN_LENGTH + 1)
    answer.body = json.dumps(body).encode()


@pytest.mark.parametrize("second", ["ok", "503"])
def test_a_rotation_with_an_unusable_access_token_keeps_the_new_refresh_token(
        tmp_path: Path, fake: FakeQwen, second: str) -> None:
    """The 200's refresh token is valid, its access token fails the store rules. The new
    refresh token is the only live one: it is spent at once for a usable access token
    ("ok"), or, if that fails ("503"), kept in the store and spent by the retry. Never the
    consumed token again, never an invalid access token in a store."""

    def hostile(answer: Any) -> None:
        spoil_access(answer)
        if second == "503":
            fake.inject("503")  # the immediate second refresh fails transiently

    hold_first_answer(fake, hostile)
    home, first_refresh = seed(tmp_path, fake, lifetime=4)
    with DaemonProcess(home, fake, "--sweep-interval", "600", "--retry-max", "2") as daemon:
        daemon.wait_event("rotated", 20)
        wait_for(lambda: profile(home)["refresh"] == fake.issued[-1].refresh_token, 5,
                 "the store to hold the newest tokens", daemon)
        held = profile(home)
        assert held["access"] == fake.issued[-1].access_token
        assert len(held["access"]) <= MAX_TOKEN_LENGTH
        assert not daemon.has_event("needs_login")
        sent = [r.refresh_token for r in fake.refresh_requests()]
        assert sent[0] == first_refresh
        assert fake.issued[1].refresh_token in sent, \
            "the refresh token from the unusable answer was never spent"
        assert fake.reuse_count == 0, "a consumed refresh token was sent again"
        journal = home.our_state / "journal.json"
        wait_for(lambda: not journal.exists() or json.loads(journal.read_text()) in ([], {}),
                 5, "the journal to settle", daemon)
    assert_no_secrets(daemon.lines, all_tokens(fake))


# -- 3. a lineage head nobody holds ------------------------------------------------------------

def test_a_revert_after_restart_ends_in_a_refresh_attempt_not_a_busy_loop(
        tmp_path: Path, fake: FakeQwen) -> None:
    """Rotate F->H, stop, put the consumed F back, restart: lineage says F->H, no store holds
    H and nothing remembers it. The family must be planned on F (what a store holds), F sent
    once, and the server's rejection decide: needs_login, quickly, and no loop."""
    home, _ = seed(tmp_path, fake, lifetime=4)
    original = home.store_path().read_bytes()
    with DaemonProcess(home, fake, "--sweep-interval", "600") as daemon:
        daemon.wait_event("rotated", 15)
    home.write_store(original)  # a gateway writes its stale snapshot back
    before = len(fake.refresh_requests())
    with DaemonProcess(home, fake, "--sweep-interval", "600") as daemon:
        event = daemon.wait_event("needs_login", 10)
        assert "rejected" in str(event.get("reason"))
        time.sleep(2.0)
        assert len(fake.refresh_requests()) - before == 1, "the consumed token was sent again"
        assert daemon.proc.poll() is None
    assert_no_secrets(daemon.lines, all_tokens(fake))


def test_an_idle_outcome_is_never_rescheduled_now_without_backoff(tmp_path: Path,
                                                                  fake: FakeQwen) -> None:
    """Whatever makes a run end ``not_due``/``synced`` while the plan says "now", the next
    run waits a growing, bounded delay; a run that does something resets it."""
    home, _ = seed(tmp_path, fake, lifetime=1)  # expired by the time we plan: due now
    time.sleep(1.1)
    env = {"HOME": str(home.home), "XDG_STATE_HOME": str(tmp_path / "xdg"),
           "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "OPENCLAW_STATE_DIR": str(home.state)}
    settings = load_settings({"state_dir": tmp_path / "state", "qwen_code": False,
                              "discover": False, "stores": [str(home.store_path())],
                              "listen": "", "on_rotate": "none", "notify_desktop": False,
                              "token_url": fake.token_url,
                              "device_code_url": fake.device_code_url}, env=env)
    daemon = Daemon(settings)
    daemon.stop.set()  # plan, never schedule nor run: the plan is what is checked
    try:
        daemon.salt = load_salt(settings.state_dir)
        daemon.rescan_all()
        assert daemon.families, "the store was not found"
        family = next(iter(daemon.families.values()))
        key = family.keys[0]
        members = [Member(daemon.views[k].store, k.profile) for k in family.keys]

        def after(result: str) -> float:
            daemon._apply_outcome(family, members, Outcome(result))  # type: ignore[arg-type]
            now = time.time()
            daemon.reconcile(set(family.keys))
            run_at = daemon.runtime[key].next_refresh_at
            assert run_at is not None
            return run_at - now

        assert daemon.runtime[key].next_refresh_at is not None
        assert daemon.runtime[key].next_refresh_at <= time.time()  # due: planned for now
        delays = [after("not_due") for _ in range(12)]
        assert delays[0] >= IDLE_RETRY_BASE * 0.9, "a not_due run was rescheduled at once"
        assert all(b >= a - 0.05 for a, b in itertools.pairwise(delays)), delays
        assert delays[-1] <= IDLE_RETRY_CAP + 0.5
        assert after("synced") >= IDLE_RETRY_CAP * 0.9
        assert after("adopted") <= 0.1, "a run that did something must reset the back-off"
    finally:
        daemon.client.close()
