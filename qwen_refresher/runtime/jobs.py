"""The one caller of APScheduler: every job the daemon runs is added, moved or removed here.

Three kinds of job, on three pools: a family's refresh (``refresh:<first member>``, the
default pool of ``max_concurrent_refreshes`` workers), store scans and the sweep (``io``),
and on_rotate attempts (``hooks``: a hung gateway never takes a refresh worker). Adding a
job never fails the caller: a scheduler that is stopping raises, and shutdown re-plans
nothing.

Families wait in our own timetable (``_Timetable``), not as one APScheduler job each: a
``Job`` costs ~650 bytes and ~140 µs to add (its callable's signature is inspected every
time), which at 2,000 families was a quarter of start-up and over a megabyte of an idle
daemon. One APScheduler job (``DUE``, on its own one-thread pool) fires at the earliest due
time and hands every family due by then to the default pool as an ordinary job, so a
refresh still runs, coalesces and is counted exactly as before; only the wait is ours.

A family handed over is *queued* until a worker starts it (``_queued``). While it is, another
hand-over adds nothing: the queued run reads the family's plan when it starts. Without that, a
busy machine (a storm paced at 10/s, the gateway writing its stores meanwhile, each write a
re-plan to "now") piled up an instance per re-plan, up to ``JOB_INSTANCES`` per family, then
"skipped: maximum number of running instances" warnings: memory and worker time for no-ops.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
import time
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
#: The job that hands due families to the refresh pool (``Jobs._dispatch``).
DUE = "due"
#: A family re-planned within this of the time it already waits for keeps its place.
SAME_TIME = 0.05
#: How long a hand-over is trusted to be queued. Past this, a re-plan hands over again (one
#: run too many returns at once), and a quiet rescan counts the family as an orphan: a mark
#: that outlived its job by some path nobody foresaw delays the family, never stops it. A
#: storm at the default 10/s drains 2,000 families in 200 s.
QUEUED_TRUST = 600.0


def hook_job_id(family_id: str, generation: int) -> str:
    return f"hook:{family_id}:{generation}"


class _Timetable:
    """Families waiting for their due time: job id -> (run at, what to run), and a heap of
    (run at, job id) to find the earliest. A re-plan pushes a new heap entry and leaves the
    old one behind (it no longer matches the dict, and is skipped when it comes up); the heap
    is rebuilt when such leftovers outnumber the live entries, so it stays bounded by the
    number of families. Not thread-safe: ``Jobs`` holds its lock around every call."""

    __slots__ = ("due", "heap")

    def __init__(self) -> None:
        self.due: dict[str, tuple[float, Callable[[str], None]]] = {}
        self.heap: list[tuple[float, str]] = []

    def put(self, job_id: str, run_at: float, run: Callable[[str], None]) -> None:
        self.due[job_id] = (run_at, run)
        heapq.heappush(self.heap, (run_at, job_id))
        if len(self.heap) > 2 * len(self.due) + 64:
            self.heap = [(at, jid) for jid, (at, _) in self.due.items()]
            heapq.heapify(self.heap)

    def first(self) -> float | None:
        """The earliest due time waiting (leftovers on top are dropped on the way)."""
        heap, due = self.heap, self.due
        while heap:
            at, job_id = heap[0]
            entry = due.get(job_id)
            if entry is not None and entry[0] == at:
                return at
            heapq.heappop(heap)
        return None

    def take_due(self, now: float) -> list[tuple[str, float, Callable[[str], None]]]:
        """Remove and return every family due by ``now``, earliest first."""
        taken = []
        while (at := self.first()) is not None and at <= now:
            _, job_id = heapq.heappop(self.heap)
            _, run = self.due.pop(job_id)
            taken.append((job_id, at, run))
        return taken


class Jobs:
    def __init__(self, max_concurrent_refreshes: int) -> None:
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_concurrent_refreshes),
                       "io": ThreadPoolExecutor(2), "hooks": ThreadPoolExecutor(2),
                       # A one-thread pool of its own: a long sweep on ``io`` never holds up
                       # the hand-over of due families.
                       "due": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        #: Guards ``_waiting`` and orders family moves against the hand-over; taken before
        #: APScheduler's own lock, never inside one of its callbacks.
        self._lock = threading.Lock()
        self._waiting = _Timetable()
        #: When ``DUE`` fires now (None: not armed), to skip asking APScheduler per re-plan.
        self._armed: float | None = None
        #: Families handed over whose run has not started (a job waiting in APScheduler's
        #: store or in the pool's queue). Its own lock, held for nothing but the set: the
        #: run's first step takes it on a worker thread, whatever else holds ``_lock``.
        self._queued: dict[str, float] = {}  # job id -> when marked (monotonic)
        self._queued_lock = threading.Lock()

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
        """(Re)schedule a family's job; one already due within ``SAME_TIME`` of it is left
        alone.

        A family due later waits in the timetable; one due now (or handed over already and
        not yet started) is an APScheduler job on the refresh pool. A run in progress is no
        reason to wait: a job that fires meanwhile returns at once (``Daemon._run_family``),
        and the running one re-plans the family when it ends.
        """
        with self._lock:
            job = self.scheduler.get_job(job_id)
            if job is not None and job.next_run_time is not None:
                if abs(job.next_run_time.timestamp() - run_at) < SAME_TIME:
                    return
                if run_at <= time.time() and \
                        self._move(job, self._start, (job_id, run), _utc(run_at)):
                    return
                self._unqueue(job_id)  # handed over too early now: back to waiting
            if run_at <= time.time():
                self._waiting.due.pop(job_id, None)
                if self._is_queued(job_id):
                    return  # a run is queued already: it plans from the family as it is
                self._hand_over(job_id, run_at, run)
                return
            waiting = self._waiting.due.get(job_id)
            if waiting is not None and waiting[1] == run and abs(waiting[0] - run_at) < SAME_TIME:
                return
            self._waiting.put(job_id, run_at, run)
            self._arm()

    def _hand_over(self, job_id: str, run_at: float, run: Callable[[str], None]) -> None:
        # Marked before the job exists: a worker may start it before ``add_job`` returns.
        with self._queued_lock:
            self._queued[job_id] = time.monotonic()
        try:
            # Named after what it runs (``Daemon._run_family``), as logs and tests know it.
            self.scheduler.add_job(self._start, "date", run_date=_utc(run_at), id=job_id,
                                   args=[job_id, run], replace_existing=True,
                                   max_instances=JOB_INSTANCES,
                                   name=getattr(run, "__qualname__", "family"))
        except Exception:  # a scheduler stopping: shutdown re-plans nothing
            with self._queued_lock:
                self._queued.pop(job_id, None)

    def _is_queued(self, job_id: str) -> bool:
        with self._queued_lock:
            marked = self._queued.get(job_id)
        return marked is not None and time.monotonic() - marked < QUEUED_TRUST

    def _start(self, job_id: str, run: Callable[[str], None]) -> None:
        """A handed-over family's run, on a worker: no longer queued from its first step, so
        a re-plan from here on hands over a run of its own (which returns at once while this
        one runs; this one re-plans the family at its end)."""
        with self._queued_lock:
            self._queued.pop(job_id, None)
        run(job_id)

    def _unqueue(self, job_id: str) -> None:
        """Remove a handed-over family's job that has not started. Unmarked even if it had
        left APScheduler's store for the pool meanwhile (it then still runs): a mark left on a
        family whose job is gone would keep every later hand-over out, and the family would
        never run again; one run too many only returns at once or finds nothing due."""
        self.remove_job(job_id)
        with self._queued_lock:
            self._queued.pop(job_id, None)

    def _arm(self) -> None:
        """Point ``DUE`` at the earliest time waiting (under ``_lock``)."""
        first = self._waiting.first()
        if first == self._armed:
            return
        job = self.scheduler.get_job(DUE)
        self._armed = None
        if first is None:
            if job is not None:
                self.remove_job(DUE)
            return
        if job is not None and self._move(job, self._dispatch, (), _utc(first)):
            self._armed = first
            return
        with contextlib.suppress(Exception):
            # More than one instance allowed: a hand-over still running when its successor
            # comes due must not make APScheduler skip (and so drop) a one-shot ``DUE``.
            self.scheduler.add_job(self._dispatch, "date", run_date=_utc(first), id=DUE,
                                   replace_existing=True, executor="due",
                                   max_instances=JOB_INSTANCES)
            self._armed = first

    def _dispatch(self) -> None:
        """``DUE`` fired: every family due by now becomes a job of the refresh pool, and
        ``DUE`` waits for the next one."""
        with self._lock:
            self._armed = None  # this run was it: a one-shot job is gone once it fired
            for job_id, run_at, run in self._waiting.take_due(time.time() + SAME_TIME):
                self._hand_over(job_id, run_at, run)
            self._arm()

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
        """A family's job (waiting or handed over), a scan's or a hook's: gone."""
        with self._lock:
            if self._waiting.due.pop(job_id, None) is not None:
                self._arm()
            self._unqueue(job_id)

    def remove_job(self, job_id: str) -> None:
        with contextlib.suppress(Exception):
            self.scheduler.remove_job(job_id)

    def scheduled(self) -> set[str]:
        """Every job id waiting now, families queued for a worker included (empty if the
        scheduler cannot say)."""
        with self._lock:
            waiting = set(self._waiting.due)
        now = time.monotonic()
        with self._queued_lock:
            waiting |= {j for j, marked in self._queued.items() if now - marked < QUEUED_TRUST}
        with contextlib.suppress(Exception):
            return waiting | {job.id for job in self.scheduler.get_jobs() if job.id != DUE}
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
        self.remove_job(hook_job_id(family_id, generation))

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


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)
