"""Rotated tokens that some store does not hold yet, kept on disk until every store does.

Between the server's answer and the last store write there is a window in which the only
copy of a live refresh token is in our memory: the old one is already consumed. The journal
closes that window. It is written (0600, atomic, fsynced) *before* any store is touched and
emptied when every member has the new tokens, so a kill -9, a full disk or a read-only store
never loses a rotation. On start-up the daemon replays it.
"""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

from .models import Credentials, ProfileKey
from .state import JournalEntry, check_state_dir, read_journal, write_journal

#: How long a change waits for a journal write another thread has under way.
WAIT_FOR_WRITER = 60.0


class Journal:
    """The journal file and what it holds, written by group commit.

    Every change (a ``record``, a ``settle``) gets a generation number; a write carries
    every change made before it started. One thread at a time writes (the *leader*); the
    changes made while it writes wait for it and then go to disk together in the next
    write, made by one of the waiting threads. In a storm of concurrent rotations that is
    one fsync'd write for several rotations instead of two per rotation, and ``record``
    still returns only once a write holding its entry has reached the disk: the journal
    write before the store writes stays durable.
    """

    def __init__(self, state_dir: Path) -> None:
        # The first look at the state dir: one that is not ours alone (or holds a planted
        # symlink or FIFO) is refused here, exit 78, before a byte of it is read.
        check_state_dir(state_dir)
        self._dir = state_dir
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        #: What the file holds once the writes under way are done: read once here, then
        #: changed only by us (one daemon per state dir, ``daemon.lock``). A re-read and
        #: re-parse per ``record`` and ``settle`` was two per refresh in a storm.
        self._entries: list[JournalEntry] = read_journal(state_dir)
        #: fingerprints with an entry on disk; lets ``settle`` skip the disk when none is
        self._pending: set[str] = {str(e.get("family")) for e in self._entries}
        #: generation of the last change, and of the last one a finished write carried
        self._changed = 0
        self._written = 0
        self._writing = False

    def record(self, replaces: str, fp: str, creds: Credentials,
               members: list[ProfileKey]) -> None:
        """Put a rotation on disk (0600, atomic, fsynced); returns once it is there. Raises
        what the write raised (``OSError``, ``StoreError``): then the entry is not kept."""
        entry: JournalEntry = {
            "family": fp,
            "replaces": replaces,
            "received_at": time.time(),
            "access": creds.access,
            "refresh": creds.refresh,
            "expires_ms": creds.expires_ms,
            "resource_url": creds.resource_url,
            "members": [[str(m.store), m.profile] for m in members],
        }
        with self._cv:
            replaced = [e for e in self._entries if e.get("family") == fp]
            self._entries = [e for e in self._entries if e.get("family") != fp] + [entry]
            try:
                self._flush(self._change())
            except BaseException:
                # Never on disk through us: as if not recorded (a later write must not
                # carry it there either, with nobody to settle it).
                self._entries = [e for e in self._entries if e is not entry] + replaced
                self._change()
                raise
            self._pending.add(fp)

    def settle(self, fp: str) -> None:
        """Every member holds ``fp``'s tokens: forget them (on disk before this returns,
        unless the write fails: then the entry stays, and a later settle tries again)."""
        with self._cv:
            if fp not in self._pending:
                return
            dropped = [e for e in self._entries if e.get("family") == fp]
            if dropped:
                self._entries = [e for e in self._entries if e.get("family") != fp]
                try:
                    self._flush(self._change())
                except BaseException:
                    self._entries = self._entries + dropped
                    self._change()
                    raise
            self._pending.discard(fp)

    def _change(self) -> int:
        """A new generation of ``_entries`` (caller holds the lock)."""
        self._changed += 1
        return self._changed

    def _flush(self, generation: int) -> None:
        """Return once a write carrying ``generation`` is done (caller holds the lock): wait
        for the write under way, which may already carry it, else lead the next write
        with every change made so far. Raises what this thread's own write raised."""
        deadline = time.monotonic() + WAIT_FOR_WRITER
        while self._written < generation:
            if self._writing:
                left = deadline - time.monotonic()
                if left <= 0:  # a write stuck that long (a hung disk): as if ours failed
                    raise OSError(errno.ETIMEDOUT, "another journal write did not finish "
                                                   f"within {WAIT_FOR_WRITER:g} s")
                self._cv.wait(left)
                continue
            self._writing = True
            carried, entries = self._changed, list(self._entries)
            self._cv.release()
            try:
                write_journal(self._dir, entries)
            finally:
                self._cv.acquire()
                self._writing = False
                self._cv.notify_all()
            self._written = max(self._written, carried)

    def holds(self, fp: str) -> bool:
        return fp in self._pending

    def pending(self) -> list[tuple[str, str, Credentials, list[ProfileKey]]]:
        """(replaces, fp, credentials, members) for every entry still on disk."""
        out: list[tuple[str, str, Credentials, list[ProfileKey]]] = []
        with self._lock:
            entries = list(self._entries)
        for e in entries:
            try:
                creds = Credentials(
                    access=str(e["access"]), refresh=str(e["refresh"]),
                    expires_ms=int(e["expires_ms"]), resource_url=e.get("resource_url"),
                )
                members = [ProfileKey(Path(p), str(i)) for p, i in e.get("members", [])]
                out.append((str(e["replaces"]), str(e["family"]), creds, members))
            except (KeyError, TypeError, ValueError):
                continue
        return out
