"""The long-running process: wiring stores, watches, the scheduler and the engine together.

Data walks one way: stores are read into ``views`` (one per profile), views are grouped into
families, each family gets one scheduler job at its planned time, the job runs the engine,
and the engine's outcome updates the views and each profile's runtime record, which the
daemon publishes for ``status``. Everything the daemon believes can be rebuilt from the stores
(plus lineage fingerprints and the journal), which is why a missed event, a suspend or a
restart costs at most one sweep.

Threads: APScheduler's pool runs refreshes (at most ``max_concurrent_refreshes`` at once),
its ``io`` pool store scans (coalesced per store: never skipped), its ``hooks`` pool the
retries of a failed ``on_rotate``, watchdog's observer reports changes, an optional HTTP
thread serves health and metrics, and the main thread waits for signals and pings systemd's
watchdog.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from tenacity import RetryCallState, Retrying, wait_exponential_jitter

from . import __version__, discovery, hooks, paths, sdnotify
from .config import Settings, is_loopback_host, load_settings
from .coredump import disable_core_dumps
from .engine import Engine, Member, Outcome, current_token
from .errors import (
    EX_FAILURE,
    EX_NEEDS_LOGIN,
    EX_OK,
    ConfigError,
    LockTimeout,
    StoreError,
    StoreMalformed,
    StoreUnreadable,
)
from .escape import shell_join
from .fileio import remove_stale_temp_files
from .history import TokenHistory
from .hooks import HookResult, resolve_on_rotate, run_hook
from .journal import Journal
from .logsetup import REDACTOR, get_logger
from .models import Credentials, ProfileKey, fingerprint
from .planner import Timing, backoff_delay, refresh_at
from .qwen import QwenOAuthClient
from .ratelimit import RateLimiter
from .state import (
    JOURNAL_FILE,
    LINEAGE_FILE,
    STATE_FILE,
    DaemonLock,
    HookStatus,
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
#: A family run that changed nothing lasting (``not_due``, ``synced``) and is planned for
#: "now" again waits this long, doubling per such run up to ``IDLE_RETRY_CAP``: whatever
#: makes plan and engine disagree, it never becomes a busy loop on OpenClaw's lock.
IDLE_RETRY_BASE = 0.25
IDLE_RETRY_CAP = 60.0
#: After this many such runs in a row the daemon says so (once per streak).
IDLE_WARN_AFTER = 5
#: A job may fire this much before its retry time (scheduler and clock granularity).
RETRY_EARLY_SLACK = 0.05
#: Outcomes that leave a due family done, for ``run --once``'s count and exit code.
ONCE_SUCCESS = frozenset({"rotated", "synced", "not_due", "adopted"})
#: A wall-clock step larger than this between two main-loop ticks means suspend or a reset.
CLOCK_JUMP = 5.0
#: Signals that stop the daemon, and the one that reloads it.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: How long shutdown waits for a reload in progress (one stuck reading a FIFO never ends).
RELOAD_JOIN = 3.0
_NOT_RECEIVED = object()
#: How long a read that found a malformed file waits for the writer's lock to look again.
LOCKED_REREAD_TIMEOUT = 2.0
#: Secrets are scrubbed from logs until their token expires, plus this much (clock skew).
REDACT_GRACE = 60.0
#: A store whose status changed less than this long ago is read by the next sweep whatever its
#: ``stat()`` says: file times come from a coarse clock (a jiffy, up to 10 ms), so two
#: same-size writes within one tick can leave size and mtime alike (git's "racily clean").
RACY_WINDOW = 2.0
#: A rescan that changed nothing republishes state.json only every this many times.
QUIET_REPUBLISH = 12
#: How long state.json changes are gathered before one write.
PUBLISH_DELAY = 0.1
#: Delay before the n-th retry of a failed ``on_rotate``: 1-2 s, 2-3 s, 4-5 s... never more
#: than 60 s. The gateway keeps the consumed token until it is told, and once the old access
#: token expires it sends that token and locks the user out: the margin must exceed this.
HOOK_RETRY_WAIT = wait_exponential_jitter(initial=1, max=60, jitter=1)
#: Instances of one scan or refresh job the scheduler may start at once: never a reason to
#: skip one. The job itself decides (``_coalesced``, ``_run_family``) what a second one does.
JOB_INSTANCES = 64


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
class _HookEpisode:
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


def hook_retry_delay(failures: int) -> float:
    """Seconds before retrying a hook that failed ``failures`` times in a row (tenacity's
    exponential wait with jitter, capped)."""
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = max(1, failures)
    return float(HOOK_RETRY_WAIT(state))


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
    #: ``stat_key`` taken just before the last successful read, or None (never read, failed,
    #: or changed too recently to trust): a sweep skips a store whose key is unchanged.
    stat: tuple[int, int, int, int, int] | None = None
    #: (directory, file names) whose stale temp files a rescan removes; computed once.
    temp_names: list[tuple[Path, str]] | None = None


def stat_key(path: Path) -> tuple[int, int, int, int, int] | None:
    """(device, inode, size, mtime_ns, ctime_ns) of ``path``, or None if it cannot be trusted.

    A sweep reads and parses only the stores whose key changed. Any write in place changes
    size or mtime, an atomic rename changes the inode, a chmod, ``touch -d`` or ``cp -p``
    (which can restore an old mtime) changes ctime, which no program can set. The one blind
    spot is two rewrites of the same size within one tick of the file-time clock; a key whose
    ctime is within ``RACY_WINDOW`` of now is therefore not trusted (None: read next time),
    as git does for "racily clean" index entries. Events are never filtered this way: a
    change event always reads the file.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    if time.time() - st.st_ctime < RACY_WINDOW:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


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
        #: Signals received and not acted on yet, filled by the handlers (``_install_signals``)
        self._signals: dict[int, FrameType | None] = {}
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        #: Set (by the main loop) when a reload is wanted: many SIGHUPs, one pending reload.
        self._reload_wanted = threading.Event()
        self._reloader: threading.Thread | None = None
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
        #: clients a reload replaced while refreshes ran: closed when the last one ends
        self._retired_clients: list[QwenOAuthClient] = []
        #: family job id -> "Type: message" of its last crash, to log a traceback once a streak
        self._crashes: dict[str, str] = {}
        #: profile -> the failing on_rotate the previous run left (``_restore``), until started
        self._pending_hooks: dict[ProfileKey, HookStatus] = {}
        self.engine: Engine | None = None
        self.stores: dict[Path, _StoreInfo] = {}
        self.views: dict[ProfileKey, View] = {}
        self.runtime: dict[ProfileKey, Runtime] = defaultdict(Runtime)
        self.families: dict[str, Family] = {}
        self.family_of: dict[ProfileKey, str] = {}
        self.reverts: dict[str, _Reverts] = defaultdict(_Reverts)
        #: family job id -> consecutive runs that ended ``not_due``/``synced`` (idle back-off)
        self._idle_runs: dict[str, int] = {}
        self._last_published: bytes | None = None
        self._publish_timer: threading.Timer | None = None
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(settings.max_concurrent_refreshes),
                       "io": ThreadPoolExecutor(2), "hooks": ThreadPoolExecutor(2)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        self.watcher = DirectoryWatcher(
            self._on_fs_event, (paths.AUTH_STORE_NAME, paths.QWEN_CREDS_NAME),
            force_polling=settings.poll)
        #: store path -> its profile keys, so one store's update never scans every profile
        self.keys_by_store: dict[Path, set[ProfileKey]] = defaultdict(set)
        self._watched: dict[Path, bool] = {}
        #: spaces refresh requests at most ``max_refresh_rate`` a second (read at each use,
        #: so a reload changes it); waited for before any store lock is taken
        self._limiter = RateLimiter(lambda: self.settings.max_refresh_rate)
        #: rescans in a row that found nothing changed (``_replan_orphans``)
        self._quiet_rescans = 0
        #: family jobs running now: filled and emptied by the job itself (``_run_family``)
        self._running: set[str] = set()
        #: coalesced scans running now, and those asked for again meanwhile (``_coalesced``)
        self._scanning: set[str] = set()
        self._scan_again: set[str] = set()
        #: family id -> its on_rotate episode (the last result stays after a success)
        self._hooks: dict[str, _HookEpisode] = {}
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
        """Reload lineage, rejections, pending rotations and unfinished ``on_rotate`` episodes
        left by the previous run."""
        self.history.load()
        previous = read_state(self.settings.state_dir)
        if previous is not None:
            try:
                self._restore_state(previous)
            except Exception as exc:  # never a reason not to start: it is only a memory
                self.log.warning("state_ignored", file=str(self.settings.state_dir / STATE_FILE),
                                 error=f"{type(exc).__name__}: {exc}",
                                 message="the previous run's state could not be used; "
                                         "starting from the stores alone")
        for replaces, fp, creds, _members in self.journal.pending():
            REDACTOR.add(creds.access, creds.refresh, until=creds.expires_at + REDACT_GRACE)
            self.history.link(replaces, fp)
            self.history.remember(fp, creds, issued_at=time.time())
            self.log.warning("journal_replay", family=fp[:12],
                             message="tokens received before a crash or a failed write are "
                                     "being written to their stores")

    def _restore_state(self, previous: Any) -> None:
        """Take what ``state.json`` remembers: rejected tokens, last refresh times, and each
        profile whose ``on_rotate`` was failing (``failing_since``): the gateway was never
        told of the last rotation, and ``_resume_hooks`` tells it after the first scan.

        The file is ours, but an older or newer version, a hand edit or a bad disk can give it
        any shape: an entry that is not what we write is skipped, with one warning naming the
        file, and the rest is used.
        """
        bad: list[str] = []
        rejected = previous.get("rejected", {})
        good: dict[str, tuple[float, str]] = {}
        if isinstance(rejected, dict):
            for n, (fp, v) in enumerate(rejected.items()):
                if isinstance(fp, str) and isinstance(v, list) and len(v) == 2 and \
                        _finite(v[0]) and isinstance(v[1], str):
                    good[fp] = (float(v[0]), v[1])
                else:
                    bad.append(f"rejected #{n}")
        else:
            bad.append("rejected")
        self.history.load_rejected(good)
        profiles = previous.get("profiles", [])
        if not isinstance(profiles, list):
            bad.append("profiles")
            profiles = []
        for n, prof in enumerate(profiles):
            if not isinstance(prof, dict) or not isinstance(prof.get("store"), str) or \
                    not prof["store"] or not isinstance(prof.get("profile"), str):
                bad.append(f"profiles #{n}")
                continue
            key = ProfileKey(Path(prof["store"]), prof["profile"])
            last = prof.get("last_refresh_at")
            if last is not None and not _finite(last):
                bad.append(f"profiles #{n} last_refresh_at")
                last = None
            self.runtime[key].last_refresh_at = float(last) if last is not None else None
            if prof.get("hook") is not None:
                hook = _hook_status(prof["hook"])
                if hook is None:
                    bad.append(f"profiles #{n} hook")
                elif hook["failing_since"] is not None:
                    self._pending_hooks[key] = hook
        if bad:
            self.log.warning("state_entries_ignored",
                             file=str(self.settings.state_dir / STATE_FILE), count=len(bad),
                             entries=bad[:5],
                             message="entries of an unexpected shape were skipped; the file "
                                     "is rewritten from what the daemon knows")

    def _resume_hooks(self) -> None:
        """Tell the gateway what the previous run could not.

        A failing ``on_rotate`` lived only in memory: after a restart the gateway would keep
        the consumed token until the next rotation, hours later, and lock itself out. So an
        episode is rebuilt for each family with a profile ``_restore_state`` found failing,
        with the family's current tokens and the current command, and run at once (then
        retried as before). Its profiles' rows keep the failing state until it succeeds.
        """
        pending, self._pending_hooks = self._pending_hooks, {}
        command = resolve_on_rotate(self.settings.on_rotate)
        if not pending or command is None:
            return
        started: list[tuple[str, list[str]]] = []
        with self._lock:
            for family in self.families.values():
                found = [pending[k] for k in family.keys if k in pending]
                holders = [k for k in family.keys
                           if k in self.views and self.views[k].creds is not None]
                if not found or not holders or family.id in self._hooks:
                    continue
                first = next((k for k in holders if self.views[k].store.kind == "openclaw"),
                             holders[0])
                creds = family.creds
                variables = {
                    "EVENT": "rotated",
                    "PROFILE": first.profile,
                    "STORE": str(first.store),
                    "EXPIRES_AT": datetime.fromtimestamp(creds.expires_at, UTC)
                    .strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "EXPIRES_MS": str(creds.expires_ms),
                    "PROFILES": "\n".join(f"{k.store}#{k.profile}" for k in holders),
                }
                newest = max(found, key=lambda h: h["at"])
                episode = _HookEpisode(command, variables, (creds.access, creds.refresh),
                                       list(family.keys), 1)
                episode.last = HookResult(command, newest["returncode"], newest["output"],
                                          newest["timed_out"])
                episode.last_at = newest["at"]
                episode.failing_since = min(h["failing_since"] or newest["at"] for h in found)
                episode.failures = max(h["failures"] for h in found)
                self._hooks[family.id] = episode
                started.append((family.id, [str(k) for k in holders]))
        for family_id, names in started:
            self.log.warning("on_rotate_resumed", profiles=names,
                             message="the gateway was not told of the last rotation before "
                                     "the previous run stopped; telling it now")
            self._start_hook(family_id, 1)

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
        changed = False
        with self._lock:
            current = {p for p, _ in found}
            for path in list(self.stores):
                if path not in current:
                    self._forget_store(path)
                    changed = True
            for path, kind in found:
                if path not in self.stores:
                    self.stores[path] = _StoreInfo(discovery.open_store(path, kind),
                                                   path in explicit)
                    self.log.info("store_found", store=self.stores[path].store.describe(),
                                  kind=kind)
                    changed = True
            infos = list(self.stores.values())
        for info in infos:
            changed |= self.read_store(info, unchanged_ok=True)
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
        if changed:
            self.reconcile()
        else:
            self._replan_orphans()

    def _replan_orphans(self) -> None:
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
        scheduled: set[str] = set()
        with contextlib.suppress(Exception):
            scheduled = {job.id for job in self.scheduler.get_jobs()}
        orphans: set[ProfileKey] = set()
        with self._lock:
            for family in self.families.values():
                if family.id not in scheduled and family.id not in self._running and \
                        self.history.rejection(family.head) is None:
                    orphans.update(family.keys)
            orphans.update(k for k, v in self.views.items()
                           if v.fp is not None and k not in self.family_of)
        if orphans:
            self.reconcile(orphans)
        if self.scheduler.running:
            self.scheduler.wakeup()
        self._quiet_rescans += 1
        if self._quiet_rescans % QUIET_REPUBLISH == 0:
            self.publish()

    def _remove_stale_temp_files(self, infos: list[_StoreInfo]) -> None:
        by_dir: dict[Path, set[str]] = defaultdict(set)
        for info in infos:
            if info.temp_names is None or info.stat is None:
                # lock_path() resolves the path (realpath): once per store, not per sweep
                temp = [(info.store.path.parent, info.store.path.name)]
                with contextlib.suppress(StoreError, OSError):
                    lock = info.store.lock_path()
                    temp.append((lock.parent, lock.name))  # lockfile.py's link-into-place
                info.temp_names = temp
            for directory, name in info.temp_names:
                by_dir[directory].add(name)
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

    def read_store(self, info: _StoreInfo, *, unchanged_ok: bool = False) -> bool:
        """Read one store and update its profiles' views; True if any view may have changed.

        ``unchanged_ok`` (rescans and sweeps): skip the read when the store's ``stat_key`` is
        the one of the last good read. An event or a refresh always reads.
        """
        store = info.store
        stat = stat_key(store.path)  # before reading: a write after this changes the key
        if unchanged_ok and stat is not None and stat == info.stat and \
                info.digest is not None and info.error is None:
            return False
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
                return True
            except (LockTimeout, OSError):
                try:
                    snap = store.read()
                except StoreError as exc:
                    self._store_failed(info, exc)
                    return True
        except StoreError as exc:
            self._store_failed(info, exc)
            return True
        digest = hashlib.sha256(snap.raw).hexdigest()
        with self._lock:
            if info.error is not None:
                self.log.info("store_recovered", store=store.describe())
                info.error = None
            info.stat = stat
            if digest == info.digest:
                return False
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
        return True

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
            info.stat = None
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
            # A login, or a sibling that refreshed early: if the latter, the family's own token
            # is consumed. Remember the heir; the family adopts it instead of spending its own.
            self.history.observe(old_head, fp)
            self.log.info("family_split", store=previous.store.describe(), profile=key.profile,
                          message="this profile got new tokens of its own (a new login?) and "
                                  "now refreshes on its own; its old family adopts them "
                                  "rather than refresh a token that may be consumed")

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
                # Old families stay readable while planning: a family whose token is the same
                # keeps the jitter drawn once (``_plan_family``); the ones gone are dropped below.
                keys = set(self.views)
                old_ids = set(self.families)
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
        if touched is None and self.scheduler.running:
            # Unchanged plans add no job, so nothing else would wake the scheduler: after a
            # suspend its monotonic wait can outlast a due time that passed in wall time.
            self.scheduler.wakeup()
        self.publish()

    def _affected(self, touched: set[ProfileKey]) -> tuple[set[ProfileKey], set[str]]:
        """The profiles whose grouping can change when ``touched`` changed, and their old
        families: the touched profiles' families, and any family sharing a head with them."""
        touched = {k for k in touched if k in self.views} | {
            k for k in touched if k in self.family_of}
        old_ids = {self.family_of[k] for k in touched if k in self.family_of}
        heads = {self.history.newest(v.fp) for k in touched
                 if (v := self.views.get(k)) is not None and v.fp is not None}
        # newest(): a family planned on a token below its lineage head (``current_token``)
        old_ids |= {f.id for f in self.families.values()
                    if self.history.newest(f.head) in heads}
        keys = {k for k in touched if k in self.views}
        for job_id in old_ids:
            family = self.families.get(job_id)
            if family is not None:
                keys |= {k for k in family.keys if k in self.views}
        return keys, old_ids

    def _plan_family(self, head: str, keys: list[ProfileKey], now: float) -> Family:
        views = [self.views[k] for k in keys]
        # The token the engine will refresh, by the engine's own rule (one home): a lineage
        # head no store holds and we do not remember is not it, or plan and run disagree.
        picked = current_token(self.history, [(v.fp, v.creds) for v in views
                                              if v.fp is not None and v.creds is not None])
        if picked is not None:
            head = picked[0]
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
        idle = self._idle_runs.get(job_id, 0)
        if run_at is not None and run_at <= now and idle:
            # The last run changed nothing lasting and the plan says "now" again: back off.
            run_at = now + min(IDLE_RETRY_BASE * 2.0 ** (idle - 1), IDLE_RETRY_CAP)
        elif run_at is None or run_at > now:
            self._idle_runs.pop(job_id, None)
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
        # A run in progress is no reason to wait: a job that fires meanwhile returns at once
        # (``_run_family``), and the running one re-plans the family when it ends.
        job = self.scheduler.get_job(job_id)
        when = datetime.fromtimestamp(run_at, UTC)
        if job is not None and job.next_run_time is not None and \
                abs(job.next_run_time.timestamp() - run_at) < 0.05:
            return
        self.scheduler.add_job(self._run_family, "date", run_date=when, id=job_id,
                               args=[job_id], replace_existing=True,
                               max_instances=JOB_INSTANCES)

    # -- one refresh -----------------------------------------------------------------------------
    def _run_family(self, job_id: str) -> None:
        """One family job. Its 'running' mark is set and cleared here, by the job itself, so
        no scheduler event can arrive late and leave it set: a second instance that starts
        while one runs returns at once, and the running one re-plans the family at its end."""
        with self._lock:
            if job_id in self._running:
                return
            self._running.add(job_id)
        with self._active_cv:
            if self.stop.is_set():
                with self._lock:
                    self._running.discard(job_id)
                return
            self._active += 1
        outcome = None
        with self._lock:
            family = self.families.get(job_id)
            keys = set(family.keys) if family is not None else set()
        try:
            outcome = self._run_family_inner(job_id)
        except Exception as exc:  # a bug or hostile input must not end this profile's refreshes
            outcome = self._job_crashed(job_id, keys, exc)
        else:
            with self._lock:
                self._crashes.pop(job_id, None)
        finally:
            with self._lock:
                self._running.discard(job_id)
            retired: list[QwenOAuthClient] = []
            with self._active_cv:
                self._active -= 1
                if self._active == 0:
                    retired, self._retired_clients = self._retired_clients, []
                self._active_cv.notify_all()
            for client in retired:  # replaced by a reload while this refresh used it
                client.close()
        if self.stop.is_set():
            return
        self.reconcile(keys)
        if outcome is not None and outcome.result == "rejected":
            # state.json says needs_login before anyone is told so (status agrees with
            # the notification), not a publish delay later.
            self.publish_now()
        self._notify()

    def _job_crashed(self, job_id: str, keys: set[ProfileKey], exc: Exception) -> Outcome:
        """Turn an unexpected exception in a family job into a transient failure.

        Without this, one exception (a bug, or hostile input nobody foresaw) would leave the
        family "refreshing" with no job: never refreshed again until a sweep happened to
        re-plan it, and in ``run --once`` it would abort every other family too. Here the
        family backs off like after a network error and is re-planned by its caller. The
        traceback is logged (redacted, like every log line) once per streak of the same
        crash: a bug that fires at every retry says so once, then one line per retry.
        """
        name = type(exc).__name__
        signature = f"{name}: {exc}"
        now = time.time()
        with self._lock:
            first = self._crashes.get(job_id) != signature
            self._crashes[job_id] = signature
            family = self.families.get(job_id)
            if family is not None:
                keys = keys | set(family.keys)
            keys = {k for k in keys if k in self.views}
            attempts = max((self.runtime[k].attempts for k in keys), default=0) + 1
            delay = backoff_delay(attempts, cap=self.settings.retry_max,
                                  expires_in=(family.creds.expires_at - now
                                              if family is not None else None))
            reason = f"internal error ({name}); retrying"
            for key in keys:
                rt = self.runtime[key]
                if rt.state == "refreshing":
                    rt.state = "ok"
                rt.attempts, rt.retry_at, rt.last_error = attempts, now + delay, reason
        profiles = sorted(str(k) for k in keys)
        if first:
            self.log.error("refresh_crashed", profiles=profiles, error=signature,
                           retry_in_s=round(delay, 1), exc_info=exc,
                           message="an unexpected error ended this refresh; it is retried "
                                   "with backoff, other profiles are not affected. Please "
                                   "report it with this traceback")
        else:
            self.log.warning("refresh_failed", profiles=profiles, result="transient",
                             reason=reason, retry_in_s=round(delay, 1))
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.refresh_finished("transient", 0.0, "other")
        return Outcome("transient", reason=reason)

    def _run_family_inner(self, job_id: str) -> Outcome | None:
        assert self.engine is not None
        with self._lock:
            family = self.families.get(job_id)
            if family is None:
                return None
            # A job that fires before the family's back-off has run out (a scan re-planned it
            # while the failed attempt was still running, and the job waited for a worker) must
            # not send early: the back-off and Retry-After are promises to the server. The
            # caller re-plans the family, at its retry time.
            retry_at = max((self.runtime[k].retry_at or 0.0) for k in family.keys)
            if retry_at > time.time() + RETRY_EARLY_SLACK:
                return None
            members = [Member(self.views[k].store, k.profile) for k in family.keys
                       if k in self.views]
            # A retry after a failed refresh finds the token still due (planned is in the past);
            # a retry after a failed write finds the new token not due and only writes.
            due_at = family.planned
            # A sibling seen replacing our token may have spent it: take its token rather
            # than send ours (a consumed token sent is a rejection, and a lost login).
            adopted = self._adopt_heir(family) if time.time() >= due_at else None
            if adopted is None:
                for key in family.keys:
                    if time.time() >= due_at:
                        self.runtime[key].state = "refreshing"
        if adopted is not None:
            self._apply_outcome(family, members, adopted)
            return adopted
        if time.time() >= due_at:
            self.publish()
            # A request is about to leave: wait for its slot now, holding no lock (OpenClaw's
            # lock held while we queue would stall OpenClaw). Stopping: re-planned at start.
            if not self._limiter.acquire(self.stop):
                return None
        outcome = self.engine.run(members, due_at=due_at, planned_fp=family.head)
        if outcome.result == "rejected":
            # Never a lost login while a store we manage holds a descendant of that token.
            adopted = self._adopt_heir(family)
            if adopted is not None:
                adopted.duration = outcome.duration
                outcome = adopted
        self._apply_outcome(family, members, outcome)
        with self._lock:
            infos = [self.stores.get(m.store.path) for m in members]
        for info in dict.fromkeys(i for i in infos if i is not None):
            self.read_store(info)
        return outcome

    def _say_what_is_missing(self) -> None:
        """A daemon that cannot do its job says so at start, as a warning, with what to do:
        no profile to refresh, or an ``on_rotate = auto`` that finds no ``openclaw`` (the
        gateway would never be told, and would lock itself out at the next expiry)."""
        if not self.views:
            self.log.warning(
                "no_profile_found", stores=len(self.stores),
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

    def _adopt_heir(self, family: Family) -> Outcome | None:
        """Link the family's head to the newest live token seen replacing it, if any.

        Live: a store we manage holds it (or we rotated it ourselves) and the server has not
        rejected it. The write to the members follows at once, as a sync under every member's
        lock, because the family is regrouped around the heir and lags behind it.
        """
        with self._lock:
            for heir in reversed(self.history.heirs(family.head)):  # the newest first
                if self.history.rejection(heir) is not None:
                    continue
                holder = next((k for k, v in sorted(self.views.items())
                               if v.fp == heir and v.creds is not None), None)
                if holder is None and self.history.credentials(heir) is None:
                    continue
                self.history.link(self.history.newest(family.head), heir)
                where = (f"{self.views[holder].store.describe()}#{holder.profile}"
                         if holder is not None else "the daemon's memory")
                return Outcome("adopted", fp=heir, reason=f"held by {where}")
        return None

    def _apply_outcome(self, family: Family, members: list[Member], outcome: Outcome) -> None:
        now = time.time()
        names = [f"{m.store.describe()}#{m.profile}" for m in members]
        result = outcome.result
        if self.metrics is not None and result != "not_due":
            reason = _failure_reason(outcome) \
                if result not in ("rotated", "synced", "adopted") else None
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
            if result in ("not_due", "synced"):  # changed nothing lasting: idle back-off
                idle = self._idle_runs[family.id] = self._idle_runs.get(family.id, 0) + 1
                if idle == IDLE_WARN_AFTER:
                    self.log.warning(
                        "no_progress", profiles=names, result=result, runs=idle,
                        message="this family was run again and again without a refresh; "
                                "runs are now spaced out (see qwen-refresher status)")
            else:
                self._idle_runs.pop(family.id, None)
            if result in ("rotated", "synced", "not_due", "adopted"):
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
                # Retry-After never pushes the retry past the token's expiry (nor retry_max).
                delay = backoff_delay(attempts, cap=self.settings.retry_max,
                                      retry_after=outcome.retry_after,
                                      expires_in=(outcome.creds.expires_at - now
                                                  if outcome.creds is not None else None))
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
        elif result == "adopted":
            self.log.warning("adopted_descendant", profiles=names, source=outcome.reason,
                             message="another program replaced this family's refresh token "
                                     "in a sibling store; the family takes that token instead "
                                     "of sending its own, which may be consumed")
        elif result == "rejected":
            first = members[0]
            login = shell_join(["qwen-refresher", "login", "--store", str(first.store.path),
                                "--profile", first.profile])
            others = sorted({m.store.login_command(m.profile) for m in members})
            self.log.error("needs_login", profiles=names, reason=outcome.reason,
                           run=login, alternatives=others,
                           message=f"Qwen rejected the refresh token; log in again with: "
                                   f"{login} (it writes every store of the family; "
                                   f"OpenClaw's own command works too, one store at a time)")
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
            self._run_on_rotate(family, members, outcome)

    def _run_on_rotate(self, family: Family, members: list[Member], outcome: Outcome) -> None:
        """Tell the gateway (``on_rotate``), and keep telling it until it hears.

        Until the hook succeeds the gateway holds the consumed token, and once its old access
        token expires it sends that token: a lock-out. So a failed hook is retried with
        backoff (``HOOK_RETRY_WAIT``) until it succeeds or a newer rotation of the family
        takes its place; it never causes another refresh.
        """
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
        with self._lock:
            previous = self._hooks.get(family.id)
            episode = _HookEpisode(command, variables,
                                   (outcome.creds.access, outcome.creds.refresh),
                                   [m.key for m in members],
                                   previous.generation + 1 if previous is not None else 1)
            if previous is not None:
                # Superseded: the gateway has still not been told since the first failure.
                episode.last, episode.last_at = previous.last, previous.last_at
                episode.failing_since, episode.failures = (previous.failing_since,
                                                           previous.failures)
                with contextlib.suppress(Exception):
                    self.scheduler.remove_job(_hook_job_id(family.id, previous.generation))
            self._hooks[family.id] = episode
        self._start_hook(family.id, episode.generation)

    def _start_hook(self, family_id: str, generation: int) -> None:
        """Run an episode's first attempt on the ``hooks`` pool, like its retries.

        Never on the caller's thread: that is a refresh worker, and a gateway that hangs keeps
        its hook running for ``hook_timeout``; four hung hooks would be four workers taken
        from refreshes, and other families would expire waiting. Without a running scheduler
        (``run --once``, which waits for nothing else) the hook runs here.
        """
        if self.scheduler.running and not self.stop.is_set():
            # The scheduler stopping meanwhile raises: then _attempt_hook below sees stop.
            with contextlib.suppress(Exception):
                self.scheduler.add_job(
                    self._attempt_hook, "date", id=_hook_job_id(family_id, generation),
                    run_date=datetime.now(UTC), args=[family_id, generation],
                    replace_existing=True, executor="hooks")
                return
        self._attempt_hook(family_id, generation)

    def _attempt_hook(self, family_id: str, generation: int) -> None:
        """Run one episode's hook once; on failure schedule the next try (a ``hooks`` job)."""
        with self._lock:
            episode = self._hooks.get(family_id)
        if episode is None or episode.generation != generation or self.stop.is_set():
            return  # superseded (the newer rotation runs its own hook) or shutting down
        try:
            result = run_hook(episode.command, episode.variables,
                              timeout=self.settings.hook_timeout, secrets=episode.secrets,
                              runner=self.settings.hook_runner_argv)
        except Exception as exc:  # counted as a failed run: the episode keeps its retries
            self.log.error("on_rotate_crashed", command=episode.command,
                           error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            result = HookResult(episode.command, None, f"could not run: {type(exc).__name__}")
        now = time.time()
        with self._lock:
            if self._hooks.get(family_id) is not episode:
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
        if episode.next_retry_at is not None and not result.ok and not self.stop.is_set():
            with contextlib.suppress(Exception):
                self.scheduler.add_job(
                    self._attempt_hook, "date", id=_hook_job_id(family_id, generation),
                    run_date=datetime.fromtimestamp(episode.next_retry_at, UTC),
                    args=[family_id, generation], replace_existing=True, executor="hooks")
        self.publish()

    # -- events -------------------------------------------------------------------------------
    def _on_fs_event(self, path: Path) -> None:
        if self.stop.is_set():
            return
        with self._lock:
            known = path.absolute() in self.stores
        job_id = f"scan:{path}" if known else "discover"
        run_at = datetime.fromtimestamp(time.time() + self.settings.debounce, UTC)
        func: Callable[..., None] = self._scan_one if known else self.rescan_all
        args = [path.absolute()] if known else []
        with contextlib.suppress(Exception):
            self.scheduler.add_job(self._coalesced, "date", run_date=run_at, id=job_id,
                                   args=[job_id, func, *args], replace_existing=True,
                                   executor="io", max_instances=JOB_INSTANCES)

    def _coalesced(self, key: str, func: Callable[..., None], *args: Any) -> None:
        """Run a scan; asked for again while it runs, run it once more right after.

        The scheduler would skip a second instance ("maximum number of running instances"),
        and a write landing just after the running scan read its file would wait for the
        next sweep. Here a request during a run is never dropped, only merged: however many
        arrive, one more run follows, and it reads everything they wrote.
        """
        with self._lock:
            if key in self._scanning:
                self._scan_again.add(key)
                return
            self._scanning.add(key)
        done = False
        try:
            while not done:
                func(*args)
                with self._lock:  # decide and unmark at once: a request now is never lost
                    if key not in self._scan_again or self.stop.is_set():
                        self._scanning.discard(key)
                        done = True
                    self._scan_again.discard(key)
        finally:
            if not done:  # the scan raised: the next request starts afresh
                with self._lock:
                    self._scanning.discard(key)
                    self._scan_again.discard(key)

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
        if not self._login_episode and not self.history.rejected():
            # Only a rejection makes a profile needs_login (``_plan_family``): with none, the
            # scan over every profile below (O(profiles) per refresh, quadratic in a storm)
            # could only find nothing.
            return
        with self._lock:
            in_play = any(rt.state == "needs_login" for rt in self.runtime.values())
        if in_play or self._login_episode:
            self._login_episode = in_play
            self.notifier.update(self.profile_statuses())

    def request_scan(self) -> None:
        with contextlib.suppress(Exception):
            self.scheduler.add_job(self._coalesced, "date", id="discover",
                                   args=["discover", self.rescan_all], replace_existing=True,
                                   executor="io", max_instances=JOB_INSTANCES)

    def sweep(self) -> None:
        """The safety net for missed events, suspends and clock jumps: rediscover, re-read
        every store whose ``stat_key`` changed (an unchanged one costs one ``stat()``), and
        re-plan every family (a full ``reconcile``, which also wakes the scheduler)."""
        self._coalesced("discover", self.rescan_all)  # or once more after the running one
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
            # An on_rotate episode whose profiles are all gone has nobody left to tell.
            for family_id, episode in list(self._hooks.items()):
                if not any(k in self.views for k in episode.keys):
                    del self._hooks[family_id]
                    with contextlib.suppress(Exception):
                        self.scheduler.remove_job(_hook_job_id(family_id, episode.generation))
        # A rotated-away access token stays valid until it expires: each secret was added
        # with its token's expiry, and is kept until then even when no store holds it.
        REDACTOR.retain(live)
        self._notify()

    # -- publishing -----------------------------------------------------------------------------
    def _hook_statuses(self) -> dict[ProfileKey, HookStatus]:
        """Each profile's last on_rotate result: that of the newest episode naming it."""
        out: dict[ProfileKey, HookStatus] = {}
        for episode in sorted(self._hooks.values(), key=lambda e: e.last_at):
            status = episode.status()
            if status is not None:
                for key in episode.keys:
                    out[key] = status
        return out

    def profile_statuses(self) -> list[ProfileStatus]:
        with self._lock:
            out: list[ProfileStatus] = []
            hooks = self._hook_statuses()
            for key in sorted(self.views):
                view, rt = self.views[key], self.runtime[key]
                row: ProfileStatus = {
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
                }
                if key in hooks:
                    row["hook"] = hooks[key]
                out.append(row)
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
    def _install_signals(self) -> socket.socket:
        """Handlers that only record a signal, and a wake-up socket for the main loop.

        The handler is ``dict.__setitem__`` of ``self._signals``: C code, which the interpreter
        calls on the main thread between two bytecodes. It takes no lock, logs nothing and
        runs no Python code, so a signal landing anywhere (inside ``Event.wait``, inside a
        lock, inside another handler) can neither deadlock the main thread on a lock it holds
        nor nest handlers into a RecursionError, however many arrive. The interpreter's own
        C-level handler writes the signal number to the wake-up socket, which ends the main
        loop's ``poll`` at once; the bytes only wake, what counts is the dict (a storm fills
        the socket and bytes are dropped, ``warn_on_full_buffer=False``).
        """
        receive, send = socket.socketpair()
        receive.setblocking(False)
        send.setblocking(False)
        signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        self._wakeup = (receive, send)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._signals.__setitem__)
        return receive

    def _uninstall_signals(self) -> None:
        """Stop waking a loop that is gone; the recording handlers stay (a second SIGTERM
        during the last steps of the exit must not kill us with a non-zero status)."""
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._wakeup:
                sock.close()
            self._wakeup = None

    def _take_signals(self, wakeup: socket.socket) -> set[int]:
        """Empty the wake-up socket, then take the recorded signals (in this order: a signal
        after the draining leaves a byte for the next poll, so none is slept through)."""
        with contextlib.suppress(OSError):  # BlockingIOError: empty
            while wakeup.recv(4096):
                pass
        return {signum for signum in HANDLED_SIGNALS
                if self._signals.pop(signum, _NOT_RECEIVED) is not _NOT_RECEIVED}

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
        if self.stop.is_set():
            return
        try:
            settings = load_settings(self._overrides, config_file=self._config_file)
        except ConfigError as exc:
            self.log.error("reload_failed", error=str(exc), message="keeping the old settings")
            return
        if self.stop.is_set():  # SIGTERM while the file was read: shutdown has begun
            return
        old_client = self.client
        self.settings = settings
        self.client = self._make_client(settings)
        assert self.engine is not None
        self.engine.client = self.client
        self.engine.lock_timeout = settings.lock_timeout
        # A refresh may be reading the server's answer on the old client right now: the
        # server has already rotated, so closing it under the request would lose the only
        # copy of the new tokens (and the next try sends the consumed one). The old client is
        # closed by the last refresh that ends (``_run_family``), or here if none runs.
        with self._active_cv:
            self._retired_clients.append(old_client)
            retired: list[QwenOAuthClient] = []
            if self._active == 0:
                retired, self._retired_clients = self._retired_clients, []
        for client in retired:
            client.close()
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
        self.scheduler.start()
        self.rescan_all()
        self._resume_hooks()
        self.scheduler.add_job(self.sweep, "interval", seconds=self.settings.sweep_interval,
                               id="sweep", executor="io")

    def run(self) -> int:
        """The main loop: wait for a signal or the next tick, ping the watchdog, notice clock
        jumps, hand reloads to the reloader thread, and stop on SIGTERM/SIGINT.

        Order matters: core dumps off before any token is read; handlers installed before
        ``start`` (a SIGTERM during it is recorded and acted on as soon as it returns)."""
        problem = disable_core_dumps()
        if problem is not None:
            self.log.warning("core_dumps_on", error=problem,
                             message="could not set RLIMIT_CORE to 0; a crash could write the "
                                     "tokens in memory to a core file")
        wakeup = self._install_signals()
        try:
            self.start()
        except BaseException:
            self.shutdown()
            self._uninstall_signals()
            raise
        self.log.info("started", version=__version__, stores=len(self.stores),
                      profiles=len(self.views), state_dir=str(self.settings.state_dir))
        self._say_what_is_missing()
        sdnotify.ready()
        self.publish()
        self._reloader = threading.Thread(target=self._reload_loop, name="reload", daemon=True)
        self._reloader.start()
        watchdog = sdnotify.watchdog_interval()
        tick = max(0.2, min(15.0, self.settings.remind_interval / 2, watchdog or 15.0))
        poller = select.poll()
        poller.register(wakeup, select.POLLIN)
        wall, mono = time.time(), time.monotonic()
        received: set[int] = self._take_signals(wakeup)  # any that came during start()
        while not received & STOP_SIGNALS:
            if signal.SIGHUP in received:
                self._reload_wanted.set()  # set again while pending: still one reload
            if not received:
                self._notify()  # reminders while a login is needed; free otherwise
            poller.poll(tick * 1000)
            received = self._take_signals(wakeup)
            self.last_tick = time.monotonic()
            skew = (time.time() - wall) - (self.last_tick - mono)
            wall, mono = time.time(), self.last_tick
            if abs(skew) > CLOCK_JUMP:
                # A suspend or a clock change: re-read and re-plan now, not at the next sweep.
                self.log.warning("clock_jump", seconds=round(skew, 1))
                self.request_scan()
            if watchdog:
                sdnotify.watchdog_ping()
        self.log.info("stopping", signal=signal.Signals(min(received & STOP_SIGNALS)).name)
        sdnotify.stopping()
        self.shutdown()
        self._uninstall_signals()
        return 0

    def run_once(self) -> int:
        """Refresh whatever is due now, wait for it, exit: for timers and cron."""
        disable_core_dumps()
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
            self._resume_hooks()
            self._say_what_is_missing()
            now = time.time()
            with self._lock:
                due = [f.id for f in self.families.values()
                       if (f.lagging or f.planned <= now)
                       and self.history.rejection(f.head) is None]
            results: list[Outcome | None] = []
            for job_id in due:  # one family's crash never keeps the others from their turn
                try:
                    results.append(self._run_family_inner(job_id))
                except Exception as exc:
                    with self._lock:
                        family = self.families.get(job_id)
                        keys = set(family.keys) if family is not None else set()
                    results.append(self._job_crashed(job_id, keys, exc))
            done = [o for o in results if o is not None and o.result in ONCE_SUCCESS]
            self.stop.set()
            self.reconcile()
            statuses = self.profile_statuses()
            self.log.info("once_done", due=len(due), refreshed=len(done),
                          failed=len(due) - len(done), profiles=len(statuses))
            if any(p["state"] in ("needs_login", "expired") for p in statuses):
                return EX_NEEDS_LOGIN
            if len(done) < len(due) or not statuses or any(
                    p["state"] in ("retrying", "invalid_store") for p in statuses):
                return EX_FAILURE  # something due could not be refreshed: say so
            return EX_OK
        finally:
            self.publish_now()
            self.client.close()
            self.daemon_lock.release()

    def shutdown(self) -> None:
        """Stop everything, in an order that keeps what matters: running hooks are ended at
        once (they never delay the exit), a reload in progress is given ``RELOAD_JOIN``, an
        in-flight refresh its HTTP deadline (its answer holds the rotated tokens)."""
        self.stop.set()
        hooks.abort_all()
        self._reload_wanted.set()  # the reloader wakes, sees stop and returns
        if self._reloader is not None:
            self._reloader.join(RELOAD_JOIN)  # before the scheduler it uses goes
        with contextlib.suppress(Exception):
            # Paused first, and past any round of due jobs already under way (it holds the job
            # stores' lock): APScheduler flips its state to "stopped" without that lock, and
            # a due job being processed meanwhile raises JobLookupError in its thread.
            self.scheduler.pause()
            with self.scheduler._jobstores_lock:
                pass
            self.scheduler.shutdown(wait=False)
        deadline = time.monotonic() + self.settings.http_timeout + 5
        with self._active_cv:
            while self._active and time.monotonic() < deadline:
                self._active_cv.wait(0.1)
        hooks.abort_all()  # one a refresh started after the first call
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
        with self._active_cv:
            retired, self._retired_clients = self._retired_clients, []
        for client in retired:
            client.close()
        self.client.close()
        self.daemon_lock.release()


def _finite(value: object) -> bool:
    """A JSON number we can use as a time: not a bool, not NaN or infinite."""
    import math

    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def _hook_status(value: object) -> HookStatus | None:
    """A ``hook`` row of a previous ``state.json``, or None if it is not one we would write."""
    if not isinstance(value, dict):
        return None
    ok: Any = value.get("ok")
    at: Any = value.get("at")
    rc: Any = value.get("returncode")
    timed_out: Any = value.get("timed_out", False)
    output: Any = value.get("output", "")
    since: Any = value.get("failing_since")
    failures: Any = value.get("failures", 0)
    retry: Any = value.get("next_retry_at")
    if not isinstance(ok, bool) or not _finite(at) or \
            not (rc is None or (isinstance(rc, int) and not isinstance(rc, bool))) or \
            not isinstance(timed_out, bool) or not isinstance(output, str) or \
            not (since is None or _finite(since)) or isinstance(failures, bool) or \
            not isinstance(failures, int) or not (retry is None or _finite(retry)):
        return None
    status: HookStatus = {"ok": ok, "at": float(at), "returncode": rc, "timed_out": timed_out,
            "output": output[:300], "failing_since": float(since) if since is not None else None,
            "failures": max(0, failures), "next_retry_at": float(retry) if retry is not None
            else None}
    return status


def _hook_job_id(family_id: str, generation: int) -> str:
    return f"hook:{family_id}:{generation}"


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
