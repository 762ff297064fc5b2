"""The one caller of APScheduler: every job the daemon runs is added, moved or removed here.

Three kinds of job, on three pools: a family's refresh (``refresh:<first member>``, the
default pool of ``max_concurrent_refreshes`` workers), store scans and the sweep (``io``),
and on_rotate attempts (``hooks``: a hung gateway never takes a refresh worker). Adding a
job never fails the caller: a scheduler that is stopping raises, and shutdown re-plans
nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger

#: Instances of one scan or refresh job the scheduler may start at once: never a reason to
#: skip one. The job itself decides (``Daemon._coalesced``, ``Daemon._run_family``) what a
#: second one does.
JOB_INSTANCES = 64
SWEEP = "sweep"


def hook_job_id(family_id: str, generation: int) -> str:
    return f"hook:{family_id}:{generation}"


class Jobs:
    def __init__(self, max_concurrent_refreshes: int) -> None:
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_concurrent_refreshes),
                       "io": ThreadPoolExecutor(2), "hooks": ThreadPoolExecutor(2)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )

    @property
    def running(self) -> bool:
        return bool(self.scheduler.running)

    def start(self) -> None:
        self.scheduler.start()

    def wakeup(self) -> None:
        """Look at the due times again (after a suspend the monotonic wait can outlast a due
        time that passed in wall time)."""
        if self.scheduler.running:
            self.scheduler.wakeup()

    # -- family refreshes ---------------------------------------------------------------------
    def family_at(self, job_id: str, run_at: float, run: Callable[[str], None]) -> None:
        """(Re)schedule a family's job; a job already due within 50 ms of it is left alone.

        A run in progress is no reason to wait: a job that fires meanwhile returns at once
        (``Daemon._run_family``), and the running one re-plans the family when it ends.
        """
        job = self.scheduler.get_job(job_id)
        if job is not None and job.next_run_time is not None and \
                abs(job.next_run_time.timestamp() - run_at) < 0.05:
            return
        when = datetime.fromtimestamp(run_at, UTC)
        if job is not None and self._move(job, run, (job_id,), when):
            return
        self.scheduler.add_job(run, "date", run_date=when, id=job_id, args=[job_id],
                               replace_existing=True, max_instances=JOB_INSTANCES)

    def _move(self, job: Job, func: Callable[..., None], args: tuple[Any, ...],
              when: datetime) -> bool:
        """Give a waiting one-shot job a new run time in place; False (the caller adds it
        anew) when it is not one (or runs another function or arguments), or when it ran
        or went meanwhile.

        A re-add (``replace_existing``) builds a new ``Job``, and APScheduler then checks the
        callable's signature with ``inspect.signature`` every time (~130 µs a re-add against
        ~35 µs a move, at 2,000 jobs). Moving keeps the same function and arguments, so there
        is nothing to check. (A job that ran is gone: re-planning it is an add.)
        """
        if job.pending or not isinstance(job.trigger, DateTrigger) or job.func != func or \
                tuple(job.args) != args:
            return False
        try:
            self.scheduler.modify_job(job.id, trigger=DateTrigger(when, timezone=UTC),
                                      next_run_time=when)
        except JobLookupError:
            return False
        return True

    def remove(self, job_id: str) -> None:
        with contextlib.suppress(Exception):
            self.scheduler.remove_job(job_id)

    def scheduled(self) -> set[str]:
        """Every job id waiting now (empty if the scheduler cannot say)."""
        with contextlib.suppress(Exception):
            return {job.id for job in self.scheduler.get_jobs()}
        return set()

    # -- scans and the sweep ---------------------------------------------------------------------
    def scan_at(self, job_id: str, run_at: float | None, func: Callable[..., None],
                *args: Any) -> None:
        """A scan on the ``io`` pool, at ``run_at`` (None: now); replaces one waiting."""
        when = {"run_date": datetime.fromtimestamp(run_at, UTC)} if run_at is not None else {}
        with contextlib.suppress(Exception):
            job = self.scheduler.get_job(job_id)
            if job is not None and \
                    self._move(job, func, args, when.get("run_date") or datetime.now(UTC)):
                return
            self.scheduler.add_job(func, "date", id=job_id, args=list(args),
                                   replace_existing=True, executor="io",
                                   max_instances=JOB_INSTANCES, **when)

    def sweep_every(self, seconds: float, func: Callable[[], None]) -> None:
        self.scheduler.add_job(func, "interval", seconds=seconds, id=SWEEP, executor="io")

    def sweep_interval(self, seconds: float) -> None:
        self.scheduler.reschedule_job(SWEEP, trigger="interval", seconds=seconds)

    def next_sweep(self) -> float | None:
        sweep = self.scheduler.get_job(SWEEP) if self.scheduler.running else None
        return sweep.next_run_time.timestamp() if sweep is not None and sweep.next_run_time \
            else None

    # -- on_rotate attempts ------------------------------------------------------------------------
    def hook_at(self, family_id: str, generation: int, when: float,
                attempt: Callable[[str, int], None]) -> bool:
        """An on_rotate attempt at ``when`` on the ``hooks`` pool; False without a running
        scheduler (or one stopping meanwhile): the caller decides what then."""
        if not self.scheduler.running:
            return False
        try:
            self.scheduler.add_job(
                attempt, "date", id=hook_job_id(family_id, generation),
                run_date=datetime.fromtimestamp(when, UTC), args=[family_id, generation],
                replace_existing=True, executor="hooks")
        except Exception:
            return False
        return True

    def cancel_hook(self, family_id: str, generation: int) -> None:
        self.remove(hook_job_id(family_id, generation))

    def shutdown(self) -> None:
        """Stop for good without waiting for running jobs (the daemon waits for refreshes
        itself, with a deadline)."""
        with contextlib.suppress(Exception):
            # Paused first, and past any round of due jobs already under way (it holds the job
            # stores' lock): APScheduler flips its state to "stopped" without that lock, and
            # a due job being processed meanwhile raises JobLookupError in its thread.
            self.scheduler.pause()
            with self.scheduler._jobstores_lock:
                pass
            self.scheduler.shutdown(wait=False)
