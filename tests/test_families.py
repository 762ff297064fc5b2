"""``runtime/families.py`` in-process: views + lineage -> families and when each runs.

Pure planning (no I/O, no scheduler, ``now`` passed in), so every case here is a fake clock
(``NOW``), hand-built views of real ``OpenClawStore`` objects (never read: the views are what
the inventory would have read) and a ``TokenHistory`` in memory. Each test asserts the exact
grouping, run time or status row state, so a change of rule fails one of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_refresher.history import TokenHistory
from qwen_refresher.models import Credentials, ProfileKey
from qwen_refresher.planner import MIN_INTERVAL, Timing
from qwen_refresher.runtime import families as fam
from qwen_refresher.runtime.memory import Memory, View
from qwen_refresher.stores.openclaw import OpenClawStore

NOW = 1_800_000_000.0
HOUR = 3600.0
TIMING = Timing(margin=900.0, jitter=0.0, retry_max=300.0)
PROFILE = "qwen-portal:default"


class World:
    """A ``Memory`` and a history, filled the way the inventory fills them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.memory = Memory()
        self.history = TokenHistory()

    def key(self, agent: str, profile: str = PROFILE) -> ProfileKey:
        return ProfileKey(self.root / "agents" / agent / "agent" / "auth-profiles.json", profile)

    def hold(self, agent: str, fp: str | None, *, expires: float = NOW + 6 * HOUR,
             issued: float | None = None, profile: str = PROFILE,
             problem: str | None = None) -> ProfileKey:
        key = self.key(agent, profile)
        creds = None if fp is None else Credentials(f"acc-{fp}", f"ref-{fp}",
                                                    int(expires * 1000))
        self.memory.views[key] = View(OpenClawStore(key.store), creds, problem, fp, issued)
        self.memory.keys_by_store[key.store].add(key)
        return key

    def reconcile(self, now: float = NOW, timing: Timing = TIMING,
                  touched: set[ProfileKey] | None = None) -> dict[str, float | None]:
        return dict(fam.reconcile(self.memory, self.history, timing, now, touched).steps)


@pytest.fixture
def w(tmp_path: Path) -> World:
    return World(tmp_path)


def test_one_token_in_two_stores_is_one_family_planned_margin_before_expiry(w: World) -> None:
    a, b = w.hold("main", "T1"), w.hold("work", "T1")
    steps = w.reconcile()
    job = fam.family_id(min(a, b))
    assert steps == {job: NOW + 6 * HOUR - 900}
    family = w.memory.families[job]
    assert family.keys == sorted([a, b]) and family.head == "T1" and not family.lagging
    assert w.memory.family_of == {a: job, b: job}
    assert w.memory.runtime[a].state == "ok"
    assert w.memory.runtime[a].next_refresh_at == NOW + 6 * HOUR - 900


def test_two_tokens_are_two_families(w: World) -> None:
    a, b = w.hold("main", "T1"), w.hold("work", "T2", expires=NOW + 2 * HOUR)
    steps = w.reconcile()
    assert steps == {fam.family_id(a): NOW + 6 * HOUR - 900,
                     fam.family_id(b): NOW + 2 * HOUR - 900}


def test_a_member_behind_its_lineage_joins_the_family_and_runs_it_now(w: World) -> None:
    w.history.link("OLD", "NEW")
    behind, ahead = w.hold("main", "OLD", expires=NOW + HOUR), w.hold("work", "NEW")
    steps = w.reconcile()
    job = fam.family_id(min(behind, ahead))
    assert steps == {job: NOW}
    family = w.memory.families[job]
    assert family.head == "NEW" and family.lagging
    assert family.creds.refresh == "ref-NEW"
    assert fam.due_now(w.memory, w.history, NOW) == [job]


def test_a_remembered_head_no_store_holds_is_what_the_family_refreshes(w: World) -> None:
    """A revert: the stores hold a consumed token, our memory holds its successor."""
    w.history.link("OLD", "NEW")
    w.history.remember("NEW", Credentials("acc-N", "ref-N", int((NOW + 5 * HOUR) * 1000)),
                       issued_at=NOW - HOUR)
    key = w.hold("main", "OLD", expires=NOW + HOUR)
    steps = w.reconcile()
    family = w.memory.families[fam.family_id(key)]
    assert family.head == "NEW" and family.lagging
    assert family.creds.refresh == "ref-N"
    assert steps == {family.id: NOW}


def test_a_rejected_head_has_no_job_and_shows_needs_login(w: World) -> None:
    key = w.hold("main", "T1")
    w.history.reject("T1", "invalid_grant")
    steps = w.reconcile()
    assert steps == {fam.family_id(key): None}
    assert w.memory.runtime[key].state == "needs_login"
    assert w.memory.runtime[key].last_error == "invalid_grant"
    assert fam.due_now(w.memory, w.history, NOW + 7 * HOUR) == []


def test_a_pending_retry_decides_the_run_time(w: World) -> None:
    key = w.hold("main", "T1")
    w.memory.runtime[key].retry_at = NOW + 42
    assert w.reconcile() == {fam.family_id(key): NOW + 42}
    assert w.memory.runtime[key].state == "retrying"


def test_a_short_lived_token_is_planned_at_half_its_life(w: World) -> None:
    key = w.hold("main", "T1", expires=NOW + 600, issued=NOW)
    assert w.reconcile() == {fam.family_id(key): NOW + 300}


def test_an_expired_token_runs_now_and_shows_expired(w: World) -> None:
    key = w.hold("main", "T1", expires=NOW - 10)
    assert w.reconcile() == {fam.family_id(key): NOW}
    assert w.memory.runtime[key].state == "expired"


def test_the_clock_decides_due(w: World) -> None:
    key = w.hold("main", "T1", expires=NOW + HOUR)
    w.reconcile()
    planned = NOW + HOUR - 900
    assert fam.due_now(w.memory, w.history, planned - 1) == []
    assert fam.due_now(w.memory, w.history, planned) == [fam.family_id(key)]
    w.reconcile(now=planned + 1)
    assert w.memory.runtime[key].state == "due"


def test_jitter_is_drawn_once_per_token_and_redrawn_for_a_new_one(w: World) -> None:
    timing = Timing(margin=900.0, jitter=200.0, retry_max=300.0)
    key = w.hold("main", "T1")
    first = w.reconcile(timing=timing)[fam.family_id(key)]
    assert first is not None and NOW + 6 * HOUR - 900 - 200 <= first <= NOW + 6 * HOUR - 900
    for _ in range(5):  # sweeps re-plan the same token: the same moment
        assert w.reconcile(timing=timing)[fam.family_id(key)] == first
    w.hold("main", "T2", expires=NOW + 7 * HOUR)  # rotated: a new plan
    again = w.reconcile(timing=timing)[fam.family_id(key)]
    assert again is not None and again > first + HOUR - 250


def test_runs_that_change_nothing_back_off_instead_of_looping(w: World) -> None:
    key = w.hold("main", "T1", expires=NOW - 10)  # due now, every time
    job = fam.family_id(key)
    w.memory.idle_runs[job] = 3
    assert w.reconcile() == {job: NOW + fam.IDLE_RETRY_BASE * 4}
    w.memory.idle_runs[job] = 50
    assert w.reconcile() == {job: NOW + fam.IDLE_RETRY_CAP}


def test_a_writer_that_keeps_reverting_is_backed_off(w: World) -> None:
    w.history.link("OLD", "NEW")
    w.hold("main", "OLD")
    w.hold("work", "NEW")
    w.memory.reverts["NEW"].count = fam.REVERT_FREE_RETRIES  # still free
    w.memory.reverts["NEW"].last = NOW
    job = fam.family_id(w.key("main"))
    assert w.reconcile() == {job: NOW}
    w.memory.reverts["NEW"].count = fam.REVERT_FREE_RETRIES + 3
    assert w.reconcile() == {job: NOW + 8}


def test_an_unreadable_profile_is_in_no_family(w: World) -> None:
    bad = w.hold("main", None, problem="refresh token missing")
    good = w.hold("work", "T1")
    assert w.reconcile() == {fam.family_id(good): NOW + 6 * HOUR - 900}
    assert w.memory.runtime[bad].state == "invalid_store"
    assert w.memory.runtime[bad].last_error == "refresh token missing"
    assert bad not in w.memory.family_of


def test_a_touched_reconcile_replans_only_the_touched_families(w: World) -> None:
    a, b = w.hold("main", "T1"), w.hold("work", "T2")
    w.reconcile()
    w.hold("main", "T3", expires=NOW + 3 * HOUR)  # main rotated by someone
    steps = w.reconcile(touched={a})
    assert steps == {fam.family_id(a): NOW + 3 * HOUR - 900}
    assert fam.family_id(b) in w.memory.families


def test_a_family_split_drops_the_old_job(w: World) -> None:
    a, b = w.hold("main", "T1"), w.hold("work", "T1")
    w.reconcile()
    old = fam.family_id(min(a, b))
    moved = max(a, b)
    w.hold(moved.store.parent.parent.name, "T9", expires=NOW + 2 * HOUR)  # a new login there
    steps = w.reconcile(touched={moved})
    stay = min(a, b)
    assert steps[fam.family_id(stay)] == NOW + 6 * HOUR - 900
    assert steps[fam.family_id(moved)] == NOW + 2 * HOUR - 900
    assert w.memory.families[old].keys == [stay]


def test_a_family_without_a_job_is_an_orphan(w: World) -> None:
    a, b = w.hold("main", "T1"), w.hold("work", "T2")
    w.reconcile()
    scheduled = {fam.family_id(a)}
    assert fam.orphans(w.memory, w.history, scheduled, running=set()) == {b}
    assert fam.orphans(w.memory, w.history, scheduled, running={fam.family_id(b)}) == set()


def test_the_heir_is_a_live_token_seen_replacing_ours(w: World) -> None:
    mine = w.hold("main", "MINE")
    w.hold("work", "SIBLING")
    w.reconcile()
    family = w.memory.families[fam.family_id(mine)]
    assert fam.find_heir(w.memory, w.history, family) is None
    w.history.observe("MINE", "SIBLING")
    heir = fam.find_heir(w.memory, w.history, family)
    assert heir is not None and heir[0] == "SIBLING"
    assert heir[1].endswith("#" + PROFILE) and "work" in heir[1]
    w.history.reject("SIBLING", "invalid_grant")  # a rejected heir is no heir
    assert fam.find_heir(w.memory, w.history, family) is None


def test_no_plan_is_sooner_than_min_interval_after_issue(w: World) -> None:
    key = w.hold("main", "T1", expires=NOW, issued=NOW)
    assert w.reconcile() == {fam.family_id(key): NOW + MIN_INTERVAL}
