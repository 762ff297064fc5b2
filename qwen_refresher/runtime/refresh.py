"""One family job's body: adopt an heir or run the engine, apply the outcome, re-read.

The daemon's ``_run_family`` wraps this with the scheduler side (re-planning the family when
it ends). Here: the ``running`` marks (a second instance of a job returns at once), the count
of refreshes in flight (shutdown waits for them; clients and engines a reload replaced are
closed by the last one to end), and the crash handling that keeps one family's bug from
ending its refreshes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..engine import Engine, Member, Outcome
from ..history import TokenHistory
from ..models import ProfileKey
from ..qwen import QwenOAuthClient
from ..ratelimit import RateLimiter
from . import families as plans
from .inventory import Inventory
from .memory import Family, Memory
from .onrotate import OnRotate
from .outcomes import Outcomes

#: What a reload replaces: closed (clients) or dropped (engines) once no refresh uses it.
Retired = QwenOAuthClient | Engine
#: A job may fire this much before its retry time (scheduler and clock granularity).
RETRY_EARLY_SLACK = 0.05


class Refresher:
    """Runs family jobs against the current ``engine`` (replaced by a reload)."""

    def __init__(self, memory: Memory, history: TokenHistory, *, inventory: Inventory,
                 outcomes: Outcomes, onrotate: OnRotate, limiter: RateLimiter,
                 publish: Callable[[], None], stop: threading.Event) -> None:
        self.memory = memory
        self.history = history
        self.inventory = inventory
        self.outcomes = outcomes
        self.onrotate = onrotate
        self.limiter = limiter
        self.publish = publish
        self.stop = stop
        self.engine: Engine | None = None
        #: family jobs running now: filled and emptied by the job itself (``enter``/``leave``)
        self.running: set[str] = set()
        #: family job id -> "Type: message" of its last crash, to log a traceback once a streak
        self.crashes: dict[str, str] = {}
        self.active = 0
        self.active_cv = threading.Condition()
        #: clients and engines a reload replaced while refreshes ran: closed by the last to end
        self._retired: list[Retired] = []

    # -- in flight --------------------------------------------------------------------------------
    def enter(self, job_id: str) -> bool:
        """Mark a job running; False if it already runs or we are stopping."""
        with self.memory.lock:
            if job_id in self.running:
                return False
            self.running.add(job_id)
        with self.active_cv:
            if self.stop.is_set():
                with self.memory.lock:
                    self.running.discard(job_id)
                return False
            self.active += 1
        return True

    def leave(self, job_id: str) -> None:
        with self.memory.lock:
            self.running.discard(job_id)
        retired: list[Retired] = []
        with self.active_cv:
            self.active -= 1
            if self.active == 0:
                retired, self._retired = self._retired, []
            self.active_cv.notify_all()
        _close_all(retired)

    def retire(self, *replaced: Retired) -> None:
        """Close what a reload replaced (old client, old engine) now, or, while a refresh may
        still be reading the server's answer on it (the server has already rotated: closing
        it under the request would lose the only copy of the new tokens), when the last
        refresh ends."""
        retired: list[Retired] = []
        with self.active_cv:
            self._retired.extend(replaced)
            if self.active == 0:
                retired, self._retired = self._retired, []
        _close_all(retired)

    def wait_idle(self, deadline: float) -> list[Retired]:
        """Wait (until the monotonic ``deadline``) for the refreshes in flight; returns what
        was retired, for the caller to finish."""
        with self.active_cv:
            while self.active and time.monotonic() < deadline:
                self.active_cv.wait(0.1)
            retired, self._retired = self._retired, []
        return retired

    # -- one job -----------------------------------------------------------------------------------
    def run(self, job_id: str) -> Outcome | None:
        """Refresh (or sync, or adopt for) one family; None if there was nothing to run."""
        engine = self.engine
        assert engine is not None
        with self.memory.lock:
            family = self.memory.families.get(job_id)
            if family is None:
                return None
            # A job that fires before the family's back-off has run out (a scan re-planned it
            # while the failed attempt was still running, and the job waited for a worker) must
            # not send early: the back-off and Retry-After are promises to the server. The
            # caller re-plans the family, at its retry time.
            retry_at = max((self.memory.runtime[k].retry_at or 0.0) for k in family.keys)
            if retry_at > time.time() + RETRY_EARLY_SLACK:
                return None
            members = [Member(self.memory.views[k].store, k.profile) for k in family.keys
                       if k in self.memory.views]
            # A retry after a failed refresh finds the token still due (planned is in the past);
            # a retry after a failed write finds the new token not due and only writes.
            due_at = family.planned
            adopted = self.adopt_heir(family) if time.time() >= due_at else None
            if adopted is None and time.time() >= due_at:
                for key in family.keys:
                    self.memory.runtime[key].state = "refreshing"
        if adopted is not None:
            self.apply(family, members, adopted)
            return adopted
        if time.time() >= due_at:
            self.publish()
            # The HTTP client is built on first use (``QwenOAuthClient.warm``): built here, it
            # never delays a paced send (sends queued behind its ~0.1 s build left together:
            # 10 in one second at a limit of 8), nor runs under a store lock.
            engine.client.warm()
            # A request is about to leave: wait for its slot now, holding no lock (OpenClaw's
            # lock held while we queue would stall OpenClaw). Stopping: re-planned at start.
            if not self.limiter.acquire(self.stop):
                return None
        # The slot was taken above, before any lock; ``pace`` keeps the sends themselves
        # 1 / rate apart (what the locks and re-read take in between varies with load).
        outcome = engine.run(members, due_at=due_at, planned_fp=family.head,
                             before_send=lambda: self.limiter.pace(self.stop))
        if outcome.result == "rejected":
            # Never a lost login while a store we manage holds a descendant of that token.
            adopted = self.adopt_heir(family)
            if adopted is not None:
                adopted.duration = outcome.duration
                outcome = adopted
        self.apply(family, members, outcome)
        with self.memory.lock:
            infos = [self.memory.stores.get(m.store.path) for m in members]
        for info in dict.fromkeys(i for i in infos if i is not None):
            self.inventory.read_store(info)
        return outcome

    def adopt_heir(self, family: Family) -> Outcome | None:
        """Link the family's head to the newest live token seen replacing it, if any.

        The write to the members follows at once, as a sync under every member's lock,
        because the family is regrouped around the heir and lags behind it.
        """
        with self.memory.lock:
            found = plans.find_heir(self.memory, self.history, family)
            if found is None:
                return None
            heir, where = found
            self.history.link(self.history.newest(family.head), heir)
            return Outcome("adopted", fp=heir, reason=f"held by {where}")

    def apply(self, family: Family, members: list[Member], outcome: Outcome) -> None:
        """Records, logs and metrics; then tell the gateway of tokens written."""
        self.outcomes.apply(family, members, outcome)
        if outcome.written and outcome.result in ("rotated", "synced"):
            self.onrotate.rotated(family, members, outcome)

    def crashed(self, job_id: str, keys: set[ProfileKey], exc: Exception) -> Outcome:
        """An exception in a family job: a transient failure with backoff (``Outcomes``)."""
        signature = f"{type(exc).__name__}: {exc}"
        with self.memory.lock:
            first = self.crashes.get(job_id) != signature
            self.crashes[job_id] = signature
            family = self.memory.families.get(job_id)
        return self.outcomes.crashed(family, keys, exc, first=first)

    def succeeded(self, job_id: str) -> None:
        with self.memory.lock:
            self.crashes.pop(job_id, None)


def _close_all(things: list[Retired]) -> None:
    """Close retired clients; a retired engine holds nothing once no refresh runs."""
    for thing in things:
        if isinstance(thing, QwenOAuthClient):
            thing.close()
