"""kill -9 at random moments (during a refresh, during a write, while holding the lock), restart,
repeat; then account for every refresh token the server ever issued.

Three families (one spanning two agent files, two sharing one file) on 1-second tokens, so the
daemon rotates about six times a second. Each run is killed by one of five strategies:
``in_flight`` (a refresh request held 0.1-0.5 s by the fake, killed during it or just after),
``after_response`` (0-20 ms after the fake answered: parsing, journaling, writing),
``holding_lock`` (as soon as a store lock carries the daemon's pid), ``taking_lock`` (as soon
as a lock file appears, pid maybe not yet written) and ``random`` (0-2 s after start,
start-up and journal replay included).

What a kill can cost, and how each cost is counted:

- A store that no longer parses: a monitor thread reads every store every few milliseconds for
  the whole run (and again right after each kill). Must be 0.
- A rotated refresh token that no store will ever receive. After each kill (the server having
  finished every request in flight) the newest token of each family's lineage at the server is
  looked for in the stores and in ``journal.json``. If neither holds it, the family's old token
  is consumed and the new one gone: the family is lost and the test re-seeds it (a new login)
  before restarting. Each loss is classified by whether the daemon ever had the token on disk
  (the monitor saw it in the journal or a store): "before the response was read / journaled"
  is the inherent window of any rotating-token client and is reported; "after" means the daemon
  dropped a token it had made durable, and must be 0.
- A lock left behind by the killed daemon that blocks the next one: the time from restart until
  the dead owner's lock file is gone or replaced must not exceed OpenClaw's 30 s stale time
  (plus our lock back-off and a start-up). A lock with the dead pid in it is taken over at
  once; an *empty* one (killed between creating the file and writing the pid) only by its age:
  the daemon used to leave those (460 in 500 kills, several stores blocked 30 s at once) until
  c233175 made lock creation atomic; now there must be none.
- A rotation lost by the daemon itself ("after"): found twice in 500 kills, both in the store
  two families share; cause: two workers both "take over" a dead daemon's lock
  (``test_a_stale_lock_is_taken_over_by_one_contender_only``), and the second writer's older
  snapshot overwrites the first one's rotation. Counted apart (``KNOWN_TAKEOVER_RACE``) while
  that bug is open.

At the end every refresh-issued token must be either in a store or consumed by a later refresh
(its lineage continued), or be one of the losses counted above; and no refresh token may ever
have been sent twice (``reuse_count == 0``: re-seeding before the restart keeps the daemon from
ever presenting a consumed token).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher.config import QWEN_CLIENT_ID
from qwen_refresher.journal import Journal
from qwen_refresher.lockfile import OPENCLAW, OPENCLAW_STALE_SECONDS, FileLock
from qwen_refresher.models import Credentials, ProfileKey, fingerprint
from qwen_refresher.qwen import QwenOAuthClient
from qwen_refresher.state import load_salt
from qwen_refresher.testing.fake_qwen import FakeQwen, FakeQwenConfig
from tests.harness import OpenClawHome, openclaw_json, qwen_profile
from tests.reliability.conftest import Figures
from tests.reliability.support import (
    Daemon,
    assert_no_leaks,
    chain_from,
    fake_secrets,
    live_at_fake,
    percentile,
    status_outputs,
    successor_map,
    temp_leftovers,
    wait_for,
    write_atomically,
)

LIFETIME = 1.0
#: family -> its members (agent, profile id). Two families share the "solo" file, so two
#: workers contend for one lock; family A spans two files, so one refresh takes two locks.
FAMILIES: dict[str, list[tuple[str, str]]] = {
    "A": [("main", "qwen-portal:default"), ("work", "qwen-portal:default")],
    "B": [("solo", "qwen-portal:default")],
    "C": [("solo", "qwen-portal:second")],
}
AGENTS = sorted({agent for members in FAMILIES.values() for agent, _ in members})
DAEMON_ARGS = ("--margin", "3", "--jitter", "0", "--http-timeout", "2", "--retry-max", "2",
               "--no-qwen-code")
STRATEGIES = ("in_flight", "after_response", "holding_lock", "taking_lock", "random")
CI_KILLS, LONG_KILLS = 30, 500
#: While test_a_stale_lock_is_taken_over_by_one_contender_only failed (two workers could both
#: "take over" a dead daemon's lock on a store they share), a rotation in the shared store could
#: be overwritten by the other family's write, and such losses were counted apart. Fixed in
#: lockfile.py (per-path mutex, directory flock, rename-and-verify): no loss is excused now.
KNOWN_TAKEOVER_RACE = False
_AGENTS_OF = {family: {agent for agent, _ in members} for family, members in FAMILIES.items()}
SHARED_STORE_FAMILIES = frozenset(
    family for family, agents in _AGENTS_OF.items()
    if any(agents & others for other, others in _AGENTS_OF.items() if other != family))
#: How long a restarted daemon may take to make progress: a kill between creating a lock file
#: and writing its pid leaves an empty lock, which only its age (OpenClaw's 30 s) releases.
PROGRESS_S = OPENCLAW_STALE_SECONDS + 15


LockState = tuple[int, int, bytes] | None


def lock_state(lock: Path) -> LockState:
    """Identity and content of a lock file, None when there is none."""
    try:
        st = lock.stat()
        return st.st_ino, st.st_mtime_ns, lock.read_bytes()
    except OSError:
        return None


@dataclass
class Monitor:
    """Reads every store and the journal continually, from its own thread."""

    stores: dict[str, Path]
    journal: Path
    reads: int = 0
    parse_failures: list[str] = field(default_factory=list)
    #: refresh token -> (where it was first seen on disk, when)
    seen: dict[str, tuple[str, float]] = field(default_factory=dict)
    #: lock file -> (the lock a dead daemon left, when the next daemon was started)
    dead_locks: dict[Path, tuple[LockState, float | None]] = field(default_factory=dict)
    blocked_for: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scan()
            time.sleep(0.002)

    def scan(self) -> None:
        found: dict[str, str] = {}
        failures: list[str] = []
        for agent, path in self.stores.items():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                failures.append(f"{agent}: missing")
                continue
            try:
                doc = json.loads(data)
                found.update({p["refresh"]: f"store:{agent}" for p in doc["profiles"].values()
                              if p.get("provider") == "qwen-portal"})
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                failures.append(f"{agent}: {type(exc).__name__} on {len(data)} bytes")
        found.update(dict.fromkeys(journal_tokens(self.journal), "journal"))
        now = time.time()
        with self._lock:
            self.reads += 1
            self.parse_failures += failures
            for token, where in found.items():
                self.seen.setdefault(token, (where, now))
            for lock, (state, since) in list(self.dead_locks.items()):
                if lock_state(lock) != state and since is not None:
                    self.blocked_for.append(max(0.0, now - since))
                    del self.dead_locks[lock]

    def ever_seen(self, token: str) -> tuple[str, float] | None:
        with self._lock:
            return self.seen.get(token)

    def restarted(self, at: float) -> None:
        with self._lock:
            self.dead_locks = {k: (c, at if s is None else s)
                               for k, (c, s) in self.dead_locks.items()}

    def note_dead_lock(self, lock: Path, state: LockState) -> None:
        """A lock the killed daemon left; the same one (same inode, mtime and content), still
        there after a later kill, keeps the time of the first restart that found it."""
        with self._lock:
            known = self.dead_locks.get(lock)
            if known is None or known[0] != state:
                self.dead_locks[lock] = (state, None)

    def still_blocked(self, now: float) -> list[float]:
        with self._lock:
            return [now - s for _, s in self.dead_locks.values() if s is not None]


def held_by(lock: Path, marker: bytes) -> bool:
    try:
        return marker in lock.read_bytes()
    except OSError:
        return False


def journal_tokens(journal: Path) -> set[str]:
    try:
        doc = json.loads(journal.read_bytes())
    except (OSError, ValueError):
        return set()
    entries = doc.get("entries", []) if isinstance(doc, dict) else []
    return {e["refresh"] for e in entries if isinstance(e, dict) and "refresh" in e}


def seed(oc: OpenClawHome, fake: FakeQwen) -> dict[str, Path]:
    docs: dict[str, dict[str, Any]] = {
        agent: {"version": 1, "profiles": {
            "anthropic:default": {"type": "api_key", "provider": "anthropic", "key": "sk-ant"}},
            "usageStats": {"anthropic:default": {"errorCount": 0}}}
        for agent in AGENTS}
    for members in FAMILIES.values():
        access, refresh, expires = fake.issue_tokens(lifetime=LIFETIME)
        for agent, profile in members:
            docs[agent]["profiles"][profile] = qwen_profile(access, refresh, expires)
    return {agent: oc.write_store(doc, agent=agent) for agent, doc in docs.items()}


def reseed(paths: dict[str, Path], fake: FakeQwen, family: str) -> None:
    """A new login for every member of ``family``; the daemon is dead meanwhile."""
    access, refresh, expires = fake.issue_tokens(lifetime=LIFETIME)
    for agent, profile in FAMILIES[family]:
        doc = json.loads(paths[agent].read_bytes())
        doc["profiles"][profile] = qwen_profile(access, refresh, expires)
        write_atomically(paths[agent], openclaw_json(doc))


def family_tokens(paths: dict[str, Path]) -> dict[str, list[str]]:
    docs = {agent: json.loads(path.read_bytes()) for agent, path in paths.items()}
    return {family: [docs[a]["profiles"][p]["refresh"] for a, p in members]
            for family, members in FAMILIES.items()}


def quiesce(fake: FakeQwen, delays_injected: int) -> None:
    """Let the server finish every request the dead daemon left in flight."""
    wait_for(lambda: sum(1 for r in fake.refresh_requests() if r.fault == "delay")
             >= delays_injected, 10, "delayed requests to finish")
    count, stable_since = len(fake.requests), time.monotonic()
    while time.monotonic() - stable_since < 0.15:
        time.sleep(0.02)
        if len(fake.requests) != count:
            count, stable_since = len(fake.requests), time.monotonic()


@pytest.mark.timeout(420)
def test_kill9_loses_nothing_it_had_read(oc: OpenClawHome, long_run: bool,
                                         figures: Figures) -> None:
    kills = LONG_KILLS if long_run else CI_KILLS
    rng = random.Random(9)
    fake = FakeQwen(FakeQwenConfig(lifetime=LIFETIME)).start()
    paths = seed(oc, fake)
    locks = {agent: Path(str(path.resolve()) + ".lock") for agent, path in paths.items()}
    journal = oc.our_state / "journal.json"
    monitor = Monitor(paths, journal)
    monitor.start()
    outputs: list[str] = []
    tracebacks = 0
    moments: dict[str, int] = {}
    strategies: dict[str, int] = {}
    lost: dict[str, dict[str, Any]] = {}  # lost refresh token -> details
    leftovers: set[Path] = set()
    delays_injected = 0
    journal_replays = 0
    left_behind: set[tuple[Path, LockState]] = set()
    empty_locks = 0
    started = time.monotonic()
    try:
        for _ in range(kills):
            left = {p: lock_state(p) for p in locks.values()}  # what earlier kills left
            daemon = Daemon(oc, fake, *DAEMON_ARGS)
            monitor.restarted(daemon.started_at)
            strategy = rng.choice(STRATEGIES)
            strategies[strategy] = strategies.get(strategy, 0) + 1
            try:
                if strategy == "in_flight":
                    delay = rng.uniform(0.1, 0.5)
                    fake.inject("delay", delay=delay)
                    delays_injected += 1
                    wait_for(lambda: not fake.pending_faults, PROGRESS_S, "a request in flight",
                             daemon)
                    time.sleep(rng.uniform(0.0, delay + 0.05))
                elif strategy == "after_response":
                    before = len(fake.refresh_requests())
                    wait_for(lambda: len(fake.refresh_requests()) > before, PROGRESS_S,
                             "a refresh answered", daemon, interval=0.001)
                    time.sleep(rng.uniform(0.0, 0.02))
                elif strategy == "holding_lock":
                    mine = f'"pid": {daemon.pid}'.encode()
                    wait_for(lambda: any(held_by(p, mine) for p in locks.values()),
                             PROGRESS_S, "a store lock taken", daemon, interval=0.0005)
                elif strategy == "taking_lock":
                    # The moment a lock file appears (its pid maybe not written yet).
                    wait_for(lambda: any(lock_state(p) != left[p] for p in locks.values()),
                             PROGRESS_S, "a store lock being taken", daemon, interval=0.0002)
                else:
                    time.sleep(rng.uniform(0.0, 2.0))
            finally:
                kill_at = daemon.kill()
            outputs.append(daemon.output)
            tracebacks += daemon.tracebacks()[0]
            journal_replays += daemon.count("journal_replay")
            quiesce(fake, delays_injected)
            monitor.scan()
            # -- what the kill left behind
            for lock in locks.values():
                state = lock_state(lock)
                if state is not None and (lock, state) not in left_behind:
                    left_behind.add((lock, state))
                    monitor.note_dead_lock(lock, state)
                    # Killed between creating the lock and writing its pid: only its age
                    # (OpenClaw's 30 s) can tell it is abandoned.
                    empty_locks += not state[2]
            leftovers |= set(temp_leftovers(oc.our_state, *(p.parent for p in paths.values())))
            successors = successor_map(fake.issued)
            on_disk = {t for ts in family_tokens(paths).values() for t in ts}
            in_journal = journal_tokens(journal)
            for family, tokens in family_tokens(paths).items():
                ends = {chain_from(t, successors)[-1] for t in tokens}
                assert len(ends) == 1, f"family {family} members are on two lineages"
                newest = ends.pop()
                if all(t == newest for t in tokens):
                    moment = "settled" if newest not in in_journal else "written_not_settled"
                elif newest in in_journal:
                    moment = "journaled_not_written"
                elif newest in on_disk:
                    moment = "partly_written"  # some members hold it, the journal does not
                else:
                    issued = next(i for i in fake.issued if i.refresh_token == newest)
                    seen = monitor.ever_seen(newest)
                    moment = "lost_after_journal" if seen else "lost_before_read"
                    lost[newest] = {
                        "family": family, "after": seen is not None, "strategy": strategy,
                        "issued_minus_kill_ms": round((issued.at - kill_at) * 1000, 1),
                        "seen_in": seen[0] if seen else None,
                        "seen_minus_kill_ms": round((seen[1] - kill_at) * 1000, 1)
                        if seen else None,
                        "stores_hold": [chain_from(t, successors).index(newest) * -1
                                        if newest in chain_from(t, successors) else None
                                        for t in tokens],
                        "journal_entries": len(in_journal)}
                    reseed(paths, fake, family)
                moments[moment] = moments.get(moment, 0) + 1
        # -- the last run: let it settle, then look at everything
        final = Daemon(oc, fake, *DAEMON_ARGS)
        monitor.restarted(final.started_at)

        def settled() -> bool:
            """Every family rotated by the last run (so past any lock a kill left behind),
            every member on the family's newest token, live at the server."""
            issued = {i.refresh_token: i for i in fake.issued}
            for tokens in family_tokens(paths).values():
                token = tokens[0]
                if len(set(tokens)) != 1 or not live_at_fake(fake, token) \
                        or issued[token].via != "refresh" \
                        or issued[token].at < final.started_at:
                    return False
            return True

        wait_for(settled, PROGRESS_S, "every family rotated on a live token", final)
        # The journal holds tokens only until every member has them: with every family on
        # its newest token, it must empty (give an in-flight rotation time to settle).
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not journal_tokens(journal), 5, "an empty journal")
        journal_left = journal_tokens(journal)
        metrics = final.http_get("/metrics")[1]
        texts = status_outputs(oc)
        assert final.stop() == 0
        outputs.append(final.output)
        tracebacks += final.tracebacks()[0]
        journal_replays += final.count("journal_replay")
    finally:
        monitor.stop()
        fake.stop()
    elapsed = time.monotonic() - started

    # -- accounting over every token the server issued
    final_tokens = {t for ts in family_tokens(paths).values() for t in ts}
    consumed = {i.replaced for i in fake.issued if i.replaced is not None}
    orphans = {i.refresh_token for i in fake.issued if i.via == "refresh"
               and i.refresh_token not in consumed and i.refresh_token not in final_tokens}
    lost_after = [t for t, d in lost.items() if d["after"]]
    # The signature of the takeover race: a family of the shared store, its token journaled,
    # and its store back on the token before it (the other family wrote an older snapshot).
    race = [t for t in lost_after if lost[t]["family"] in SHARED_STORE_FAMILIES
            and lost[t]["stores_hold"] == [-1] * len(FAMILIES[lost[t]["family"]])]
    window = [d["issued_minus_kill_ms"] for d in lost.values() if not d["after"]]
    blocked = round(max(monitor.blocked_for + monitor.still_blocked(time.time()), default=0.0), 3)
    results = {
        "kills": kills,
        "elapsed_s": round(elapsed, 1),
        "strategies": strategies,
        "kill_moments": moments,
        "rotations_issued": sum(1 for i in fake.issued if i.via == "refresh"),
        "store_reads": monitor.reads,
        "store_parse_failures": len(monitor.parse_failures),
        "lost_before_response_read": len(lost) - len(lost_after),
        "lost_before_read_issued_minus_kill_ms": {
            "min": min(window, default=None), "median": percentile(window, 0.5),
            "max": max(window, default=None),
            "issued_before_kill": sum(1 for w in window if w < 0)},
        "lost_after_response_read": len(lost_after),
        "lost_after_by_stale_lock_takeover_race": len(race),
        "lost_after_details": [d for d in lost.values() if d["after"]][:10],
        "unexplained_orphans": len(orphans - set(lost)),
        "journal_replays": journal_replays,
        "lock_files_left_by_kills": len(left_behind),
        "empty_lock_files_left_by_kills": empty_locks,
        "lock_blocked_max_s": blocked,
        "temp_files_left_by_kills": len(leftovers),
        "temp_files_remaining_at_end": len(temp_leftovers(
            oc.our_state, *(p.parent for p in paths.values()))),
        "journal_entries_at_end": len(journal_left),
        "reuse_count": fake.reuse_count,
    }
    figures("kill9", results)

    assert monitor.parse_failures == [], monitor.parse_failures[:5]
    unexplained_after = len(lost_after) - (len(race) if KNOWN_TAKEOVER_RACE else 0)
    assert unexplained_after == 0, f"{unexplained_after} tokens lost after the daemon had them"
    # Some members on the newest token, others not, and no journal entry to finish the job:
    # the next run could not tell the lagging members' consumed token from a live one.
    assert moments.get("partly_written", 0) == 0, "a rotation half written and not journaled"
    assert results["unexplained_orphans"] == 0, "issued tokens vanished unexplained"
    assert fake.reuse_count == 0, "a consumed refresh token was sent again"
    # A lock with a dead pid is taken over at once; an empty one (killed between creating
    # and writing it) at OpenClaw's stale time, plus our lock back-off (at most 1 s) and, if
    # it went stale while no daemon ran, the next daemon's start-up.
    assert blocked < OPENCLAW_STALE_SECONDS + 5, f"a dead daemon's lock blocked for {blocked}s"
    # Since c233175 a lock is linked into place with its content: a kill leaves a lock with a
    # dead pid (taken over at once) or none, never an empty one (30 s for everyone).
    assert empty_locks == 0, f"{empty_locks} empty lock files left by kills"
    remaining = {agent: lock.read_text(errors="replace") for agent, lock in locks.items()
                 if lock.exists()}
    assert remaining == {}, (f"locks outlived a clean stop (final daemon pid {final.pid}): "
                             f"{remaining}")
    stranded = sum(1 for t in journal_left if t not in final_tokens and t not in consumed)
    assert stranded == 0, f"{stranded} live tokens exist only in the journal"
    assert len(journal_left) == 0, (f"{len(journal_left)} journal entries outlived their "
                                    "rotation (tokens kept on disk after every store had them)")
    assert journal_replays > 0 or "journaled_not_written" not in moments, \
        "tokens were journaled before a kill but the next run did not replay them"
    assert tracebacks == 0, "an unexpected exception was logged"
    assert_no_leaks([*outputs, *texts, metrics], fake_secrets(fake))


# -- crash-recovery hygiene, deterministically --------------------------------------------------


def _rotate_at_fake(fake: FakeQwen, refresh: str) -> tuple[str, str, int]:
    """One real refresh, as the killed daemon would have done it."""
    with QwenOAuthClient(fake.token_url, fake.device_code_url, QWEN_CLIENT_ID) as client:
        grant = client.refresh(refresh)
    assert grant.refresh_token is not None
    return grant.access_token, grant.refresh_token, int((time.time() + grant.expires_in) * 1000)


@pytest.mark.timeout(60)
def test_a_journal_entry_already_in_every_store_is_settled(oc: OpenClawHome) -> None:
    """The state a kill leaves between the last store write and ``journal.settle``.

    Found by the kill -9 suite: such an entry used to stay in journal.json forever (engine.py
    settled only what it had just rotated or re-applied), keeping a consumed refresh token and
    a still-valid access token on disk and replaying them at every start. Fixed in 94fd15a.
    """
    with FakeQwen(FakeQwenConfig(lifetime=2.0)) as fake:
        access0, refresh0, expires0 = fake.issue_tokens(lifetime=2.0)
        access1, refresh1, expires1 = _rotate_at_fake(fake, refresh0)
        path = oc.write_store({"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(access1, refresh1, expires1)}})
        salt = load_salt(oc.our_state)
        Journal(oc.our_state).record(
            fingerprint(refresh0, salt), fingerprint(refresh1, salt),
            Credentials(access=access1, refresh=refresh1, expires_ms=expires1),
            [ProfileKey(path, "qwen-portal:default")])
        journal = oc.our_state / "journal.json"
        with Daemon(oc, fake, "--margin", "1.5", "--jitter", "0") as daemon:
            daemon.wait_event("journal_replay")
            wait_for(lambda: len(fake.refresh_requests()) >= 1, 15, "the next rotation", daemon)
            wait_for(lambda: refresh1 not in path.read_text(), 5, "the rotation on disk", daemon)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not journal.exists(), 3, "the journal emptied")
        left = len(journal_tokens(journal))
        assert fake.reuse_count == 0
        assert left == 0, (f"{left} journal entries (a consumed refresh token and a "
                                "still-valid access token) outlived their rotation")


@pytest.mark.timeout(60)
def test_temp_files_of_an_interrupted_write_are_removed(oc: OpenClawHome) -> None:
    """Found by the kill -9 suite: ``atomic_write``'s temporary files (``.<name>.<hex>.tmp``,
    each a copy of the tokens) left by a kill were never removed. Fixed in 94fd15a."""
    with FakeQwen(FakeQwenConfig(lifetime=2.0)) as fake:
        access, refresh, expires = fake.issue_tokens(lifetime=2.0)
        doc = {"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(access, refresh, expires)}}
        path = oc.write_store(doc)
        oc.our_state.mkdir(parents=True, mode=0o700)
        # Exactly the names atomic_write gives its temporary files, an hour old.
        orphans = [path.parent / f".{path.name}.0123456789ab.tmp",
                   oc.our_state / ".journal.json.0123456789ab.tmp"]
        for orphan in orphans:
            orphan.write_bytes(openclaw_json(doc))
            orphan.chmod(0o600)
            old = time.time() - 3600
            os.utime(orphan, (old, old))
        with Daemon(oc, fake, "--margin", "1.5", "--jitter", "0") as daemon:
            wait_for(lambda: refresh not in path.read_text(), 15, "a rotation on disk", daemon)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not any(o.exists() for o in orphans), 3, "the leftovers gone")
        left = [o.name for o in orphans if o.exists()]
        assert left == [], "temporary files with tokens in them were left behind"


TAKEOVERS = 100


@pytest.mark.timeout(60)
def test_a_stale_lock_is_taken_over_by_one_contender_only(tmp_path: Path) -> None:
    """Four workers of one daemon (families of one store) meet a dead daemon's lock.

    Before the fix (``FileLock`` read a stale lock, then unlinked the *path*, which by then
    could hold another worker's fresh lock) 5-35% of such takeovers ended with two holders;
    100 tries made a pass by luck (about 0.92**100) negligible. Now threads of one process
    share a per-path mutex and processes take over under a directory flock with
    rename-and-verify; ``tests/adversarial/test_locks.py`` runs 16 processes at it.
    """
    lock_path = tmp_path / "auth-profiles.json.lock"
    dead = subprocess.Popen(["true"])
    dead.wait()
    overlaps = 0
    for _ in range(TAKEOVERS):
        lock_path.write_text(json.dumps({"pid": dead.pid,
                                         "createdAt": "2026-01-01T00:00:00.000Z"}, indent=2))
        holders: list[int] = []
        most = [0]
        guard = threading.Lock()
        start = threading.Barrier(4)

        def worker() -> None:
            lock = FileLock(lock_path, OPENCLAW, timeout=10)
            start.wait()
            lock.acquire()
            with guard:
                holders.append(1)
                most[0] = max(most[0], len(holders))
            time.sleep(0.005)
            with guard:
                holders.pop()
            lock.release()

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        overlaps += most[0] > 1
    assert overlaps == 0, f"two holders at once in {overlaps} of {TAKEOVERS} takeovers"
