"""In-process tests of ``Engine.run``: real OpenClaw store files in tmp_path, the real lock
protocol, the real OAuth client talking to the fake Qwen server on 127.0.0.1, a real journal
and lineage history, and a fake clock that decides what is due.

Each test asserts what the stores, the journal, the history and the server saw, not only the
outcome's name: a refresh that "rotated" but sent two requests, or wrote a store before the
journal, fails here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from qwen_refresher.engine import Engine, Member, Outcome, current_token
from qwen_refresher.errors import (
    LockTimeout,
    RateLimited,
    RefreshTokenRejected,
    ServerError,
    StoreError,
    StoreWriteError,
)
from qwen_refresher.history import TokenHistory
from qwen_refresher.journal import Journal
from qwen_refresher.models import Credentials, fingerprint
from qwen_refresher.qwen import QwenOAuthClient
from qwen_refresher.stores.base import StoreSnapshot
from qwen_refresher.stores.openclaw import OpenClawStore
from qwen_refresher.testing.fake_qwen import QWEN_CLIENT_ID, FakeQwen, FakeQwenConfig

PROFILE = "qwen-portal:default"
SALT = b"engine-test-salt"


class Clock:
    """The engine's clock, moved by hand: due or not due is the test's decision."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake() -> Iterator[FakeQwen]:
    with FakeQwen(FakeQwenConfig(lifetime=3600)) as server:
        yield server


@pytest.fixture
def client(fake: FakeQwen) -> Iterator[QwenOAuthClient]:
    with QwenOAuthClient(fake.token_url, fake.device_code_url, QWEN_CLIENT_ID,
                         timeout=5) as c:
        yield c


@dataclass
class World:
    """One engine and what it works on."""

    tmp: Path
    fake: FakeQwen
    engine: Engine
    clock: Clock
    history: TokenHistory
    journal: Journal
    state: Path
    stores: dict[str, Path] = field(default_factory=dict)

    def store(self, agent: str, creds: Credentials | None = None,
              profile: str = PROFILE) -> OpenClawStore:
        path = self.tmp / "agents" / agent / "agent" / "auth-profiles.json"
        if creds is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            doc = {"version": 1, "profiles": {profile: {
                "type": "oauth", "provider": "qwen-portal", "access": creds.access,
                "refresh": creds.refresh, "expires": creds.expires_ms}}}
            path.write_text(json.dumps(doc, indent=2) + "\n")
            os.chmod(path, 0o600)
        self.stores[agent] = path
        return OpenClawStore(path)

    def held(self, agent: str, profile: str = PROFILE) -> str:
        doc = json.loads(self.stores[agent].read_bytes())
        return str(doc["profiles"][profile]["refresh"])

    def fp(self, refresh: str) -> str:
        return fingerprint(refresh, SALT)

    def journal_file(self) -> Path:
        return self.state / "journal.json"

    def refreshes(self) -> int:
        return len(self.fake.refresh_requests())


@pytest.fixture
def world(tmp_path: Path, fake: FakeQwen, client: QwenOAuthClient) -> World:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    clock = Clock(time.time())
    history = TokenHistory(state / "lineage.log")
    journal = Journal(state)
    engine = Engine(client=client, salt=SALT, history=history, journal=journal,
                    lock_timeout=2.0, clock=clock)
    return World(tmp_path, fake, engine, clock, history, journal, state)


def issued(fake: FakeQwen, lifetime: float = 3600) -> Credentials:
    access, refresh, expires = fake.issue_tokens(lifetime=lifetime)
    return Credentials(access=access, refresh=refresh, expires_ms=expires)


# -- rotate ------------------------------------------------------------------------------------


def test_a_due_token_is_rotated_once_journaled_written_and_settled(world: World) -> None:
    old = issued(world.fake)
    main = world.store("main", old)
    outcome = world.engine.run([Member(main, PROFILE)], due_at=world.clock.now - 1,
                               planned_fp=world.fp(old.refresh))
    assert outcome.result == "rotated", outcome.reason
    assert outcome.failure is None
    assert world.refreshes() == 1
    new = world.fake.issued[-1]
    assert new.replaced == old.refresh
    assert world.held("main") == new.refresh_token
    assert outcome.fp == world.fp(new.refresh_token)
    assert outcome.consumed == world.fp(old.refresh)
    assert outcome.written == [Member(main, PROFILE).key]
    assert outcome.creds is not None and outcome.creds.access == new.access_token
    # the lineage knows the rotation (and the on-disk log has it), the journal is settled
    assert world.history.newest(world.fp(old.refresh)) == outcome.fp
    assert (world.state / "lineage.log").read_text() == f"{outcome.consumed} {outcome.fp}\n"
    assert not world.journal_file().exists()
    assert not world.journal.holds(outcome.fp)
    # the store lock is released
    assert not main.lock_path().exists()


def test_the_new_expiry_is_taken_from_the_engine_clock(world: World) -> None:
    old = issued(world.fake)
    main = world.store("main", old)
    world.clock.now = 2_000_000_000.0
    outcome = world.engine.run([Member(main, PROFILE)], due_at=0)
    assert outcome.result == "rotated", outcome.reason
    assert outcome.creds is not None
    assert outcome.creds.expires_ms == pytest.approx((2_000_000_000 + 3600) * 1000, abs=2000)
    assert world.history.issued_at(outcome.fp or "") == 2_000_000_000.0


def test_the_journal_is_on_disk_before_any_store_is_written(world: World) -> None:
    """A store that looks at the journal the moment it is written: the new refresh token
    must already be there (a kill -9 between the two then loses nothing)."""
    seen: list[bool] = []

    class Watching(OpenClawStore):
        def write(self, snapshot: StoreSnapshot, updates: Mapping[str, Credentials]) -> bytes:
            new = next(iter(updates.values())).refresh
            path = world.journal_file()
            seen.append(path.exists() and new in path.read_text())
            return super().write(snapshot, updates)

    old = issued(world.fake)
    world.store("main", old)
    watching = Watching(world.stores["main"])
    outcome = world.engine.run([Member(watching, PROFILE)], due_at=0)
    assert outcome.result == "rotated", outcome.reason
    assert seen == [True]
    assert not world.journal_file().exists()  # and gone once the store held it


# -- nothing to spend --------------------------------------------------------------------------


def test_not_due_sends_nothing_and_changes_nothing(world: World) -> None:
    old = issued(world.fake)
    main = world.store("main", old)
    before = world.stores["main"].read_bytes()
    outcome = world.engine.run([Member(main, PROFILE)], due_at=world.clock.now + 60,
                               planned_fp=world.fp(old.refresh))
    assert outcome.result == "not_due"
    assert outcome.fp == world.fp(old.refresh)
    assert world.refreshes() == 0
    assert world.stores["main"].read_bytes() == before
    world.clock.now += 61  # the same run, a minute later, is due
    assert world.engine.run([Member(main, PROFILE)], due_at=world.clock.now - 1).result \
        == "rotated"
    assert world.refreshes() == 1


def test_a_token_changed_since_planning_is_never_spent(world: World) -> None:
    """``planned_fp`` names the token the due time was computed for; another one found under
    the lock (someone rotated meanwhile) gets a new plan, not a blind refresh."""
    planned = issued(world.fake)
    now_held = issued(world.fake)
    main = world.store("main", now_held)
    outcome = world.engine.run([Member(main, PROFILE)], due_at=0,
                               planned_fp=world.fp(planned.refresh))
    assert outcome.result == "not_due"
    assert outcome.fp == world.fp(now_held.refresh)
    assert world.refreshes() == 0
    assert world.held("main") == now_held.refresh


# -- heal without spending -------------------------------------------------------------------


def test_a_lagging_member_is_synced_from_its_sibling_without_a_refresh(world: World) -> None:
    old = issued(world.fake)
    new = issued(world.fake)
    world.history.link(world.fp(old.refresh), world.fp(new.refresh))
    main, work = world.store("main", new), world.store("work", old)
    outcome = world.engine.run([Member(main, PROFILE), Member(work, PROFILE)],
                               due_at=world.clock.now + 600)
    assert outcome.result == "synced", outcome.reason
    assert world.held("work") == new.refresh
    assert outcome.written == [Member(work, PROFILE).key]
    assert outcome.reapplied == [Member(work, PROFILE).key]  # it held a consumed token
    assert world.refreshes() == 0


def test_a_reverted_store_gets_the_remembered_head_back(world: World) -> None:
    """A gateway wrote a consumed token back: the store is healed from memory, and the dead
    token is never sent."""
    old = issued(world.fake)
    main = world.store("main", old)
    first = world.engine.run([Member(main, PROFILE)], due_at=0)
    assert first.result == "rotated", first.reason
    head = world.held("main")
    world.store("main", old)  # the revert
    outcome = world.engine.run([Member(main, PROFILE)], due_at=world.clock.now + 600)
    assert outcome.result == "synced", outcome.reason
    assert world.held("main") == head
    assert outcome.reapplied == [Member(main, PROFILE).key]
    assert world.refreshes() == 1
    assert world.fake.reuse_count == 0


def test_current_token_prefers_the_live_lineage_head_over_a_later_expiry() -> None:
    history = TokenHistory()
    dead = Credentials("a1", "r1", expires_ms=9_000)
    live = Credentials("a2", "r2", expires_ms=5_000)
    history.link("fp-dead", "fp-live")
    assert current_token(history, [("fp-dead", dead), ("fp-live", live)]) == ("fp-live", live)
    # every candidate superseded: the newest a store holds is the only move left
    history.link("fp-live", "fp-gone")
    assert current_token(history, [("fp-dead", dead), ("fp-live", live)]) == ("fp-dead", dead)
    assert current_token(history, []) is None


# -- the server says no ------------------------------------------------------------------------


def test_a_rejected_token_is_remembered_and_never_sent_again(world: World) -> None:
    old = issued(world.fake)
    main = world.store("main", old)
    world.fake.reject_token(old.refresh)
    outcome = world.engine.run([Member(main, PROFILE)], due_at=0)
    assert outcome.result == "rejected"
    assert isinstance(outcome.failure, RefreshTokenRejected)
    assert outcome.reason
    assert world.history.rejection(world.fp(old.refresh)) is not None
    assert world.refreshes() == 1
    again = world.engine.run([Member(main, PROFILE)], due_at=0)
    assert again.result == "rejected"
    assert isinstance(again.failure, RefreshTokenRejected)
    assert world.refreshes() == 1  # decided from memory: nothing sent
    assert world.held("main") == old.refresh


def test_a_transient_failure_keeps_the_token_and_spends_nothing(world: World) -> None:
    old = issued(world.fake)
    main = world.store("main", old)
    world.fake.inject("503")
    outcome = world.engine.run([Member(main, PROFILE)], due_at=0)
    assert outcome.result == "transient", outcome.reason
    assert isinstance(outcome.failure, ServerError)
    assert world.held("main") == old.refresh
    assert not world.journal_file().exists()
    assert world.history.links() == {}
    retry = world.engine.run([Member(main, PROFILE)], due_at=0)  # the token is still good
    assert retry.result == "rotated", retry.reason


def test_a_429_carries_the_servers_retry_after(world: World) -> None:
    main = world.store("main", issued(world.fake))
    world.fake.inject("429", retry_after=7)
    outcome = world.engine.run([Member(main, PROFILE)], due_at=0)
    assert outcome.result == "transient"
    assert isinstance(outcome.failure, RateLimited)
    assert outcome.retry_after == pytest.approx(7)


# -- locks and writes ---------------------------------------------------------------------------


def test_a_live_openclaw_lock_times_out_and_nothing_is_sent(world: World) -> None:
    old = issued(world.fake)
    main = world.store("main", old)
    world.engine.lock_timeout = 0.3
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    lock = main.lock_path()
    lock.write_text(json.dumps({"pid": os.getpid(), "createdAt": created}, indent=2))
    started = time.monotonic()
    outcome = world.engine.run([Member(main, PROFILE)], due_at=0)
    assert outcome.result == "lock_timeout", outcome.reason
    assert isinstance(outcome.failure, LockTimeout)
    assert time.monotonic() - started < 5
    assert world.refreshes() == 0
    assert lock.exists()  # someone else's lock is never removed
    assert world.held("main") == old.refresh
    assert not world.engine.held


def test_an_unwritable_member_is_write_failed_and_the_journal_keeps_the_token(
        world: World) -> None:
    """One member readable, one broken: the rotation happens (the readable member is due),
    the broken one cannot be written, and the journal keeps the new token for it."""
    old = issued(world.fake)
    main = world.store("main", old)
    broken = world.store("work", old)
    world.stores["work"].write_text("{ this is not json")
    outcome = world.engine.run([Member(main, PROFILE), Member(broken, PROFILE)], due_at=0)
    assert outcome.result == "write_failed", outcome.reason
    assert isinstance(outcome.failure, StoreWriteError)
    assert Member(broken, PROFILE).key in outcome.errors
    new = world.held("main")
    assert new != old.refresh
    assert world.journal.holds(outcome.fp or "")
    assert new in world.journal_file().read_text()
    assert world.journal.pending()[0][1] == outcome.fp


def test_no_readable_member_is_unavailable(world: World) -> None:
    gone = world.store("main")  # its directory exists, the file was never written
    world.stores["main"].parent.mkdir(parents=True, mode=0o700)
    outcome = world.engine.run([Member(gone, PROFILE)], due_at=0)
    assert outcome.result == "unavailable"
    assert isinstance(outcome.failure, StoreError)
    assert outcome.reason
    assert world.refreshes() == 0


def test_every_failed_outcome_carries_a_kind_whose_result_it_is(world: World) -> None:
    """The daemon decides from the type, never from the message (issue 14)."""
    main = world.store("main", issued(world.fake))
    for fault in ("500", "429", "timeout", "drop"):
        world.fake.inject(fault, delay=0.1)
        outcome = world.engine.run([Member(main, PROFILE)], due_at=0)
        assert outcome.result == "transient", (fault, outcome.reason)
        assert outcome.failure is not None, fault
        assert type(outcome.failure).result == outcome.result, fault


def test_a_profile_missing_from_its_store_is_reported_by_name(world: World) -> None:
    main = world.store("main", issued(world.fake), profile="qwen-portal:other")
    outcome: Outcome = world.engine.run([Member(main, PROFILE)], due_at=0)
    assert outcome.result == "unavailable"
    assert PROFILE in (outcome.reason or "")
