"""Telling the gateway (``on_rotate``) of each rotation, and telling it again until it hears.

Until the hook succeeds the gateway holds the consumed token, and once its old access token
expires it sends that token: a lock-out. So a failed hook is retried with backoff
(``HOOK_RETRY_CAP``) until it succeeds or a newer rotation of the family takes its place; it
never causes another refresh. Episodes survive a restart through ``state.json``
(``resume``). Retries are scheduler jobs, asked of the daemon through ``HookJobs``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..config import Settings
from ..engine import Member, Outcome
from ..hooks import HookResult, on_rotate_variables, resolve_on_rotate, run_hook
from ..logsetup import REDACTOR
from ..models import ProfileKey
from ..planner import exponential_jitter
from ..protocols import Logger
from ..state import HookStatus
from .memory import Family, Memory

#: The longest wait between two tries of a failed ``on_rotate``: 1-2 s, 2-3 s, 4-5 s... never
#: more than this. The gateway keeps the consumed token until it is told, and once the old
#: access token expires it sends that token and locks the user out: the margin must exceed it.
HOOK_RETRY_CAP = 60.0


def hook_retry_delay(failures: int) -> float:
    """Seconds before retrying a hook that failed ``failures`` times in a row (exponential
    with jitter, capped: tenacity's ``wait_exponential_jitter``, computed plainly)."""
    return exponential_jitter(max(1, failures), cap=HOOK_RETRY_CAP)


class HookJobs(Protocol):
    """What this module needs of the scheduler (``jobs.Jobs``, its one caller)."""

    def hook_at(self, family_id: str, generation: int, when: float,
                attempt: Callable[[str, int], None]) -> bool:
        """Run ``attempt(family_id, generation)`` at ``when`` on the hooks pool; False if
        no scheduler runs (the caller then runs it itself)."""

    def cancel_hook(self, family_id: str, generation: int) -> None:
        """Drop that attempt if it is still waiting."""


@dataclass
class HookEpisode:
    """``on_rotate`` for one family's newest rotation, from its first run until one succeeds.

    A newer rotation of the family replaces it (``generation``): the retry then carries the
    newest variables, and a run of the old one that finishes late is ignored.
    """

    command: str
    variables: dict[str, str]
    secrets: tuple[str, ...]
    keys: list[ProfileKey]
    generation: int
    last: HookResult | None = None
    last_at: float = 0.0
    failing_since: float | None = None
    failures: int = 0
    next_retry_at: float | None = None

    def status(self) -> HookStatus | None:
        """What ``state.json`` says: the last result, its output's last line (redacted)."""
        if self.last is None:
            return None
        lines = [ln.strip() for ln in self.last.output.splitlines() if ln.strip()]
        line = "".join(c if c.isprintable() else "?" for c in REDACTOR.scrub(lines[-1])) \
            if lines else ""
        if self.last.timed_out and not line:
            line = "timed out"
        return {"ok": self.last.ok, "at": self.last_at, "returncode": self.last.returncode,
                "timed_out": self.last.timed_out, "output": line[:300],
                "failing_since": self.failing_since, "failures": self.failures,
                "next_retry_at": self.next_retry_at}


class OnRotate:
    """Every family's on_rotate episode (the last result stays after a success)."""

    def __init__(self, memory: Memory, *, log: Logger, settings: Callable[[], Settings],
                 jobs: HookJobs, stop: threading.Event, publish: Callable[[], None]) -> None:
        self.memory = memory
        self.log = log
        self._settings = settings
        self._jobs = jobs
        self._stop = stop
        self._publish = publish
        self.episodes: dict[str, HookEpisode] = {}
        #: profile -> the failing on_rotate the previous run left, until ``resume``
        self.pending: dict[ProfileKey, HookStatus] = {}

    def rotated(self, family: Family, members: list[Member], outcome: Outcome) -> None:
        """A rotation (or sync) was written: start a new episode for the family."""
        command = resolve_on_rotate(self._settings().on_rotate)
        if command is None or outcome.creds is None:
            return
        written = [(m.store, m.profile) for m in members if m.key in outcome.written]
        variables = on_rotate_variables(outcome.result, written, outcome.creds)
        with self.memory.lock:
            previous = self.episodes.get(family.id)
            episode = HookEpisode(command, variables,
                                  (outcome.creds.access, outcome.creds.refresh),
                                  [m.key for m in members],
                                  previous.generation + 1 if previous is not None else 1)
            if previous is not None:
                # Superseded: the gateway has still not been told since the first failure.
                episode.last, episode.last_at = previous.last, previous.last_at
                episode.failing_since, episode.failures = (previous.failing_since,
                                                           previous.failures)
                self._jobs.cancel_hook(family.id, previous.generation)
            self.episodes[family.id] = episode
        self.start(family.id, episode.generation)

    def resume(self) -> None:
        """Tell the gateway what the previous run could not.

        A failing ``on_rotate`` lived only in memory: after a restart the gateway would keep
        the consumed token until the next rotation, hours later, and lock itself out. So an
        episode is rebuilt for each family with a profile the previous ``state.json`` showed
        failing, with the family's current tokens and the current command, and run at once
        (then retried as before). Its profiles' rows keep the failing state until it succeeds.
        """
        pending, self.pending = self.pending, {}
        command = resolve_on_rotate(self._settings().on_rotate)
        if not pending or command is None:
            return
        started: list[tuple[str, list[str]]] = []
        memory = self.memory
        with memory.lock:
            for family in memory.families.values():
                found = [pending[k] for k in family.keys if k in pending]
                holders = [k for k in family.keys
                           if k in memory.views and memory.views[k].creds is not None]
                if not found or not holders or family.id in self.episodes:
                    continue
                creds = family.creds
                variables = on_rotate_variables(
                    "rotated", [(memory.views[k].store, k.profile) for k in holders], creds)
                newest = max(found, key=lambda h: h["at"])
                episode = HookEpisode(command, variables, (creds.access, creds.refresh),
                                      list(family.keys), 1)
                episode.last = HookResult(command, newest["returncode"], newest["output"],
                                          newest["timed_out"])
                episode.last_at = newest["at"]
                episode.failing_since = min(h["failing_since"] or newest["at"] for h in found)
                episode.failures = max(h["failures"] for h in found)
                self.episodes[family.id] = episode
                started.append((family.id, [str(k) for k in holders]))
        for family_id, names in started:
            self.log.warning("on_rotate_resumed", profiles=names,
                             message="the gateway was not told of the last rotation before "
                                     "the previous run stopped; telling it now")
            self.start(family_id, 1)

    def start(self, family_id: str, generation: int) -> None:
        """Run an episode's first attempt on the ``hooks`` pool, like its retries.

        Never on the caller's thread: that is a refresh worker, and a gateway that hangs keeps
        its hook running for ``hook_timeout``; four hung hooks would be four workers taken
        from refreshes, and other families would expire waiting. Without a running scheduler
        (``run --once``, which waits for nothing else) the hook runs here.
        """
        if not self._stop.is_set() and self._jobs.hook_at(family_id, generation, time.time(),
                                                               self.attempt):
            return
        self.attempt(family_id, generation)

    def attempt(self, family_id: str, generation: int) -> None:
        """Run one episode's hook once; on failure schedule the next try (a ``hooks`` job)."""
        with self.memory.lock:
            episode = self.episodes.get(family_id)
        if episode is None or episode.generation != generation or self._stop.is_set():
            return  # superseded (the newer rotation runs its own hook) or shutting down
        settings = self._settings()
        try:
            result = run_hook(episode.command, episode.variables,
                              timeout=settings.hook_timeout, secrets=episode.secrets,
                              runner=settings.hook_runner_argv)
        except Exception as exc:  # counted as a failed run: the episode keeps its retries
            self.log.error("on_rotate_crashed", command=episode.command,
                           error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            result = HookResult(episode.command, None, f"could not run: {type(exc).__name__}")
        now = time.time()
        with self.memory.lock:
            if self.episodes.get(family_id) is not episode:
                return  # a newer rotation's hook replaced this one while it ran
            failing_since = episode.failing_since
            episode.last, episode.last_at = result, now
            if result.ok:
                episode.failing_since, episode.failures, episode.next_retry_at = None, 0, None
            else:
                episode.failing_since = failing_since or now
                episode.failures += 1
                episode.next_retry_at = now + hook_retry_delay(episode.failures)
            status = episode.status()
        self._log_attempt(episode, result, failing_since, status, now)
        if episode.next_retry_at is not None and not result.ok and not self._stop.is_set():
            self._jobs.hook_at(family_id, generation, episode.next_retry_at, self.attempt)
        self._publish()

    def _log_attempt(self, episode: HookEpisode, result: HookResult,
                     failing_since: float | None, status: HookStatus | None,
                     now: float) -> None:
        output = status["output"] if status is not None else ""
        if result.ok and failing_since is not None:
            self.log.info("on_rotate_recovered", command=episode.command,
                          failed_for_s=round(now - failing_since, 1),
                          message="the gateway has the newest tokens again")
        elif result.ok:
            self.log.info("on_rotate_ok", command=episode.command)
        elif failing_since is None:
            # Once per episode: retries that fail again are news only when they stop failing.
            self.log.warning("on_rotate_failed", command=episode.command,
                             returncode=result.returncode, timed_out=result.timed_out,
                             output=output, message="the gateway keeps the old tokens until "
                             "this succeeds; retrying with backoff (at most 60 s apart)")

    def statuses(self) -> dict[ProfileKey, HookStatus]:
        """Each profile's last on_rotate result: that of the newest episode naming it. The
        caller holds ``memory.lock``."""
        out: dict[ProfileKey, HookStatus] = {}
        for episode in sorted(self.episodes.values(), key=lambda e: e.last_at):
            status = episode.status()
            if status is not None:
                for key in episode.keys:
                    out[key] = status
        return out

    def forget_gone(self) -> None:
        """An episode whose profiles are all gone has nobody left to tell."""
        with self.memory.lock:
            for family_id, episode in list(self.episodes.items()):
                if not any(k in self.memory.views for k in episode.keys):
                    del self.episodes[family_id]
                    self._jobs.cancel_hook(family_id, episode.generation)
