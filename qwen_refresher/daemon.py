"""The long-running process: wiring stores, watches, the scheduler and the engine together.

Data walks one way: stores are read into ``views`` (one per profile), views are grouped into
families, each family gets one scheduler job at its planned time, the job runs the engine,
and the engine's outcome updates the views and each profile's runtime record, which the
daemon publishes for ``status``. Everything the daemon believes can be rebuilt from the stores
(plus lineage fingerprints and the journal), which is why a missed event, a suspend or a
restart costs at most one sweep.

Threads: APScheduler's pool runs refreshes (at most ``max_concurrent_refreshes`` at once),
watchdog's observer reports changes, an optional HTTP thread serves health and metrics, and
the main thread waits for signals and pings systemd's watchdog.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.events import EVENT_JOB_SUBMITTED, JobSubmissionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from . import __version__, discovery, paths, sdnotify
from .config import Settings, is_loopback_host, load_settings
from .engine import Engine, Member, Outcome
from .errors import ConfigError, LockTimeout, StoreError, StoreMalformed, StoreUnreadable
from .fileio import remove_stale_temp_files
from .history import TokenHistory
from .hooks import resolve_on_rotate, run_hook
from .journal import Journal
from .logsetup import REDACTOR, get_logger
from .models import Credentials, ProfileKey, fingerprint
from .planner import Timing, backoff_delay, refresh_at
from .qwen import QwenOAuthClient
from .state import (
    JOURNAL_FILE,
    LINEAGE_FILE,
    STATE_FILE,
    DaemonLock,
    ProfileState,
    ProfileStatus,
    PublishedState,
    StoreStatus,
    load_salt,
    read_state,
    write_state,
)
from .status import summary_line
from .stores.base import Store
from .watcher import DirectoryWatcher

#: Consecutive re-applications of one family that we allow before backing off: a writer that
#: keeps reverting us must not turn the daemon into a loop.
REVERT_FREE_RETRIES = 2
#: A wall-clock step larger than this between two main-loop ticks means suspend or a reset.
CLOCK_JUMP = 5.0
#: How long a read that found a malformed file waits for the writer's lock to look again.
LOCKED_REREAD_TIMEOUT = 2.0
#: Secrets are scrubbed from logs until their token expires, plus this much (clock skew).
REDACT_GRACE = 60.0
#: How long state.json changes are gathered before one write.
PUBLISH_DELAY = 0.1


@dataclass
class View:
    """One profile as last read from its store."""

    store: Store
    creds: Credentials | None
    problem: str | None
    fp: str | None
    issued_at: float | None


@dataclass
class Runtime:
    """What the daemon knows about one profile beyond its file: for status and scheduling."""

    state: ProfileState = "ok"
    family: str | None = None
    attempts: int = 0
    retry_at: float | None = None
    last_error: str | None = None
    last_refresh_at: float | None = None
    next_refresh_at: float | None = None


@dataclass
class Family:
    id: str
    head: str
    keys: list[ProfileKey]
    creds: Credentials
    issued_at: float | None
    planned: float
    lagging: bool


@dataclass
class _Reverts:
    count: int = 0
    last: float = 0.0


@dataclass(eq=False)  # identity: one per managed store
class _StoreInfo:
    store: Store
    explicit: bool
    digest: str | None = None
    error: str | None = None


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        overrides: dict[str, Any] | None = None,
        config_file: Path | None = None,
    ) -> None:
        self.settings = settings
        self._overrides = overrides or {}
        self._config_file = config_file
        self.log = get_logger()
        self.stop = threading.Event()
        self._wake = threading.Event()
        self._reload_requested = False
        self._lock = threading.RLock()
        self._publish_lock = threading.Lock()
        self._active = 0
        self._active_cv = threading.Condition()
        self.started_at = time.time()
        self.last_tick = time.monotonic()

        state_dir = settings.state_dir
        self.daemon_lock = DaemonLock(state_dir)
        self.salt = b""
        self.history = TokenHistory(state_dir / LINEAGE_FILE)
        self.journal = Journal(state_dir)
        self.client = self._make_client(settings)
        self.engine: Engine | None = None
        self.stores: dict[Path, _StoreInfo] = {}
        self.views: dict[ProfileKey, View] = {}
        self.runtime: dict[ProfileKey, Runtime] = defaultdict(Runtime)
        self.families: dict[str, Family] = {}
        self.family_of: dict[ProfileKey, str] = {}
        self.reverts: dict[str, _Reverts] = defaultdict(_Reverts)
        self._last_published: bytes | None = None
        self._publish_timer: threading.Timer | None = None
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(settings.max_concurrent_refreshes),
                       "io": ThreadPoolExecutor(2)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        self.watcher = DirectoryWatcher(
            self._on_fs_event, (paths.AUTH_STORE_NAME, paths.QWEN_CREDS_NAME),
            force_polling=settings.poll)
        #: store path -> its profile keys, so one store's update never scans every profile
        self.keys_by_store: dict[Path, set[ProfileKey]] = defaultdict(set)
        self._watched: dict[Path, bool] = {}
        #: family jobs handed to the pool and not finished yet
        self._running: set[str] = set()
        self._login_episode = False
        self.metrics: Any = None
        self.health: Any = None
        self.notifier: Any = None

    # -- set-up -------------------------------------------------------------------------------
    @staticmethod
    def _make_client(settings: Settings) -> QwenOAuthClient:
        return QwenOAuthClient(settings.token_url, settings.device_code_url, settings.client_id,
                               timeout=settings.http_timeout)

    @property
    def timing(self) -> Timing:
        return Timing(self.settings.margin, self.settings.jitter, self.settings.retry_max)

    def _restore(self) -> None:
        """Reload lineage, rejections and pending rotations left by the previous run."""
        self.history.load()
        previous = read_state(self.settings.state_dir)
        if previous is not None:
            rejected = previous.get("rejected", {})
            self.history.load_rejected({fp: (float(v[0]), str(v[1])) for fp, v in
                                        rejected.items() if isinstance(v, list) and len(v) == 2})
            for prof in previous.get("profiles", []):
                key = ProfileKey(Path(prof["store"]), prof["profile"])
                rt = self.runtime[key]
                rt.last_refresh_at = prof.get("last_refresh_at")
        for replaces, fp, creds, _members in self.journal.pending():
            REDACTOR.add(creds.access, creds.refresh, until=creds.expires_at + REDACT_GRACE)
            self.history.link(replaces, fp)
            self.history.remember(fp, creds, issued_at=time.time())
            self.log.warning("journal_replay", family=fp[:12],
                             message="tokens received before a crash or a failed write are "
                                     "being written to their stores")

    def _setup_services(self) -> None:
        """Metrics, the health endpoint and notifications."""
        address = self.settings.listen_address
        if address is not None:
            # Metrics exist only to be scraped: without an HTTP server, no prometheus-client.
            from .health import HealthServer
            from .metrics import Metrics

            self.metrics = Metrics(self.profile_statuses)

            self.health = HealthServer(address[0], address[1], live_fn=self.alive,
                                       profiles_fn=self.profile_statuses, metrics=self.metrics)
            try:
                self.health.start()
            except OSError as exc:
                raise ConfigError("listen (QWEN_REFRESHER_LISTEN)",
                                  f"cannot listen on {self.settings.listen}: {exc.strerror}"
                                  ) from None
            self.log.info("health_listening", address=f"{address[0]}:{self.health.port}")
            if not is_loopback_host(address[0]):
                self.log.warning("health_exposed", address=self.settings.listen,
                                 message="health and metrics are reachable from other hosts "
                                         "(no token is ever served there)")
        from .notify import Notifier, check_notify_setup

        check_notify_setup(self.settings)
        assisted = None
        if self.settings.auto_login:
            from .login import AssistedLogin

            assisted = AssistedLogin(self.settings, log=self.log,
                                     on_written=lambda keys: self.request_scan())
        self.notifier = Notifier(self.settings, log=self.log, assisted_login=assisted)

    # -- discovery and reading ------------------------------------------------------------------
    def rescan_all(self) -> None:
        s = self.settings
        found = discovery.store_paths(explicit=s.stores, discover=s.discover,
                                      qwen_code=s.qwen_code)
        explicit = {p.absolute() for p in s.stores}
        with self._lock:
            current = {p for p, _ in found}
            for path in list(self.stores):
                if path not in current:
                    self._forget_store(path)
            for path, kind in found:
                if path not in self.stores:
                    self.stores[path] = _StoreInfo(discovery.open_store(path, kind),
                                                   path in explicit)
                    self.log.info("store_found", store=self.stores[path].store.describe(),
                                  kind=kind)
            infos = list(self.stores.values())
        for info in infos:
            self.read_store(info)
        self._remove_stale_temp_files(infos)
        dirs = discovery.watch_dirs(list(self.stores), discover=s.discover,
                                    qwen_code=s.qwen_code)
        self.watcher.watch(dirs)
        if dirs != self._watched:
            # A store created between our listing and the new watch would go unseen until the
            # sweep; one more (debounced) look closes that window.
            self._watched = dirs
            if self.scheduler.running:
                self._on_fs_event(Path("/"))
        self.reconcile()

    def _remove_stale_temp_files(self, infos: list[_StoreInfo]) -> None:
        by_dir: dict[Path, set[str]] = defaultdict(set)
        for info in infos:
            by_dir[info.store.path.parent].add(info.store.path.name)
            with contextlib.suppress(StoreError, OSError):
                lock = info.store.lock_path()
                by_dir[lock.parent].add(lock.name)  # lockfile.py's link-into-place temp
        by_dir[self.settings.state_dir] |= {STATE_FILE, JOURNAL_FILE}
        for directory, names in by_dir.items():
            for path in remove_stale_temp_files(directory, names):
                self.log.info("temp_file_removed", path=str(path),
                              message="left by an interrupted write")

    def _forget_store(self, path: Path) -> None:
        info = self.stores.pop(path)
        self.log.info("store_gone", store=info.store.describe())
        for key in self.keys_by_store.pop(path, set()):
            self.views.pop(key, None)
            self.runtime.pop(key, None)

    def read_store(self, info: _StoreInfo) -> None:
        store = info.store
        try:
            snap = store.read_settled()
        except StoreMalformed:
            # Perhaps a writer caught between truncate and write, preempted for longer than
            # our settle pauses: look once more, under the writer's own lock, before calling
            # the file broken.
            try:
                with store.lock(timeout=LOCKED_REREAD_TIMEOUT, stop=self.stop).held():
                    snap = store.read()
            except StoreError as exc:
                self._store_failed(info, exc)
                return
            except (LockTimeout, OSError):
                try:
                    snap = store.read()
                except StoreError as exc:
                    self._store_failed(info, exc)
                    return
        except StoreError as exc:
            self._store_failed(info, exc)
            return
        digest = hashlib.sha256(snap.raw).hexdigest()
        with self._lock:
            if info.error is not None:
                self.log.info("store_recovered", store=store.describe())
                info.error = None
            if digest == info.digest:
                return
            info.digest = digest
            seen: set[ProfileKey] = set()
            for profile_id, record in snap.records.items():
                key = record.key
                seen.add(key)
                previous = self.views.get(key)
                if record.creds is None:
                    if previous is None or previous.problem != record.problem:
                        self.log.error("profile_invalid", store=store.describe(),
                                       profile=profile_id, problem=record.problem)
                    self.views[key] = View(store, None, record.problem, None, None)
                    continue
                REDACTOR.add(record.creds.access, record.creds.refresh,
                             until=record.creds.expires_at + REDACT_GRACE)
                fp = fingerprint(record.creds.refresh, self.salt)
                issued = self.history.issued_at(fp)
                if issued is None and previous is not None and previous.fp == fp:
                    issued = previous.issued_at
                elif previous is not None and previous.fp is not None:
                    self._observe_change(key, previous, fp)
                if previous is not None and previous.problem is not None:
                    self.log.info("profile_recovered", store=store.describe(), profile=profile_id)
                # Only tokens we obtained have a known lifetime; for the rest (a login, another
                # program's rotation) the margin alone decides, so a token found inside its
                # margin is refreshed at once.
                self.views[key] = View(store, record.creds, None, fp, issued)
            for key in self.keys_by_store[store.path] - seen:
                self.views.pop(key, None)
                self.runtime.pop(key, None)
            self.keys_by_store[store.path] = seen

    def _store_failed(self, info: _StoreInfo, exc: StoreError) -> None:
        if isinstance(exc, StoreUnreadable) and exc.problem == "does not exist" \
                and not info.explicit:
            with self._lock:
                if info.store.path in self.stores:
                    self._forget_store(info.store.path)
            return
        with self._lock:
            if info.error != exc.problem:
                self.log.error("store_invalid", store=info.store.describe(), error=exc.problem,
                               message="file left untouched; other stores are still served")
                if self.metrics is not None:
                    self.metrics.store_error(str(info.store.path))
            info.error = exc.problem  # the row names the store already
            info.digest = None
            for key in self.keys_by_store.get(info.store.path, set()):
                if key in self.views:
                    self.views[key] = View(self.views[key].store, None, exc.problem, None, None)

    def _observe_change(self, key: ProfileKey, previous: View, fp: str) -> None:
        """A profile's refresh token changed under us: decide rotation, revert or divergence.

        Content alone cannot tell "another program refreshed the family" from "the user logged
        in again here only". The difference is timing: programs refresh only when a token is
        due (Qwen Code 30 s before expiry, OpenClaw at expiry) or after a rejection, while a
        login can happen any time. So a change while the family was due, expired or needed a
        login is taken as a rotation and copied to the other members; any other change makes
        the profile leave its family.
        """
        assert previous.fp is not None
        old_head = self.history.newest(previous.fp)
        if self.history.newest(fp) == old_head or self.history.is_superseded(fp):
            return  # our own rotation landing, or a revert the next run heals
        due = previous.creds is not None and \
            previous.creds.expires_at - self.settings.margin <= time.time() + 1
        if due or self.history.rejection(old_head) is not None:
            self.history.link(old_head, fp)
            self.log.info("rotated_elsewhere", store=previous.store.describe(),
                          profile=key.profile,
                          message="another program rotated this profile; its family gets "
                                  "the new tokens without a refresh")
        else:
            self.log.info("family_split", store=previous.store.describe(), profile=key.profile,
                          message="this profile got new tokens of its own (a new login?) and "
                                  "now refreshes on its own")

    # -- planning -------------------------------------------------------------------------------
    def reconcile(self, touched: set[ProfileKey] | None = None) -> None:
        """Group profiles into families and (re)schedule one job per family.

        ``touched``: only these profiles changed (one store read, one refresh), so only their
        families are re-planned; without it, everything is (start, sweep, discovery). A
        refresh storm over thousands of stores stays O(family) per refresh this way.
        """
        now = time.time()
        with self._lock:
            if touched is None:
                keys = set(self.views)
                old_ids = set(self.families)
                self.families = {}
            else:
                keys, old_ids = self._affected(touched)
            groups: dict[str, list[ProfileKey]] = defaultdict(list)
            for key in keys:
                view = self.views[key]
                rt = self.runtime[key]
                if view.creds is None or view.fp is None:
                    rt.state, rt.last_error, rt.family = "invalid_store", view.problem, None
                    rt.next_refresh_at = None
                    continue
                groups[self.history.newest(view.fp)].append(key)
            families: dict[str, Family] = {}
            for head, members in groups.items():
                members.sort()
                family = self._plan_family(head, members, now)
                families[family.id] = family
            for job_id in old_ids - set(families):
                self.families.pop(job_id, None)
                with contextlib.suppress(Exception):
                    self.scheduler.remove_job(job_id)
            self.families.update(families)
            for family in families.values():
                for key in family.keys:
                    self.family_of[key] = family.id
            if touched is None:
                self.family_of = {k: f.id for f in self.families.values() for k in f.keys}
            else:
                grouped = {k for f in families.values() for k in f.keys}
                for key in (keys | touched) - grouped:
                    self.family_of.pop(key, None)
        self.publish()

    def _affected(self, touched: set[ProfileKey]) -> tuple[set[ProfileKey], set[str]]:
        """The profiles whose grouping can change when ``touched`` changed, and their old
        families: the touched profiles' families, and any family sharing a head with them."""
        touched = {k for k in touched if k in self.views} | {
            k for k in touched if k in self.family_of}
        old_ids = {self.family_of[k] for k in touched if k in self.family_of}
        heads = {self.history.newest(v.fp) for k in touched
                 if (v := self.views.get(k)) is not None and v.fp is not None}
        old_ids |= {f.id for f in self.families.values() if f.head in heads}
        keys = {k for k in touched if k in self.views}
        for job_id in old_ids:
            family = self.families.get(job_id)
            if family is not None:
                keys |= {k for k in family.keys if k in self.views}
        return keys, old_ids

    def _plan_family(self, head: str, keys: list[ProfileKey], now: float) -> Family:
        views = [self.views[k] for k in keys]
        holders = [v for v in views if v.fp == head and v.creds is not None]
        if holders:
            best = max(holders, key=lambda v: v.creds.expires_ms if v.creds else 0)
            creds, issued = best.creds, best.issued_at
        else:
            remembered = self.history.credentials(head)
            fallback = max(views, key=lambda v: v.creds.expires_ms if v.creds else 0)
            creds = remembered or fallback.creds
            issued = self.history.issued_at(head) or fallback.issued_at
        assert creds is not None
        job_id = f"refresh:{keys[0]}"
        previous = self.families.get(job_id)
        if previous is not None and previous.head == head and \
                previous.creds.expires_ms == creds.expires_ms:
            planned = previous.planned  # same token, same expiry: keep the jitter drawn once
        else:
            planned = refresh_at(now=now, expires_at=creds.expires_at, issued_at=issued,
                                 timing=self.timing)
        lagging = any(v.fp != head for v in views)
        family = Family(job_id, head, keys, creds, issued, planned, lagging)
        rejection = self.history.rejection(head)
        retry_at = max((self.runtime[k].retry_at or 0.0) for k in keys) or None
        run_at: float | None
        if rejection is not None:
            run_at = None
        elif lagging:
            # Members behind the newest tokens are healed at once, unless a writer keeps
            # reverting them (then back off) or the last write failed (then wait the retry).
            revert = self.reverts[head]
            run_at = now
            if revert.count > REVERT_FREE_RETRIES:
                run_at = max(now, revert.last + min(2.0 ** (revert.count - REVERT_FREE_RETRIES),
                                                    300.0))
            if retry_at is not None:
                run_at = max(run_at, retry_at)
        elif retry_at is not None:
            run_at = retry_at
        else:
            run_at = planned
        for key in keys:
            rt = self.runtime[key]
            rt.family = head[:12]
            rt.next_refresh_at = run_at
            if rejection is not None:
                rt.state, rt.last_error = "needs_login", rejection[1]
            elif rt.state == "refreshing":
                pass
            elif rt.retry_at is not None:
                rt.state = "retrying"
            elif creds.expires_at <= now:
                rt.state = "expired"
            elif planned <= now:
                rt.state = "due"
            else:
                rt.state = "ok"
        if run_at is None:
            with contextlib.suppress(Exception):
                self.scheduler.remove_job(job_id)
        elif not self.stop.is_set():
            self._schedule(job_id, run_at)
        return family

    def _schedule(self, job_id: str, run_at: float) -> None:
        if job_id in self._running:
            # Its run is queued or in progress and re-plans the family when it ends; a second
            # date job now would only be skipped by the scheduler (max_instances=1).
            return
        job = self.scheduler.get_job(job_id)
        when = datetime.fromtimestamp(run_at, UTC)
        if job is not None and job.next_run_time is not None and \
                abs(job.next_run_time.timestamp() - run_at) < 0.05:
            return
        self.scheduler.add_job(self._run_family, "date", run_date=when, id=job_id,
                               args=[job_id], replace_existing=True)

    # -- one refresh -----------------------------------------------------------------------------
    def _run_family(self, job_id: str) -> None:
        with self._active_cv:
            if self.stop.is_set():
                return
            self._active += 1
        outcome = None
        with self._lock:
            family = self.families.get(job_id)
            keys = set(family.keys) if family is not None else set()
        try:
            outcome = self._run_family_inner(job_id)
        finally:
            with self._lock:
                self._running.discard(job_id)
            with self._active_cv:
                self._active -= 1
                self._active_cv.notify_all()
        if self.stop.is_set():
            return
        self.reconcile(keys)
        if outcome is not None and outcome.result == "rejected":
            # state.json says needs_login before anyone is told so (status agrees with
            # the notification), not a publish delay later.
            self.publish_now()
        self._notify()

    def _job_submitted(self, event: JobSubmissionEvent) -> None:
        if event.job_id.startswith("refresh:"):
            with self._lock:
                self._running.add(event.job_id)

    def _run_family_inner(self, job_id: str) -> Outcome | None:
        assert self.engine is not None
        with self._lock:
            family = self.families.get(job_id)
            if family is None:
                return None
            members = [Member(self.views[k].store, k.profile) for k in family.keys
                       if k in self.views]
            # A retry after a failed refresh finds the token still due (planned is in the past);
            # a retry after a failed write finds the new token not due and only writes.
            due_at = family.planned
            for key in family.keys:
                if time.time() >= due_at:
                    self.runtime[key].state = "refreshing"
        if time.time() >= due_at:
            self.publish()
        outcome = self.engine.run(members, due_at=due_at)
        self._apply_outcome(family, members, outcome)
        with self._lock:
            infos = [self.stores.get(m.store.path) for m in members]
        for info in dict.fromkeys(i for i in infos if i is not None):
            self.read_store(info)
        return outcome

    def _apply_outcome(self, family: Family, members: list[Member], outcome: Outcome) -> None:
        now = time.time()
        names = [f"{m.store.describe()}#{m.profile}" for m in members]
        result = outcome.result
        if self.metrics is not None and result != "not_due":
            reason = _failure_reason(outcome) if result not in ("rotated", "synced") else None
            self.metrics.refresh_finished(result, outcome.duration, reason)
        if outcome.creds is not None and outcome.fp is not None:
            REDACTOR.add(outcome.creds.access, outcome.creds.refresh,
                         until=outcome.creds.expires_at + REDACT_GRACE)
        with self._lock:
            keys = [m.key for m in members]
            for key in keys:
                rt = self.runtime[key]
                if rt.state == "refreshing":
                    rt.state = "ok"
            if result in ("rotated", "synced", "not_due"):
                for key in keys:
                    rt = self.runtime[key]
                    if key in outcome.errors:
                        continue
                    if result == "rotated":
                        rt.last_refresh_at = now
                    rt.attempts, rt.retry_at, rt.last_error = 0, None, None
                if result == "rotated":
                    self.reverts.pop(family.head, None)
            elif result == "rejected":
                for key in keys:
                    self.runtime[key].retry_at = None
                    self.runtime[key].last_error = outcome.reason
            else:
                attempts = max(self.runtime[k].attempts for k in keys) + 1
                delay = backoff_delay(attempts, cap=self.settings.retry_max,
                                      retry_after=outcome.retry_after)
                for key in keys:
                    rt = self.runtime[key]
                    rt.attempts, rt.retry_at, rt.last_error = attempts, now + delay, outcome.reason
        expires = (datetime.fromtimestamp(outcome.creds.expires_at, UTC).isoformat()
                   if outcome.creds else None)
        if outcome.journal_error is not None:
            self.log.error("journal_write_failed", error=outcome.journal_error,
                           message="rotated tokens could not be journaled; they live only in "
                                   "memory until every store is written")
        if result == "rotated":
            self.log.info("rotated", profiles=names, expires_at=expires,
                          took_ms=round(outcome.duration * 1000, 1))
        elif result == "synced":
            if outcome.reapplied:
                revert = self.reverts[outcome.fp or family.head]
                revert.count, revert.last = revert.count + 1, now
                self.log.warning("revert_undone", profiles=[str(k) for k in outcome.reapplied],
                                 message="a writer put a consumed refresh token back; the "
                                         "newest tokens were re-applied")
            else:
                self.log.info("synced", profiles=names, message="copied the family's newest "
                              "tokens to members that lagged behind")
        elif result == "rejected":
            commands = sorted({m.store.login_command(m.profile) for m in members})
            self.log.error("needs_login", profiles=names, reason=outcome.reason,
                           run=commands,
                           message="Qwen rejected the refresh token; log in again: "
                                   + " ; ".join(commands))
        elif result == "write_failed":
            self.log.error("write_failed", profiles=names, error=outcome.reason,
                           message="new tokens are kept in the journal under "
                                   f"{self.settings.state_dir} and the write is retried")
        elif result != "not_due":
            rt_any = self.runtime[members[0].key] if members else None
            self.log.warning("refresh_failed", profiles=names, result=result,
                             reason=outcome.reason,
                             retry_in_s=round((rt_any.retry_at or now) - now, 1)
                             if rt_any else None)
        if outcome.written and result in ("rotated", "synced"):
            self._run_on_rotate(members, outcome)

    def _run_on_rotate(self, members: list[Member], outcome: Outcome) -> None:
        command = resolve_on_rotate(self.settings.on_rotate)
        if command is None or outcome.creds is None:
            return
        written = [m for m in members if m.key in outcome.written]
        first = next((m for m in written if m.store.kind == "openclaw"), written[0])
        variables = {
            "EVENT": outcome.result,
            "PROFILE": first.profile,
            "STORE": str(first.store.path),
            "EXPIRES_AT": datetime.fromtimestamp(outcome.creds.expires_at, UTC)
            .strftime("%Y-%m-%dT%H:%M:%SZ"),
            "EXPIRES_MS": str(outcome.creds.expires_ms),
            "PROFILES": "\n".join(f"{m.store.path}#{m.profile}" for m in written),
        }
        result = run_hook(command, variables, timeout=self.settings.hook_timeout,
                          secrets=(outcome.creds.access, outcome.creds.refresh),
                          runner=self.settings.hook_runner_argv)
        if result.ok:
            self.log.info("on_rotate_ok", command=command)
        else:
            self.log.warning("on_rotate_failed", command=command, returncode=result.returncode,
                             timed_out=result.timed_out, output=result.output)

    # -- events -------------------------------------------------------------------------------
    def _on_fs_event(self, path: Path) -> None:
        if self.stop.is_set():
            return
        with self._lock:
            known = path.absolute() in self.stores
        job_id = f"scan:{path}" if known else "discover"
        run_at = datetime.fromtimestamp(time.time() + self.settings.debounce, UTC)
        func = self._scan_one if known else self.rescan_all
        args = [path.absolute()] if known else []
        with contextlib.suppress(Exception):
            self.scheduler.add_job(func, "date", run_date=run_at, id=job_id, args=args,
                                   replace_existing=True, executor="io")

    def _scan_one(self, path: Path) -> None:
        with self._lock:
            info = self.stores.get(path)
        if info is None:
            self.rescan_all()
            return
        before = set(self.keys_by_store.get(path, set()))
        self.read_store(info)
        self.reconcile(before | self.keys_by_store.get(path, set()))
        self._notify()

    def _notify(self) -> None:
        """Let the notifier diff the profiles, but only while a login episode is in play (or
        has just ended): building every profile's status after each of thousands of refreshes
        would cost more than the refreshes."""
        if self.notifier is None:
            return
        with self._lock:
            in_play = any(rt.state == "needs_login" for rt in self.runtime.values())
        if in_play or self._login_episode:
            self._login_episode = in_play
            self.notifier.update(self.profile_statuses())

    def request_scan(self) -> None:
        with contextlib.suppress(Exception):
            self.scheduler.add_job(self.rescan_all, "date", id="discover", replace_existing=True,
                                   executor="io")

    def sweep(self) -> None:
        """Re-read everything: the safety net for missed events, suspends and clock jumps."""
        with self._lock:
            for info in self.stores.values():
                info.digest = None  # force re-planning even when bytes are unchanged
        self.rescan_all()
        self._forget_the_past()

    def _forget_the_past(self) -> None:
        """Keep memory proportional to profiles, not to refreshes done: secrets that are
        neither live nor recent leave the redactor, lifetimes of gone tokens are dropped."""
        with self._lock:
            live: set[str] = set()
            for view in self.views.values():
                if view.creds is not None and view.fp is not None:
                    live |= {view.creds.access, view.creds.refresh}
                    remembered = self.history.credentials(self.history.newest(view.fp))
                    if remembered is not None:
                        live |= {remembered.access, remembered.refresh}
        # A rotated-away access token stays valid until it expires: each secret was added
        # with its token's expiry, and is kept until then even when no store holds it.
        REDACTOR.retain(live)
        self._notify()

    # -- publishing -----------------------------------------------------------------------------
    def profile_statuses(self) -> list[ProfileStatus]:
        with self._lock:
            out: list[ProfileStatus] = []
            for key in sorted(self.views):
                view, rt = self.views[key], self.runtime[key]
                out.append({
                    "store": str(key.store),
                    "store_kind": view.store.kind,
                    "agent": view.store.agent,
                    "profile": key.profile,
                    "family": rt.family,
                    "state": rt.state,
                    "expires_at": view.creds.expires_at if view.creds else None,
                    "next_refresh_at": rt.next_refresh_at,
                    "last_refresh_at": rt.last_refresh_at,
                    "attempts": rt.attempts,
                    "last_error": rt.last_error,
                    "login_command": view.store.login_command(key.profile),
                })
            return out

    def store_statuses(self) -> list[StoreStatus]:
        with self._lock:
            return [{"path": str(p), "kind": i.store.kind, "error": i.error}
                    for p, i in sorted(self.stores.items())]

    def publish(self) -> None:
        """Ask for state.json to be rewritten; bursts (a refresh storm) coalesce into one
        write per ``PUBLISH_DELAY`` instead of one fsync per profile."""
        with self._publish_lock:
            if self._publish_timer is not None:
                return
            # Many profiles: gather longer, one state.json of thousands of rows costs ~20 ms.
            delay = PUBLISH_DELAY if len(self.views) < 200 else 10 * PUBLISH_DELAY
            timer = threading.Timer(delay, self.publish_now)
            timer.daemon = True
            self._publish_timer = timer
        timer.start()

    def publish_now(self) -> None:
        import json

        with self._publish_lock:
            self._publish_timer = None

        profiles = self.profile_statuses()
        sweep = self.scheduler.get_job("sweep") if self.scheduler.running else None
        state: PublishedState = {
            "schema_version": 1,
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "started_at": self.started_at,
                "updated_at": 0.0,
                "next_sweep_at": sweep.next_run_time.timestamp()
                if sweep is not None and sweep.next_run_time else None,
                "margin": self.settings.margin,
            },
            "profiles": profiles,
            "stores": self.store_statuses(),
            "rejected": {fp: [t, r] for fp, (t, r) in self.history.rejected().items()},
        }
        body = json.dumps(state, sort_keys=True).encode()
        with self._publish_lock:
            if body == self._last_published:
                return
            self._last_published = body
            state["daemon"]["updated_at"] = time.time()
            try:
                write_state(self.settings.state_dir, state)
            except (OSError, StoreError) as exc:
                self.log.error("state_write_failed", error=str(exc))
        sdnotify.set_status(summary_line(profiles, time.time()))

    def alive(self) -> bool:
        return bool(self.scheduler.running) and time.monotonic() - self.last_tick < 60

    # -- lifecycle ------------------------------------------------------------------------------
    def _signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self.stop.set()
        self._wake.set()

    def reload(self) -> None:
        try:
            settings = load_settings(self._overrides, config_file=self._config_file)
        except ConfigError as exc:
            self.log.error("reload_failed", error=str(exc), message="keeping the old settings")
            return
        old_client = self.client
        self.settings = settings
        self.client = self._make_client(settings)
        assert self.engine is not None
        self.engine.client = self.client
        self.engine.lock_timeout = settings.lock_timeout
        old_client.close()
        self.scheduler.reschedule_job("sweep", trigger="interval",
                                      seconds=settings.sweep_interval)
        with self._lock:
            for info in self.stores.values():
                info.digest = None
            for family in self.families.values():
                family.head = ""  # re-plan with the new margin and jitter
        self.log.info("reloaded")
        self.rescan_all()

    def start(self) -> None:
        """Everything up to READY=1: lock, restore, first scan, jobs scheduled."""
        self.daemon_lock.acquire()
        self.salt = load_salt(self.settings.state_dir)
        self.engine = Engine(client=self.client, salt=self.salt, history=self.history,
                             journal=self.journal, lock_timeout=self.settings.lock_timeout,
                             stop=self.stop)
        self._restore()
        self._setup_services()
        self.scheduler.add_listener(self._job_submitted, EVENT_JOB_SUBMITTED)
        self.scheduler.start()
        self.rescan_all()
        self.scheduler.add_job(self.sweep, "interval", seconds=self.settings.sweep_interval,
                               id="sweep", executor="io")

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._signal)
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        self.log.info("started", version=__version__, stores=len(self.stores),
                      profiles=len(self.views), state_dir=str(self.settings.state_dir))
        sdnotify.ready()
        self.publish()
        watchdog = sdnotify.watchdog_interval()
        tick = max(0.2, min(15.0, self.settings.remind_interval / 2, watchdog or 15.0))
        wall, mono = time.time(), time.monotonic()
        while not self.stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            self.last_tick = time.monotonic()
            skew = (time.time() - wall) - (self.last_tick - mono)
            wall, mono = time.time(), self.last_tick
            if abs(skew) > CLOCK_JUMP and not self.stop.is_set():
                # A suspend or a clock change: re-read and re-plan now, not at the next sweep.
                self.log.warning("clock_jump", seconds=round(skew, 1))
                self.request_scan()
            if watchdog:
                sdnotify.watchdog_ping()
            if self._reload_requested and not self.stop.is_set():
                self._reload_requested = False
                self.reload()
            if not self.stop.is_set():
                self._notify()  # reminders while a login is needed; free otherwise
        self.log.info("stopping")
        sdnotify.stopping()
        self.shutdown()
        return 0

    def run_once(self) -> int:
        """Refresh whatever is due now, wait for it, exit: for timers and cron."""
        self.daemon_lock.acquire()
        try:
            self.salt = load_salt(self.settings.state_dir)
            self.engine = Engine(client=self.client, salt=self.salt, history=self.history,
                                 journal=self.journal, lock_timeout=self.settings.lock_timeout,
                                 stop=self.stop)
            self._restore()
            self.stop.set()  # reconcile plans but schedules nothing
            self.rescan_all()
            self.stop.clear()
            now = time.time()
            with self._lock:
                due = [f.id for f in self.families.values()
                       if (f.lagging or f.planned <= now)
                       and self.history.rejection(f.head) is None]
            for job_id in due:
                self._run_family_inner(job_id)
            self.stop.set()
            self.reconcile()
            statuses = self.profile_statuses()
            self.log.info("once_done", refreshed=len(due), profiles=len(statuses))
            if any(p["state"] in ("needs_login", "expired") for p in statuses):
                return 2
            if not statuses or any(p["state"] in ("retrying", "invalid_store")
                                   for p in statuses):
                return 1
            return 0
        finally:
            self.publish_now()
            self.client.close()
            self.daemon_lock.release()

    def shutdown(self) -> None:
        self.stop.set()
        with contextlib.suppress(Exception):
            self.scheduler.shutdown(wait=False)
        deadline = time.monotonic() + self.settings.http_timeout + 5
        with self._active_cv:
            while self._active and time.monotonic() < deadline:
                self._active_cv.wait(0.1)
        if self.engine is not None:
            # An in-flight write finishes before we go; a refresh that has not reached the
            # write step has already been told to stop waiting for locks.
            if self.engine.writing.acquire(timeout=10):
                self.engine.writing.release()
            self.engine.release_all()
        self.watcher.stop()
        if self.health is not None:
            self.health.stop()
        if self.notifier is not None:
            self.notifier.close(2.0)
        with contextlib.suppress(Exception):
            self._last_published = None
            self.publish_now()
        self.client.close()
        self.daemon_lock.release()


def _failure_reason(outcome: Outcome) -> str:
    reason = (outcome.reason or "").lower()
    if outcome.result == "rejected":
        return "rejected"
    if outcome.result == "lock_timeout":
        return "lock_timeout"
    if outcome.result == "write_failed":
        return "write_failed"
    if "429" in reason:
        return "http_429"
    if "timed out" in reason or "timeout" in reason:
        return "timeout"
    if "http 5" in reason:
        return "http_5xx"
    if "response" in reason or "json" in reason or "body" in reason:
        return "bad_response"
    if "connect" in reason or "network" in reason or "connection" in reason:
        return "network"
    return "other"
