"""The long-running process: building the components, their lifecycle, signals, reload.

One refresh, as data: a watch event (or the sweep) -> ``events`` schedules a coalesced scan
-> ``inventory`` reads the store and says which profiles may have changed -> ``families``
regroups and re-plans them and returns the job changes -> ``jobs`` (the one caller of
APScheduler) runs the family job -> ``refresh`` (engine: lock, re-read, request, journal,
write) -> ``outcomes`` updates the records, logs, counts -> ``publisher`` writes state.json
-> ``onrotate`` tells the gateway. ``memory`` holds the tables they share, under one lock.

Threads: APScheduler's pool runs refreshes (at most ``max_concurrent_refreshes`` at once),
its ``io`` pool store scans (coalesced per key: never skipped), its ``hooks`` pool the
on_rotate attempts, watchdog's observer reports changes, an optional HTTP thread serves
health and metrics, a ``reload`` thread applies SIGHUPs, and the main thread waits for
signals (``signals``: flags plus a wake-up fd) and pings systemd's watchdog.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__, hooks, sdnotify
from ..arenas import cap_malloc_arenas
from ..config import Settings, load_settings
from ..coredump import disable_core_dumps
from ..engine import Engine, Member, Outcome
from ..errors import ConfigError
from ..fleet.runtime import FleetPart, NoFleet, join_fleet
from ..history import TokenHistory
from ..hooks import resolve_on_rotate
from ..journal import Journal
from ..logsetup import get_logger
from ..models import ProfileKey
from ..planner import Timing
from ..qwen import QwenOAuthClient
from ..ratelimit import RateLimiter
from ..report import EX_OK
from ..state import (
    LINEAGE_FILE,
    DaemonLock,
    ProfileStatus,
    StoreStatus,
    load_salt,
)
from .events import Events
from .inventory import Inventory
from .jobs import Jobs
from .memory import Family, Memory, Runtime, View
from .onrotate import OnRotate
from .outcomes import Outcomes
from .publisher import Publisher
from .refresh import Refresher
from .relogin import Relogin
from .restore import previous_run
from .services import Services
from .signals import STOP_SIGNALS, Signals

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler


#: A wall-clock step larger than this between two main-loop ticks means suspend or a reset.
CLOCK_JUMP = 5.0
#: How long shutdown waits for a reload in progress (one stuck reading a FIFO never ends).
RELOAD_JOIN = 3.0
#: After start-up, when the stale temp files the first scan left are removed (they are at
#: least a minute old already; a second more keeps that work out of the way of READY=1).
TIDY_DELAY = 1.0


class Daemon:
    """Owns the components and the scheduler; see the module docstring for the flow."""

    def __init__(self, settings: Settings, *, overrides: dict[str, Any] | None = None,
                 config_file: Path | None = None) -> None:
        self.settings = settings
        self._overrides = overrides or {}
        self._config_file = config_file
        self.log = get_logger()
        self.stop = threading.Event()
        self._signals = Signals()
        #: Set (by the main loop) when a reload is wanted: many SIGHUPs, one pending reload.
        self._reload_wanted = threading.Event()
        self._reloader: threading.Thread | None = None
        self.last_tick = time.monotonic()
        self.daemon_lock = DaemonLock(settings.state_dir)
        self.memory = Memory()
        self.history = TokenHistory(settings.state_dir / LINEAGE_FILE)
        self.journal = Journal(settings.state_dir)
        self.client = _make_client(settings)
        self.jobs = Jobs(settings.max_concurrent_refreshes)
        self.services = Services(self.log)
        current = self._current_settings
        self.inventory = Inventory(self.memory, self.history, log=self.log, stop=self.stop,
                                   settings=current, metrics=lambda: self.services.metrics)
        self.onrotate = OnRotate(self.memory, log=self.log, settings=current, jobs=self.jobs,
                                 stop=self.stop, publish=self.publish)
        self.publisher = Publisher(self.memory, self.history, log=self.log, settings=current,
                                   hooks=self.onrotate.statuses, next_sweep=self.jobs.next_sweep)
        self.outcomes = Outcomes(self.memory, log=self.log, settings=current,
                                 metrics=lambda: self.services.metrics)
        #: spaces refresh requests at most ``max_refresh_rate`` a second (read at each use,
        #: so a reload changes it); waited for before any store lock is taken
        self.refresher = Refresher(self.memory, self.history, inventory=self.inventory,
                                   outcomes=self.outcomes, onrotate=self.onrotate,
                                   limiter=RateLimiter(lambda: self.settings.max_refresh_rate),
                                   publish=self.publish, stop=self.stop)
        self.relogin = Relogin(self.memory, self.history, log=self.log,
                               statuses=self.profile_statuses, on_written=self.request_scan)
        self.events = Events(self.memory, self.history, jobs=self.jobs, inventory=self.inventory,
                             refresher=self.refresher, onrotate=self.onrotate,
                             publisher=self.publisher, relogin=self.relogin, log=self.log,
                             stop=self.stop, settings=current, timing=lambda: self.timing)
        self.watcher = self.events.watcher
        #: Fleet mode (``fleet`` set): etcd coordination with other hosts, joined at start.
        self.fleet_part: FleetPart = NoFleet(self.log)

    def _current_settings(self) -> Settings:
        return self.settings

    # -- the shared tables, for in-process tests that knew the one-class daemon ---------------
    @property
    def views(self) -> dict[ProfileKey, View]:
        return self.memory.views

    @property
    def runtime(self) -> dict[ProfileKey, Runtime]:
        return self.memory.runtime

    @property
    def families(self) -> dict[str, Family]:
        return self.memory.families

    @property
    def salt(self) -> bytes:
        return self.inventory.salt

    @salt.setter
    def salt(self, value: bytes) -> None:
        self.inventory.salt = value

    @property
    def timing(self) -> Timing:
        return Timing(self.settings.margin, self.settings.jitter, self.settings.retry_max)

    # -- set-up ---------------------------------------------------------------------------------
    def _build_engine(self) -> None:
        """A client and an engine for the current settings; those they replace are closed
        once no refresh uses them (``Refresher.retire``)."""
        old_client, old_engine = self.client, self.refresher.engine
        if old_engine is not None:
            self.client = _make_client(self.settings)
        self.refresher.engine = Engine(client=self.client, salt=self.salt, history=self.history,
                                       journal=self.journal,
                                       lock_timeout=self.settings.lock_timeout, stop=self.stop,
                                       fleet=self.fleet_part.fleet)
        if old_engine is not None:
            self.refresher.retire(old_client, old_engine)

    def _restore(self) -> None:
        """What the previous run left (``restore``): before the first scan."""
        self.onrotate.pending = previous_run(self.settings.state_dir, self.memory, self.history,
                                             self.journal, self.log)

    def _say_what_is_missing(self) -> None:
        """A daemon that cannot do its job says so at start, as a warning, with what to do:
        no profile to refresh, or an ``on_rotate = auto`` that finds no ``openclaw`` (the
        gateway would never be told, and would lock itself out at the next expiry)."""
        if not self.memory.views:
            self.log.warning(
                "no_profile_found", stores=len(self.memory.stores),
                message="no qwen-portal profile to refresh yet; it is picked up as soon as one "
                        "appears. To log in: qwen-refresher login. Where we look: "
                        "qwen-refresher status")
        if (self.settings.on_rotate or "").strip().lower() == "auto" and \
                resolve_on_rotate("auto") is None:
            self.log.warning(
                "gateway_not_told",
                message="on_rotate = auto, but openclaw is not on PATH: a running gateway keeps "
                        "its old tokens after each rotation. Put openclaw on PATH, set "
                        "on_rotate to a command that reloads the gateway, or 'none' if no "
                        "gateway runs here")

    # -- jobs (``Jobs`` is the one caller of the scheduler) ------------------------------------
    @property
    def scheduler(self) -> BackgroundScheduler:
        """APScheduler itself, for tests that listen to its events."""
        return self.jobs.scheduler

    def _schedule(self, job_id: str, run_at: float) -> None:
        self.jobs.family_at(job_id, run_at, self._run_family)

    # -- events (``Events``), kept under their old names for tests and benchmarks -----------
    def reconcile(self, touched: set[ProfileKey] | None = None) -> None:
        self.events.reconcile(touched)

    def rescan_all(self) -> None:
        self.events.rescan_all()

    def request_scan(self) -> None:
        self.events.request_scan()

    def sweep(self) -> None:
        self.events.sweep()

    def _run_family(self, job_id: str) -> None:
        self.events.run_family(job_id)

    def _apply_outcome(self, family: Family, members: list[Member], outcome: Outcome) -> None:
        self.refresher.apply(family, members, outcome)

    # -- lifecycle ------------------------------------------------------------------------------
    def _configure(self) -> None:
        """Health, metrics and notifications for the current settings (``ConfigError`` if
        they cannot work): built at start, rebuilt by a reload where a setting changed."""
        self.services.configure(self.settings, alive=self.alive,
                                statuses=self.profile_statuses,
                                not_ready=lambda: self.fleet_part.not_ready())
        self.relogin.configure(self.settings)

    def _prepare(self) -> None:
        """Salt, engine, and what the previous run left: after the lock, before any scan."""
        self.salt = load_salt(self.settings.state_dir)
        self.fleet_part = join_fleet(self.settings, tables=self.memory, stop=self.stop,
                                     run_now=self._schedule, publish=self.publish, log=self.log)
        self.events.on_store_change = self.fleet_part.nudge  # a login is published at once
        self.publisher.fleet_state = self.fleet_part.state
        self._build_engine()
        self._restore()

    def start(self, ready: Callable[[], object] | None = None) -> None:
        """Lock, restore, first scan, every family scheduled, then ``ready`` (READY=1), then
        the watches (``Events.arm_watches``: its one more look covers the gap)."""
        self.daemon_lock.acquire()
        self._prepare()
        self._configure()
        self.jobs.start()
        self.inventory.defer_tidy = True  # stale temp files: removed just after start-up
        self.events.first_scan()
        self.onrotate.resume()
        self.jobs.sweep_every(self.settings.sweep_interval, self.events.sweep)
        self.jobs.scan_at("tidy", time.time() + TIDY_DELAY, self.inventory.tidy)
        self.jobs.scan_at("warm", None, self.client.warm)  # the TLS context, off the ready path
        self.fleet_part.joined()
        if ready is not None:
            ready()
        self.events.arm_watches()

    def run(self) -> int:
        """The main loop: wait for a signal or the next tick, ping the watchdog, notice clock
        jumps, hand reloads to the reloader thread, and stop on SIGTERM/SIGINT.

        Order matters: core dumps off before any token is read; handlers installed before
        ``start`` (a SIGTERM during it is recorded and acted on as soon as it returns)."""
        cap_malloc_arenas()  # before any thread of ours: memory flat under churn
        problem = disable_core_dumps()
        if problem is not None:
            self.log.warning("core_dumps_on", error=problem,
                             message="could not set RLIMIT_CORE to 0; a crash could write the "
                                     "tokens in memory to a core file")
        wakeup = self._signals.install()
        try:
            # READY=1 once every family is planned (``start``): before the watches are armed
            # and before the first line is logged, which files the secrets the scan added in
            # the redactor's index (``Redactor.add``); a slow log sink (a stalled journal)
            # must not hold READY=1 back either.
            self.start(ready=sdnotify.ready)
        except BaseException:
            self.shutdown()
            self._signals.uninstall()
            raise
        self.log.info("started", version=__version__, stores=len(self.memory.stores),
                      profiles=len(self.memory.views), state_dir=str(self.settings.state_dir))
        self._say_what_is_missing()
        self.publish()
        self._reloader = threading.Thread(target=self._reload_loop, name="reload", daemon=True)
        self._reloader.start()
        received = self._main_loop(wakeup)
        self.log.info("stopping", signal=signal.Signals(min(received & STOP_SIGNALS)).name)
        sdnotify.stopping()
        self.shutdown()
        self._signals.uninstall()
        return EX_OK

    def _main_loop(self, wakeup: socket.socket) -> set[int]:
        """Until SIGTERM/SIGINT: returns the signals that ended it."""
        watchdog = sdnotify.watchdog_interval()
        tick = max(0.2, min(15.0, self.settings.remind_interval / 2, watchdog or 15.0))
        poller = select.poll()
        poller.register(wakeup, select.POLLIN)
        wall, mono = time.time(), time.monotonic()
        received: set[int] = self._signals.take(wakeup)  # any that came during start()
        while not received & STOP_SIGNALS:
            if signal.SIGHUP in received:
                self._reload_wanted.set()  # set again while pending: still one reload
            if not received:
                self.relogin.update()  # reminders while a login is needed; free otherwise
            poller.poll(tick * 1000)
            received = self._signals.take(wakeup)
            self.last_tick = time.monotonic()
            skew = (time.time() - wall) - (self.last_tick - mono)
            wall, mono = time.time(), self.last_tick
            if abs(skew) > CLOCK_JUMP:
                # A suspend or a clock change: re-read and re-plan now, not at the next sweep.
                self.log.warning("clock_jump", seconds=round(skew, 1))
                self.request_scan()
            if watchdog:
                sdnotify.watchdog_ping()
        return received

    def run_once(self) -> int:
        """Refresh whatever is due now, wait for it, exit: for timers and cron (``once``)."""
        from .once import run_once

        return run_once(self)

    def _reload_loop(self) -> None:
        """Reloads run here, one at a time, off the main loop: a slow or stuck reload (a store
        whose lock is held, a config file that is a FIFO) never keeps the main loop from
        SIGTERM or from the watchdog. SIGHUPs during a reload coalesce into one more."""
        while True:
            self._reload_wanted.wait()
            if self.stop.is_set():
                return
            self._reload_wanted.clear()
            try:
                self.reload()
            except Exception as exc:  # a reload must never end the daemon
                self.log.error("reload_failed", error=f"{type(exc).__name__}: {exc}",
                               message="keeping the old settings")

    def reload(self) -> None:
        """Read the settings again and rebuild every component from them: client and engine
        always, health and notifications where a setting they read changed; then re-read
        every store and re-plan every family (a plan drawn with other settings is redone)."""
        if self.stop.is_set():
            return
        try:
            settings = load_settings(self._overrides, config_file=self._config_file)
        except ConfigError as exc:
            self.log.error("reload_failed", error=str(exc), message="keeping the old settings")
            return
        if self.stop.is_set():  # SIGTERM while the file was read: shutdown has begun
            return
        old = self.settings
        self.settings = settings
        self._build_engine()
        self.jobs.sweep_interval(settings.sweep_interval)
        try:
            self._configure()
        except ConfigError as exc:
            self.log.error("reload_failed", error=str(exc),
                           message="health or notifications keep their old settings")
        if settings.max_concurrent_refreshes != old.max_concurrent_refreshes or \
                settings.poll != old.poll:
            self.log.warning("restart_needed",
                             message="max_concurrent_refreshes and poll take effect at the "
                                     "next start")
        self.fleet_part.settings_changed(old, settings)
        with self.memory.lock:
            for info in self.memory.stores.values():
                info.digest = None
        self.log.info("reloaded")
        self.rescan_all()
        self.relogin.update()  # a rebuilt notifier hears of a login episode in progress now

    def shutdown(self) -> None:
        """Stop everything, in an order that keeps what matters: running hooks are ended at
        once (they never delay the exit), a reload in progress is given ``RELOAD_JOIN``, an
        in-flight refresh its HTTP deadline (its answer holds the rotated tokens)."""
        self.stop.set()
        hooks.abort_all()
        self._reload_wanted.set()  # the reloader wakes, sees stop and returns
        if self._reloader is not None:
            self._reloader.join(RELOAD_JOIN)  # before the scheduler it uses goes
        self.jobs.shutdown()
        retired = self.refresher.wait_idle(time.monotonic() + self.settings.http_timeout + 5)
        hooks.abort_all()  # one a refresh started after the first call
        engines = [e for e in (*retired, self.refresher.engine) if isinstance(e, Engine)]
        for engine in engines:
            # An in-flight write finishes before we go; a refresh that has not reached the
            # write step has already been told to stop waiting for locks.
            if engine.writing.acquire(timeout=10):
                engine.writing.release()
            engine.release_all()
        self.fleet_part.stop()  # after the refreshes: an in-flight one publishes to etcd first
        self.watcher.stop()
        self.services.stop()
        self.relogin.close(2.0)
        self.publisher.close()
        with contextlib.suppress(Exception):
            self.publisher.publish_now(force=True)
        for client in retired:
            if isinstance(client, QwenOAuthClient):
                client.close()
        self.client.close()
        self.daemon_lock.release()

    # -- publishing -----------------------------------------------------------------------------
    def profile_statuses(self) -> list[ProfileStatus]:
        return self.publisher.profile_statuses()

    def store_statuses(self) -> list[StoreStatus]:
        return self.publisher.store_statuses()

    def publish(self) -> None:
        self.publisher.publish()

    def publish_now(self) -> None:
        self.publisher.publish_now()

    def alive(self) -> bool:
        return self.jobs.running and time.monotonic() - self.last_tick < 60


def _make_client(settings: Settings) -> QwenOAuthClient:
    return QwenOAuthClient(settings.token_url, settings.device_code_url, settings.client_id,
                           timeout=settings.http_timeout)
