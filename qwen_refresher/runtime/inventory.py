"""Stores -> profile views: discovery, reading one store, and observing changes made by others.

Every read answers one question for the planner: which profiles may have changed
(``StoreRead.keys``). A sweep (``Inventory.sweep``) rediscovers the stores and reads those
whose ``stat_key`` changed; an event reads its store whatever the key says. A token that
changed under us is classified here (``observe_change``): another program's rotation (the
family follows it), a revert (the next run heals it) or a new login (the profile leaves its
family). Planning and scheduling are not done here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import discovery, paths
from ..config import Settings
from ..errors import LockTimeout, StoreError, StoreMalformed, StoreUnreadable
from ..fileio import remove_stale_temp_files, shared_checks
from ..history import TokenHistory
from ..logsetup import REDACTOR
from ..models import ProfileKey, fingerprint
from ..protocols import Logger, MetricsSink
from ..state import JOURNAL_FILE, STATE_FILE
from ..stores.base import Store, StoreSnapshot
from .memory import Memory, StoreInfo, View

#: How long a read that found a malformed file waits for the writer's lock to look again.
LOCKED_REREAD_TIMEOUT = 2.0
#: Secrets are scrubbed from logs until their token expires, plus this much (clock skew).
REDACT_GRACE = 60.0
#: A store whose status changed less than this long ago is read by the next sweep whatever its
#: ``stat()`` says: file times come from a coarse clock (a jiffy, up to 10 ms), so two
#: same-size writes within one tick can leave size and mtime alike (git's "racily clean").
RACY_WINDOW = 2.0
#: A discovery that finds more new stores than this logs them as one ``stores_found`` line
#: (and each at debug level) instead of one ``store_found`` line each.
STORE_FOUND_LINES = 20


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


@dataclass
class StoreRead:
    """What one read found: ``changed`` if any view may have changed, and the profiles the
    store held before or after (those whose families need re-planning)."""

    changed: bool
    keys: set[ProfileKey] = field(default_factory=set)


class Inventory:
    """Reads stores into ``memory.views`` and keeps ``memory.stores`` in step with discovery.

    ``settings`` and ``metrics`` are read at each use (callables), so a reload changes them.
    """

    def __init__(self, memory: Memory, history: TokenHistory, *, log: Logger,
                 stop: threading.Event, settings: Callable[[], Settings],
                 metrics: Callable[[], MetricsSink | None]) -> None:
        self.memory = memory
        self.history = history
        self.log = log
        self.stop = stop
        self._settings = settings
        self._metrics = metrics
        #: the per-install salt of fingerprints (set once the state dir is ours)
        self.salt = b""
        #: Set by the daemon before its first scan: that sweep leaves stale temp files to
        #: ``tidy``, which the daemon runs on the io pool just after start-up (and the next
        #: sweep does in any case). Housekeeping is not what "ready" waits for (every store
        #: read, every family scheduled), and at 1,000 stores the ``realpath`` and directory
        #: listing per store were ~7 % of start-up.
        self.defer_tidy = False

    # -- discovery ------------------------------------------------------------------------------
    def discover(self) -> tuple[bool, list[StoreInfo]]:
        """Bring ``memory.stores`` in step with discovery: (whether the set changed, every
        store now managed)."""
        s = self._settings()
        found = discovery.store_paths(explicit=s.stores, discover=s.discover,
                                      qwen_code=s.qwen_code)
        explicit = {p.absolute() for p in s.stores}
        anchors = paths.anchor_dirs()  # once, not per store (each is an exists() or two)
        changed = False
        new: list[tuple[Store, str]] = []
        memory = self.memory
        with memory.lock:
            current = {p for p, _ in found}
            for path in list(memory.stores):
                if path not in current:
                    self.forget_store(path)
                    changed = True
            for path, kind in found:
                if path not in memory.stores:
                    store = discovery.open_store(path, kind, anchors=anchors)
                    memory.stores[path] = StoreInfo(store, path in explicit)
                    new.append((store, kind))
                    changed = True
            infos = list(memory.stores.values())
        self._log_found(new)
        return changed, infos

    def _log_found(self, new: list[tuple[Store, str]]) -> None:
        """One ``store_found`` line per new store; past ``STORE_FOUND_LINES`` at once (a
        start-up among 1,000 agents), one ``stores_found`` line with the count per kind, and
        each store at debug level (``--verbose``): a thousand lines said nothing the
        summary and ``status`` do not, and cost ~0.13 s of the ~1 s of CPU from start to
        ready (issue 16)."""
        if len(new) <= STORE_FOUND_LINES:
            for store, kind in new:
                self.log.info("store_found", store=store.describe(), kind=kind)
            return
        kinds: dict[str, int] = defaultdict(int)
        for _store, kind in new:
            kinds[kind] += 1
        self.log.info("stores_found", count=len(new), kinds=dict(sorted(kinds.items())),
                      message="each is logged at debug level (--verbose); `qwen-refresher "
                              "status` lists them")
        for store, kind in new:
            self.log.debug("store_found", store=store.describe(), kind=kind)

    def sweep(self) -> bool:
        """Rediscover, read every store whose ``stat_key`` changed (an unchanged one costs one
        ``stat()``), remove temp files interrupted writes left: True if anything changed."""
        # Every store at once: the directories they share are checked once, not per store.
        with shared_checks():
            changed, infos = self.discover()
            for info in infos:
                changed |= self.read_store(info, unchanged_ok=True).changed
        if self.defer_tidy:
            self.defer_tidy = False  # one sweep only
        else:
            self.remove_stale_temp_files(infos)
        return changed

    def tidy(self) -> None:
        """Remove the stale temp files of every managed store (each may hold a copy of its
        tokens): what the first sweep left for after start-up."""
        with self.memory.lock:
            infos = list(self.memory.stores.values())
        self.remove_stale_temp_files(infos)

    def watch_dirs(self) -> dict[Path, bool]:
        """The directories to watch (and whether recursively) for the stores managed now."""
        s = self._settings()
        return discovery.watch_dirs(list(self.memory.stores), discover=s.discover,
                                    qwen_code=s.qwen_code)

    def remove_stale_temp_files(self, infos: list[StoreInfo]) -> None:
        by_dir: dict[Path, set[str]] = defaultdict(set)
        for info in infos:
            if info.temp_names is None or info.stat is None:
                # lock_path() resolves the path (realpath): once per store, not per sweep
                directory = info.store.path.parent
                temp = [(directory, info.store.path.name)]
                with contextlib.suppress(StoreError, OSError):
                    lock = info.store.lock_path()
                    # lockfile.py's link-into-place; its directory is usually the store's
                    # own, kept as one Path (a thousand stores, a thousand fewer objects)
                    temp.append((directory if lock.parent == directory else lock.parent,
                                 lock.name))
                info.temp_names = temp
            for directory, name in info.temp_names:
                by_dir[directory].add(name)
        by_dir[self._settings().state_dir] |= {STATE_FILE, JOURNAL_FILE}
        for directory, names in by_dir.items():
            for path in remove_stale_temp_files(directory, names):
                self.log.info("temp_file_removed", path=str(path),
                              message="left by an interrupted write")

    def forget_store(self, path: Path) -> None:
        memory = self.memory
        info = memory.stores.pop(path)
        self.log.info("store_gone", store=info.store.describe())
        for key in memory.keys_by_store.pop(path, set()):
            memory.views.pop(key, None)
            memory.runtime.pop(key, None)

    # -- reading --------------------------------------------------------------------------------
    def read_path(self, path: Path) -> StoreRead | None:
        """Read the store at ``path`` (an event); None if it is not one we manage."""
        with self.memory.lock:
            info = self.memory.stores.get(path)
            if info is None:
                return None
            before = set(self.memory.keys_by_store.get(path, set()))
        read = self.read_store(info)
        with self.memory.lock:
            read.keys = before | self.memory.keys_by_store.get(path, set())
        return read

    def read_store(self, info: StoreInfo, *, unchanged_ok: bool = False) -> StoreRead:
        """Read one store and update its profiles' views.

        ``unchanged_ok`` (rescans and sweeps): skip the read when the store's ``stat_key`` is
        the one of the last good read. An event or a refresh always reads.
        """
        store = info.store
        stat = stat_key(store.path)  # before reading: a write after this changes the key
        if unchanged_ok and stat is not None and stat == info.stat and \
                info.digest is not None and info.error is None:
            return StoreRead(False)
        try:
            snap = self._snapshot(info)
        except StoreError as exc:
            return self.store_failed(info, exc)
        return self._take(info, snap, stat)

    def _snapshot(self, info: StoreInfo) -> StoreSnapshot:
        store = info.store
        try:
            return store.read_settled()
        except StoreMalformed:
            pass
        # Perhaps a writer caught between truncate and write, preempted for longer than our
        # settle pauses: look once more, under the writer's own lock, before calling the file
        # broken (without the lock if it cannot be had).
        try:
            with store.lock(timeout=LOCKED_REREAD_TIMEOUT, stop=self.stop).held():
                return store.read()
        except StoreError:
            raise
        except (LockTimeout, OSError):
            return store.read()

    def _take(self, info: StoreInfo, snap: StoreSnapshot,
              stat: tuple[int, int, int, int, int] | None) -> StoreRead:
        """Update the views from one snapshot of ``info``'s store."""
        store = info.store
        digest = hashlib.sha256(snap.raw).hexdigest()
        memory = self.memory
        with memory.lock:
            if info.error is not None:
                self.log.info("store_recovered", store=store.describe())
                info.error = None
            info.stat = stat
            if digest == info.digest:
                return StoreRead(False)
            info.digest = digest
            before = set(memory.keys_by_store.get(store.path, set()))
            seen: set[ProfileKey] = set()
            for profile_id, record in snap.records.items():
                key = record.key
                seen.add(key)
                previous = memory.views.get(key)
                if record.creds is None:
                    if previous is None or previous.problem != record.problem:
                        self.log.error("profile_invalid", store=store.describe(),
                                       profile=profile_id, problem=record.problem)
                    memory.views[key] = View(store, None, record.problem, None, None)
                    continue
                REDACTOR.add(record.creds.access, record.creds.refresh,
                             until=record.creds.expires_at + REDACT_GRACE)
                fp = fingerprint(record.creds.refresh, self.salt)
                issued = self.history.issued_at(fp)
                if issued is None and previous is not None and previous.fp == fp:
                    issued = previous.issued_at
                elif previous is not None and previous.fp is not None:
                    self.observe_change(key, previous, fp)
                if previous is not None and previous.problem is not None:
                    self.log.info("profile_recovered", store=store.describe(),
                                  profile=profile_id)
                # Only tokens we obtained have a known lifetime; for the rest (a login, another
                # program's rotation) the margin alone decides, so a token found inside its
                # margin is refreshed at once.
                memory.views[key] = View(store, record.creds, None, fp, issued)
            for key in memory.keys_by_store[store.path] - seen:
                memory.views.pop(key, None)
                memory.runtime.pop(key, None)
            memory.keys_by_store[store.path] = seen
        return StoreRead(True, before | seen)

    def store_failed(self, info: StoreInfo, exc: StoreError) -> StoreRead:
        """A store that cannot be read: its profiles show the problem; a discovered store
        that no longer exists is forgotten."""
        memory = self.memory
        with memory.lock:
            keys = set(memory.keys_by_store.get(info.store.path, set()))
            if isinstance(exc, StoreUnreadable) and exc.problem == "does not exist" \
                    and not info.explicit:
                if info.store.path in memory.stores:
                    self.forget_store(info.store.path)
                return StoreRead(True, keys)
            if info.error != exc.problem:
                self.log.error("store_invalid", store=info.store.describe(), error=exc.problem,
                               message="file left untouched; other stores are still served")
                metrics = self._metrics()
                if metrics is not None:
                    metrics.store_error(str(info.store.path))
            info.error = exc.problem  # the row names the store already
            info.digest = None
            info.stat = None
            for key in keys:
                if key in memory.views:
                    memory.views[key] = View(memory.views[key].store, None, exc.problem,
                                             None, None)
        return StoreRead(True, keys)

    def observe_change(self, key: ProfileKey, previous: View, fp: str) -> None:
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
            previous.creds.expires_at - self._settings().margin <= time.time() + 1
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

    def live_secrets(self) -> set[str]:
        """Every token a store holds now, and the newest we remember for each: the secrets
        the redactor must keep (the rest leave it once their token has expired)."""
        live: set[str] = set()
        with self.memory.lock:
            for view in self.memory.views.values():
                if view.creds is not None and view.fp is not None:
                    live |= {view.creds.access, view.creds.refresh}
                    remembered = self.history.credentials(self.history.newest(view.fp))
                    if remembered is not None:
                        live |= {remembered.access, remembered.refresh}
        return live
