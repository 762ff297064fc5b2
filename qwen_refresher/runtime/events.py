"""Events -> jobs: watch events, the sweep and finished refreshes become re-plans and jobs.

A change is a store path (watchdog) or a request (a login written, a clock jump, the
sweep). It becomes a coalesced scan on the ``io`` pool (never skipped, merged while one
runs), the scan asks ``inventory`` which profiles changed, ``families`` re-plans them, and
the job changes go to ``jobs``. A family job (``run_family``) runs ``refresh`` and re-plans
its family at its end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import paths
from ..config import Settings
from ..history import TokenHistory
from ..logsetup import REDACTOR
from ..models import ProfileKey
from ..planner import Timing
from ..protocols import Logger
from ..watcher import DirectoryWatcher
from . import families as plans
from .inventory import Inventory
from .jobs import Jobs
from .memory import Memory
from .onrotate import OnRotate
from .publisher import Publisher
from .refresh import Refresher
from .relogin import Relogin

#: A rescan that changed nothing republishes state.json only every this many times.
QUIET_REPUBLISH = 12


class Events:
    """Turns what happens into scans, plans and jobs (``jobs`` is the scheduler)."""

    def __init__(self, memory: Memory, history: TokenHistory, *, jobs: Jobs,
                 inventory: Inventory, refresher: Refresher, onrotate: OnRotate,
                 publisher: Publisher, relogin: Relogin, log: Logger, stop: threading.Event,
                 settings: Callable[[], Settings], timing: Callable[[], Timing]) -> None:
        self.memory = memory
        self.history = history
        self.jobs = jobs
        self.inventory = inventory
        self.refresher = refresher
        self.onrotate = onrotate
        self.publisher = publisher
        self.relogin = relogin
        self.log = log
        self.stop = stop
        self._settings = settings
        self._timing = timing
        settings_now = settings()
        self.watcher = DirectoryWatcher(
            self.on_fs_event, (paths.AUTH_STORE_NAME, paths.QWEN_CREDS_NAME),
            force_polling=settings_now.poll)
        self._watched: dict[Path, bool] = {}
        #: rescans in a row that found nothing changed (``replan_orphans``)
        self._quiet_rescans = 0
        #: coalesced scans running now, and those asked for again meanwhile (``coalesced``)
        self._scanning: set[str] = set()
        self._scan_again: set[str] = set()
        #: Fleet mode: told which profiles a store event changed, so that a login (a new
        #: token in a store) is offered to the fleet now rather than at its due time.
        self.on_store_change: Callable[[set[ProfileKey]], None] | None = None

    # -- planning -----------------------------------------------------------------------------
    def reconcile(self, touched: set[ProfileKey] | None = None) -> None:
        """Re-plan ``touched``'s families (all without it) and apply the job changes, under
        the memory lock (two reconciles must not apply their changes interleaved)."""
        with self.memory.lock:
            changes = plans.reconcile(self.memory, self.history, self._timing(), time.time(),
                                      touched)
            for job_id, run_at in changes.steps:
                if run_at is None:
                    self.jobs.remove(job_id)
                elif not self.stop.is_set():
                    self.jobs.family_at(job_id, run_at, self.run_family)
        if touched is None:
            # Unchanged plans add no job, so nothing else would wake the scheduler: after a
            # suspend its monotonic wait can outlast a due time that passed in wall time.
            self.jobs.wakeup()
        self.publisher.publish()

    def replan_orphans(self) -> None:
        """What a rescan that found nothing changed still owes: every family has its job.

        Nothing about a family can change without a store changing (a refresh re-plans its
        own family), so re-planning all of them (``reconcile()``, ~2,000 plans at 1,000 stores)
        would only redo the same plans. A family whose job is gone anyway (a job that died
        before re-planning) is re-planned here; the scheduler is woken, because after a
        suspend its monotonic wait can outlast a due time that passed in wall time.

        state.json is rewritten only every ``QUIET_REPUBLISH``-th quiet rescan (about hourly
        at the default sweep interval): nothing in it changed but ``next_sweep_at``, and at
        2,000 profiles a rewrite costs more than the rest of the sweep.
        """
        scheduled = self.jobs.scheduled()
        with self.memory.lock:
            orphans = plans.orphans(self.memory, self.history, scheduled,
                                    self.refresher.running)
        if orphans:
            self.reconcile(orphans)
        self.jobs.wakeup()
        self._quiet_rescans += 1
        if self._quiet_rescans % QUIET_REPUBLISH == 0:
            self.publisher.publish()

    # -- events ---------------------------------------------------------------------------------
    def rescan_all(self) -> None:
        """Discovery and every store (unchanged ones cost a ``stat()``), plans, watches."""
        self.first_scan()
        self.arm_watches()

    def first_scan(self) -> None:
        """Discovery and every store, and every family planned (start-up arms the watches
        after READY=1: ``Daemon.start``)."""
        if self.inventory.sweep():
            self.reconcile()
        else:
            self.replan_orphans()

    def arm_watches(self) -> None:
        """Watch the directories of the stores found; when they changed, one more look.

        A store created or changed between our listing and the new watch would go unseen
        until the sweep; one more (debounced) look closes that window, however long it was
        (at start-up it spans READY=1: ~0.1 s of arming 2,000 inotify watches that nothing
        refreshed needs).
        """
        dirs = self.inventory.watch_dirs()
        self.watcher.watch(dirs)
        if dirs != self._watched:
            self._watched = dirs
            if self.jobs.running:
                self.on_fs_event(Path("/"))

    def scan_one(self, path: Path) -> None:
        read = self.inventory.read_path(path)
        if read is None:
            self.rescan_all()
            return
        if read.changed:
            # Bytes we already hold change no view, so no plan: the usual case is the event
            # of our own write, which the refresh that wrote it has read and re-planned
            # already (re-planning again was ~6 % of a storm's CPU).
            self.reconcile(read.keys)
        if read.changed and read.keys and self.on_store_change is not None:
            self.on_store_change(set(read.keys))
        self.relogin.update()

    def on_fs_event(self, path: Path) -> None:
        if self.stop.is_set():
            return
        with self.memory.lock:
            known = path.absolute() in self.memory.stores
        job_id = f"scan:{path}" if known else "discover"
        func: Callable[..., None] = self.scan_one if known else self.rescan_all
        args = [path.absolute()] if known else []
        self.jobs.scan_at(job_id, time.time() + self._settings().debounce, self.coalesced,
                          job_id, func, *args)

    def coalesced(self, key: str, func: Callable[..., None], *args: Any) -> None:
        """Run a scan; asked for again while it runs, run it once more right after.

        The scheduler would skip a second instance ("maximum number of running instances"),
        and a write landing just after the running scan read its file would wait for the
        next sweep. Here a request during a run is never dropped, only merged: however many
        arrive, one more run follows, and it reads everything they wrote.
        """
        with self.memory.lock:
            if key in self._scanning:
                self._scan_again.add(key)
                return
            self._scanning.add(key)
        done = False
        try:
            while not done:
                func(*args)
                with self.memory.lock:  # decide and unmark at once: a request now is never lost
                    if key not in self._scan_again or self.stop.is_set():
                        self._scanning.discard(key)
                        done = True
                    self._scan_again.discard(key)
        finally:
            if not done:  # the scan raised: the next request starts afresh
                with self.memory.lock:
                    self._scanning.discard(key)
                    self._scan_again.discard(key)

    def request_scan(self) -> None:
        """A rediscovery and rescan soon (coalesced with one waiting or running)."""
        self.jobs.scan_at("discover", None, self.coalesced, "discover", self.rescan_all)

    def sweep(self) -> None:
        """The safety net for missed events, suspends and clock jumps: rediscover, re-read
        every store whose ``stat_key`` changed (an unchanged one costs one ``stat()``), and
        re-plan every family (a full ``reconcile``, which also wakes the scheduler)."""
        self.coalesced("discover", self.rescan_all)  # or once more after the running one
        self.forget_the_past()

    def forget_the_past(self) -> None:
        """Keep memory proportional to profiles, not to refreshes done: secrets that are
        neither live nor recent leave the redactor, lifetimes of gone tokens are dropped."""
        live = self.inventory.live_secrets()
        self.onrotate.forget_gone()
        # A rotated-away access token stays valid until it expires: each secret was added
        # with its token's expiry, and is kept until then even when no store holds it.
        REDACTOR.retain(live)
        self.relogin.update()

    # -- one family job ---------------------------------------------------------------------------
    def run_family(self, job_id: str) -> None:
        """One family job. Its 'running' mark is set and cleared by the job itself, so no
        scheduler event can arrive late and leave it set: a second instance that starts while
        one runs returns at once, and the running one re-plans the family at its end."""
        if not self.refresher.enter(job_id):
            return
        outcome = None
        with self.memory.lock:
            family = self.memory.families.get(job_id)
            keys = set(family.keys) if family is not None else set()
        try:
            outcome = self.refresher.run(job_id)
        except Exception as exc:  # a bug or hostile input must not end this profile's refreshes
            outcome = self.refresher.crashed(job_id, keys, exc)
        else:
            self.refresher.succeeded(job_id)
        finally:
            self.refresher.leave(job_id)
        if self.stop.is_set():
            return
        self.reconcile(keys)
        if outcome is not None and outcome.result == "rejected":
            # state.json says needs_login before anyone is told so (status agrees with
            # the notification), not a publish delay later.
            self.publisher.publish_now()
        self.relogin.update()
