"""The write half of a run: a rotation persisted before any store sees it, then written.

``Writer`` is what the engine does once it holds new tokens (its own rotation, a fleet's newer
generation, a sibling's token): link the lineage and remember the credentials, journal them
(fsynced) *before* the first store write, write every member, and settle the journal when
all hold them. All of it under ``WriteGate``, so a shutdown never interrupts a write between
the journal and the stores. Split from ``engine.py`` (issue 14): the engine decides, this
writes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import StoreError, StoreWriteError
from .history import TokenHistory
from .journal import Journal
from .models import Credentials
from .stores.base import Store, StoreSnapshot

if TYPE_CHECKING:
    from .engine import Member, Outcome


class WriteGate:
    """A shutdown barrier around store writes: any number of writers at once, and
    ``acquire(timeout=)`` (shutdown's) waits until none is writing and keeps new ones out
    until ``release()``.

    A plain lock did the same for shutdown but also made every refresh wait for every other
    refresh's journal and store fsyncs (measured: 40 % of a 2,000-family storm's worker time
    was spent queueing on it). What a write needs excluded is excluded elsewhere: the
    family's store locks (per-path mutex + lock file), ``Journal``'s and ``TokenHistory``'s
    own locks. A writer waiting at a closed gate waits only as long as shutdown holds it
    (``acquire`` then ``release``, at once).
    """

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._writers = 0
        self._closed = False

    def __enter__(self) -> WriteGate:
        with self._cv:
            while self._closed:
                self._cv.wait()
            self._writers += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            self._writers -= 1
            if self._writers == 0:
                self._cv.notify_all()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Close the gate and wait until no writer is inside; False (gate open again) when
        ``timeout`` seconds pass first, or at once when not ``blocking`` and one is inside."""
        deadline = None if timeout < 0 else time.monotonic() + timeout
        with self._cv:
            while self._closed:  # one closer at a time
                left = None if deadline is None else deadline - time.monotonic()
                if not blocking or (left is not None and left <= 0):
                    return False
                self._cv.wait(left)
            self._closed = True
            while self._writers:
                left = None if deadline is None else deadline - time.monotonic()
                if not blocking or (left is not None and left <= 0):
                    self._closed = False
                    self._cv.notify_all()
                    return False
                self._cv.wait(left)
            return True

    def release(self) -> None:
        """Open the gate again (after ``acquire`` returned True)."""
        with self._cv:
            self._closed = False
            self._cv.notify_all()

    @property
    def writers(self) -> int:
        """How many writers are inside right now (for tests and diagnostics)."""
        with self._cv:
            return self._writers


class Writer:
    """Persists and writes what a run obtained, for one engine (``Engine.writer``).

    ``fp`` is the engine's fingerprint function, ``clock`` its wall clock; ``fleet_commit``
    (fleet mode) publishes a rotation to etcd after our journal and before any store.
    """

    def __init__(self, *, history: TokenHistory, journal: Journal,
                 fp: Callable[[Credentials], str], clock: Callable[[], float],
                 fleet_commit: Callable[[Sequence[Member], Credentials], None] | None = None,
                 ) -> None:
        self.history = history
        self.journal = journal
        self.fp = fp
        self.clock = clock
        self.fleet_commit = fleet_commit
        #: Entered while stores are being written: shutdown waits for every writer to leave
        #: it, so SIGTERM never interrupts a write between journal and store. Writers of
        #: different families do not exclude each other (their store locks, the journal's and
        #: the lineage's own locks do): a storm's fsyncs overlap instead of queueing.
        self.writing = WriteGate()

    def write(
        self,
        snapshots: dict[Store, StoreSnapshot],
        targets: Sequence[Member],
        creds: Credentials,
        outcome: Outcome,
    ) -> StoreWriteError | None:
        """Write ``creds`` to ``targets``; the first failure, as a write failure, or None."""
        first: StoreWriteError | None = None
        by_store: dict[Store, list[Member]] = {}
        for member in targets:
            by_store.setdefault(member.store, []).append(member)
        for store, group in by_store.items():
            snapshot = snapshots.get(store)
            if snapshot is None:
                continue
            try:
                store.write(snapshot, {m.profile: creds for m in group})
            except StoreError as exc:
                for m in group:
                    outcome.errors[m.key] = str(exc)
                first = first or as_write_error(exc)
            else:
                outcome.written.extend(m.key for m in group)
        return first

    def keep(self, old_fp: str, new: Credentials, members: Sequence[Member],
              outcome: Outcome) -> str:
        """Persist a rotation before any store sees it: lineage link, memory, journal.
        From here on the old refresh token is dead and this is the only copy of the new one
        until the stores have it. Returns the new fingerprint."""
        new_fp = self.fp(new)
        self.history.link(old_fp, new_fp)
        self.history.remember(new_fp, new, issued_at=self.clock())
        try:
            self.journal.record(old_fp, new_fp, new, [m.key for m in members])
        except (OSError, StoreError) as exc:
            # Still in memory and about to be written; the daemon says so loudly.
            outcome.journal_error = str(exc)
        return new_fp

    def commit(self, members: Sequence[Member], snapshots: dict[Store, StoreSnapshot],
                old_fp: str, new: Credentials, outcome: Outcome) -> None:
        """Journal a rotation, write it to every readable member, and say how that went."""
        readable = [m for m in members if m.store in snapshots and m.key not in outcome.errors]
        with self.writing:
            new_fp = self.keep(old_fp, new, members, outcome)
            # A fleet's journal is etcd: the answer goes there before any store sees it, and
            # after our own journal, so a crash between the two is replayed at start and then
            # published (docs/fleet.md). Never raises.
            if self.fleet_commit is not None:
                self.fleet_commit(members, new)
            write_error = self.write(snapshots, readable, new, outcome)
        outcome.creds, outcome.fp = new, new_fp
        outcome.consumed = outcome.consumed or old_fp
        if all(m.key in outcome.written for m in members):
            with contextlib.suppress(OSError, StoreError):
                self.journal.settle(new_fp)
            outcome.result = "rotated"
        else:
            # The reason stays the first error met, a read error included (a member unreadable
            # before the request is not written either); the kind is a write failure.
            reason = next(iter(outcome.errors.values()), "not every member was written")
            unwritten = next((m.store.path for m in members if m.key not in outcome.written),
                             Path("-"))
            outcome.fail(write_error or StoreWriteError(unwritten, "not written: it could not "
                                                                   "be read"), reason)


def as_write_error(exc: StoreError) -> StoreWriteError:
    """A store error met while writing is a write failure, whatever its own kind."""
    if isinstance(exc, StoreWriteError):
        return exc
    error = StoreWriteError(exc.path, exc.problem)
    error.__cause__ = exc
    return error
