"""Status rows, and the coalesced ``state.json`` that ``status`` reads (what the previous
run's ``state.json`` left for us is taken back by ``restore``).

The schema, the reader and the row constructor (``published.profile_row``) are
``published``'s (one home, shared with ``status``); the writer is ``state.write_state``.
Bursts of changes (a refresh storm) coalesce into one write per ``PUBLISH_DELAY``; a write
identical to the last one is skipped. The writes are made by one long-lived thread, not a
``threading.Timer`` each: under 2-second token churn a timer per write started ~8 threads a
second, and each thread's birth and death (its stack, its thread state, its malloc cache)
left the heap a little more fragmented, ~0.5 MB per 1,000 refreshes (issue 16).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import __version__, sdnotify
from ..config import Settings
from ..errors import StoreError
from ..history import TokenHistory
from ..models import ProfileKey
from ..protocols import Logger
from ..published import profile_row, store_row
from ..report import summary_line
from ..state import HookStatus, ProfileStatus, PublishedState, StoreStatus, write_state
from .memory import Memory

#: How long state.json changes are gathered before one write.
PUBLISH_DELAY = 0.1


#: Profiles per second of coalescing, from 200 profiles up: a state.json of N rows costs
#: ~0.1 ms per row to build, serialize and scrub (2,000 rows: ~200 ms), so a storm that
#: rewrote it every second spent ~17 % of its CPU there. One write per N / 400 s (5 s at
#: 2,000 profiles) keeps that near 4 %; ``status`` is then at most that much behind.
PROFILES_PER_SECOND = 400
#: The longest a change waits for its state.json write.
MAX_PUBLISH_DELAY = 5.0
#: The publisher thread's longest sleep with nothing to write: a deadline on its wait, and
#: one wake-up an hour of an idle daemon.
IDLE_WAIT = 3600.0
#: How long ``close`` waits for a write in progress.
CLOSE_JOIN = 5.0


def publish_delay(profiles: int) -> float:
    """How long changes are gathered before one state.json write, for this many profiles."""
    if profiles < 200:
        return PUBLISH_DELAY
    return min(MAX_PUBLISH_DELAY, max(10 * PUBLISH_DELAY, profiles / PROFILES_PER_SECOND))


def _digest(state: PublishedState) -> bytes:
    """What ``publish_now`` remembers of the last state it wrote, to skip an equal one.

    A digest of its ``repr`` (C all the way: ~20 ms at 2,000 profiles, where writes are at
    most one per 5 s, ``publish_delay``; the write itself costs ~10 times more): keeping the
    state itself to compare as data held ~1 MB of rows at 2,000 profiles for the daemon's
    whole life. What ``repr`` tells apart and JSON does not (1 vs 1.0) costs at most one
    write.
    """
    return hashlib.blake2b(repr(state).encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


class Publisher:
    """Builds the rows and writes ``state.json``. ``hooks`` gives each profile's on_rotate
    status, ``next_sweep`` the sweep's next run time; both are called under the memory lock
    or with no lock held, never the other way round."""

    def __init__(self, memory: Memory, history: TokenHistory, *, log: Logger,
                 settings: Callable[[], Settings],
                 hooks: Callable[[], dict[ProfileKey, HookStatus]],
                 next_sweep: Callable[[], float | None]) -> None:
        self.memory = memory
        self.history = history
        self.log = log
        self._settings = settings
        self._hooks = hooks
        self._next_sweep = next_sweep
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        #: when (monotonic) the pending coalesced write is due; None: nothing pending
        self._due: float | None = None
        self._closed = False
        #: the one thread that makes coalesced writes, started by the first ``publish``
        self._thread: threading.Thread | None = None
        #: Fleet mode: the ``fleet`` object of state.json (``fleet.runtime.fleet_state``).
        self.fleet_state: Callable[[], dict[str, Any] | None] | None = None
        #: a digest of the last state written, ``updated_at`` 0.0 (``_digest``): a write of
        #: an equal one is skipped
        self._last: bytes | None = None

    def profile_statuses(self) -> list[ProfileStatus]:
        memory = self.memory
        with memory.lock:
            out: list[ProfileStatus] = []
            hooks = self._hooks()
            for key in sorted(memory.views):
                view, rt = memory.views[key], memory.runtime[key]
                row = profile_row(
                    str(key.store), view.store.kind, view.store.agent, key.profile, rt.state,
                    family=rt.family,
                    expires_at=view.creds.expires_at if view.creds else None,
                    next_refresh_at=rt.next_refresh_at, last_refresh_at=rt.last_refresh_at,
                    attempts=rt.attempts, last_error=rt.last_error,
                    login_command=view.store.login_command(key.profile))
                if key in hooks:
                    row["hook"] = hooks[key]
                out.append(row)
            return out

    def store_statuses(self) -> list[StoreStatus]:
        with self.memory.lock:
            return [store_row(str(p), i.store.kind, i.error)
                    for p, i in sorted(self.memory.stores.items())]

    def publish(self) -> None:
        """Ask for state.json to be rewritten; bursts (a refresh storm) coalesce into one
        write per ``PUBLISH_DELAY`` instead of one fsync per profile."""
        with self._lock:
            if self._due is not None or self._closed:
                return
            delay = publish_delay(len(self.memory.views))
            if self._last is None:  # the first state.json after start is not held back
                delay = min(delay, 10 * PUBLISH_DELAY)
            self._due = time.monotonic() + delay
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_when_due,
                                                name="state-publisher", daemon=True)
                self._thread.start()
            else:
                self._wake.notify()

    def _write_when_due(self) -> None:
        """The publisher thread: waits for a pending write to fall due, makes it, waits again,
        until ``close``. A failed write is logged and the thread goes on: the next change
        writes again."""
        while True:
            with self._lock:
                while not self._closed:
                    if self._due is None:
                        self._wake.wait(IDLE_WAIT)
                        continue
                    left = self._due - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                if self._closed:
                    return
            try:
                self.publish_now()
            except Exception as exc:  # the publisher outlives one bad write
                self.log.error("state_publish_failed", error=f"{type(exc).__name__}: {exc}",
                               exc_info=exc)

    def close(self, timeout: float = CLOSE_JOIN) -> None:
        """Stop the publisher thread (a write in progress is given ``timeout``); a write
        still pending is dropped: the caller's last ``publish_now(force=True)`` covers it."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def publish_now(self, *, force: bool = False) -> None:
        """Write state.json now (``force``: even if nothing changed since the last write)."""
        with self._lock:
            self._due = None
            if force:
                self._last = None
        settings = self._settings()
        profiles = self.profile_statuses()
        state: PublishedState = {
            "schema_version": 1,
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "started_at": self.started_at,
                "updated_at": 0.0,
                "next_sweep_at": self._next_sweep(),
                "margin": settings.margin,
            },
            "profiles": profiles,
            "stores": self.store_statuses(),
            "rejected": {fp: [t, r] for fp, (t, r) in self.history.rejected().items()},
        }
        fleet = self.fleet_state() if self.fleet_state is not None else None
        if fleet is not None:
            state["fleet"] = fleet  # fleet mode: role per profile, etcd health (status, readyz)
        digest = _digest(state)
        with self._lock:
            if digest == self._last:
                return
            # ``updated_at`` is set on a copy of the daemon object: the digest is of 0.0.
            self._last = digest
            state = {**state, "daemon": {**state["daemon"], "updated_at": time.time()}}
            try:
                write_state(settings.state_dir, state)
            except (OSError, StoreError) as exc:
                self.log.error("state_write_failed", error=str(exc))
        sdnotify.set_status(summary_line(profiles, time.time()))
