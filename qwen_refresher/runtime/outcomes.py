"""An engine ``Outcome`` -> each member's runtime record, one log event, metric labels.

Small functions, one per concern: ``record`` (attempts, retry times, idle and revert
bookkeeping, under the memory lock), ``log_outcome`` (one event per result), ``metric_labels``
(the result and failure labels Prometheus counts). The kind of a failure is the type the
engine put in ``Outcome.failure`` (``errors.py``: each kind carries its metric label), never
the text of its message.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .. import errors
from ..engine import Member, Outcome
from ..escape import shell_join
from ..logsetup import REDACTOR
from ..models import ProfileKey
from ..planner import backoff_delay
from .inventory import REDACT_GRACE
from .memory import Family, Memory

if TYPE_CHECKING:
    from ..config import Settings
    from ..protocols import Logger, MetricsSink

#: Results that leave the family's tokens good: the failure streak ends.
SUCCESS = frozenset({"rotated", "synced", "adopted"})
#: Outcomes that leave a due family done, for ``run --once``'s count and exit code.
ONCE_SUCCESS = SUCCESS | {"not_due"}
#: Results that changed nothing lasting: a run planned "now" again backs off (``families``).
IDLE = frozenset({"not_due", "synced"})
#: After this many idle runs in a row the daemon says so (once per streak).
IDLE_WARN_AFTER = 5


def failure_label(outcome: Outcome) -> str:
    """The metric label of a failed refresh: its kind's (``Outcome.failure.metric_label``).

    Every failed outcome the engine and this module produce carries its kind; "other" is
    left for one that would not, so that it is still counted.
    """
    return errors.OTHER if outcome.failure is None else outcome.failure.metric_label


def metric_labels(outcome: Outcome) -> tuple[str, str | None] | None:
    """(result, failure label) to count, or None: a run that was not due is not a refresh."""
    if outcome.result == "not_due":
        return None
    return outcome.result, (None if outcome.result in SUCCESS else failure_label(outcome))


def record(memory: Memory, family: Family, keys: list[ProfileKey], outcome: Outcome, *,
           now: float, retry_max: float) -> int:
    """Update the members' runtime records; the caller holds ``memory.lock``. Returns the
    family's idle streak (runs in a row that changed nothing lasting)."""
    for key in keys:
        rt = memory.runtime[key]
        if rt.state == "refreshing":
            rt.state = "ok"
    idle = 0
    if outcome.result in IDLE:
        idle = memory.idle_runs[family.id] = memory.idle_runs.get(family.id, 0) + 1
    else:
        memory.idle_runs.pop(family.id, None)
    if outcome.result in ONCE_SUCCESS:
        _record_success(memory, family, keys, outcome, now)
    elif outcome.result == "rejected":
        for key in keys:
            memory.runtime[key].retry_at = None
            memory.runtime[key].last_error = outcome.reason
    else:
        attempts = max(memory.runtime[k].attempts for k in keys) + 1
        # Retry-After never pushes the retry past the token's expiry (nor retry_max).
        delay = backoff_delay(attempts, cap=retry_max, retry_after=outcome.retry_after,
                              expires_in=(outcome.creds.expires_at - now
                                          if outcome.creds is not None else None))
        for key in keys:
            rt = memory.runtime[key]
            rt.attempts, rt.retry_at, rt.last_error = attempts, now + delay, outcome.reason
    if outcome.result == "synced" and outcome.reapplied:
        revert = memory.reverts[outcome.fp or family.head]
        revert.count, revert.last = revert.count + 1, now
    return idle


def _record_success(memory: Memory, family: Family, keys: list[ProfileKey],
                    outcome: Outcome, now: float) -> None:
    for key in keys:
        rt = memory.runtime[key]
        if key in outcome.errors:
            continue
        if outcome.result == "rotated":
            rt.last_refresh_at = now
        rt.attempts, rt.retry_at, rt.last_error = 0, None, None
    if outcome.result == "rotated":
        memory.reverts.pop(family.head, None)


def record_crash(memory: Memory, family: Family | None, keys: set[ProfileKey], *, now: float,
                 retry_max: float, reason: str) -> tuple[set[ProfileKey], float]:
    """A family job that raised backs off like after a network error: (its live members,
    the delay). The caller holds ``memory.lock``."""
    if family is not None:
        keys = keys | set(family.keys)
    keys = {k for k in keys if k in memory.views}
    attempts = max((memory.runtime[k].attempts for k in keys), default=0) + 1
    delay = backoff_delay(attempts, cap=retry_max,
                          expires_in=(family.creds.expires_at - now
                                      if family is not None else None))
    for key in keys:
        rt = memory.runtime[key]
        if rt.state == "refreshing":
            rt.state = "ok"
        rt.attempts, rt.retry_at, rt.last_error = attempts, now + delay, reason
    return keys, delay


def log_outcome(log: Logger, members: list[Member], outcome: Outcome, *, state_dir: Path,
                retry_in: float | None) -> None:
    """One log event for one outcome (``not_due`` says nothing)."""
    names = [f"{m.store.describe()}#{m.profile}" for m in members]
    result = outcome.result
    if outcome.journal_error is not None:
        log.error("journal_write_failed", error=outcome.journal_error,
                  message="rotated tokens could not be journaled; they live only in "
                          "memory until every store is written")
    if result == "rotated":
        expires = (datetime.fromtimestamp(outcome.creds.expires_at, UTC).isoformat()
                   if outcome.creds else None)
        log.info("rotated", profiles=names, expires_at=expires,
                 took_ms=round(outcome.duration * 1000, 1))
    elif result == "synced" and outcome.reapplied:
        log.warning("revert_undone", profiles=[str(k) for k in outcome.reapplied],
                    message="a writer put a consumed refresh token back; the "
                            "newest tokens were re-applied")
    elif result == "synced":
        log.info("synced", profiles=names, message="copied the family's newest "
                 "tokens to members that lagged behind")
    elif result == "adopted":
        log.warning("adopted_descendant", profiles=names, source=outcome.reason,
                    message="another program replaced this family's refresh token "
                            "in a sibling store; the family takes that token instead "
                            "of sending its own, which may be consumed")
    elif result == "rejected":
        _log_needs_login(log, members, names, outcome)
    elif result == "write_failed":
        log.error("write_failed", profiles=names, error=outcome.reason,
                  message="new tokens are kept in the journal under "
                          f"{state_dir} and the write is retried")
    elif result != "not_due":
        log.warning("refresh_failed", profiles=names, result=result, reason=outcome.reason,
                    retry_in_s=round(retry_in, 1) if retry_in is not None else None)


def _log_needs_login(log: Logger, members: list[Member], names: list[str],
                     outcome: Outcome) -> None:
    first = members[0]
    login = shell_join(["qwen-refresher", "login", "--store", str(first.store.path),
                        "--profile", first.profile])
    others = sorted({m.store.login_command(m.profile) for m in members})
    log.error("needs_login", profiles=names, reason=outcome.reason, run=login,
              alternatives=others,
              message=f"Qwen rejected the refresh token; log in again with: "
                      f"{login} (it writes every store of the family; "
                      f"OpenClaw's own command works too, one store at a time)")


class Outcomes:
    """Applies outcomes for the daemon: records, logs, metrics. ``settings`` and ``metrics``
    are read at each use, so a reload changes them."""

    def __init__(self, memory: Memory, *, log: Logger, settings: Callable[[], Settings],
                 metrics: Callable[[], MetricsSink | None]) -> None:
        self.memory = memory
        self.log = log
        self._settings = settings
        self._metrics = metrics

    def apply(self, family: Family, members: list[Member], outcome: Outcome) -> None:
        now = time.time()
        labels = metric_labels(outcome)
        metrics = self._metrics()
        if metrics is not None and labels is not None:
            metrics.refresh_finished(labels[0], outcome.duration, labels[1])
        if outcome.creds is not None and outcome.fp is not None:
            REDACTOR.add(outcome.creds.access, outcome.creds.refresh,
                         until=outcome.creds.expires_at + REDACT_GRACE)
        settings = self._settings()
        with self.memory.lock:
            idle = record(self.memory, family, [m.key for m in members], outcome, now=now,
                          retry_max=settings.retry_max)
            first = self.memory.runtime[members[0].key] if members else None
            retry_in = (first.retry_at or now) - now if first is not None else None
        if idle == IDLE_WARN_AFTER:
            self.log.warning(
                "no_progress", profiles=[f"{m.store.describe()}#{m.profile}" for m in members],
                result=outcome.result, runs=idle,
                message="this family was run again and again without a refresh; "
                        "runs are now spaced out (see qwen-refresher status)")
        log_outcome(self.log, members, outcome, state_dir=settings.state_dir,
                    retry_in=retry_in)

    def crashed(self, family: Family | None, keys: set[ProfileKey], exc: Exception, *,
                first: bool) -> Outcome:
        """Turn an unexpected exception in a family job into a transient failure.

        Without this, one exception (a bug, or hostile input nobody foresaw) would leave the
        family "refreshing" with no job: never refreshed again until a sweep happened to
        re-plan it, and in ``run --once`` it would abort every other family too. The
        traceback is logged (redacted, like every log line) once per streak of the same
        crash (``first``): a bug that fires at every retry says so once, then one line per
        retry.
        """
        name = type(exc).__name__
        reason = f"internal error ({name}); retrying"
        outcome = Outcome.failed(errors.InternalError(reason))
        with self.memory.lock:
            keys, delay = record_crash(self.memory, family, keys, now=time.time(),
                                       retry_max=self._settings().retry_max, reason=reason)
        profiles = sorted(str(k) for k in keys)
        if first:
            self.log.error("refresh_crashed", profiles=profiles, error=f"{name}: {exc}",
                           retry_in_s=round(delay, 1), exc_info=exc,
                           message="an unexpected error ended this refresh; it is retried "
                                   "with backoff, other profiles are not affected. Please "
                                   "report it with this traceback")
        else:
            self.log.warning("refresh_failed", profiles=profiles, result="transient",
                             reason=reason, retry_in_s=round(delay, 1))
        metrics = self._metrics()
        if metrics is not None:
            with contextlib.suppress(Exception):
                metrics.refresh_finished(outcome.result, 0.0, failure_label(outcome))
        return outcome
