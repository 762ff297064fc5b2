"""Rotated tokens that some store does not hold yet, kept on disk until every store does.

Between the server's answer and the last store write there is a window in which the only
copy of a live refresh token is in our memory: the old one is already consumed. The journal
closes that window. It is written (0600, atomic, fsynced) *before* any store is touched and
emptied when every member has the new tokens, so a kill -9, a full disk or a read-only store
never loses a rotation. On start-up the daemon replays it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from .models import Credentials, ProfileKey
from .state import JournalEntry, check_state_dir, read_journal, write_journal


class Journal:
    def __init__(self, state_dir: Path) -> None:
        # The first look at the state dir: one that is not ours alone (or holds a planted
        # symlink or FIFO) is refused here, exit 78, before a byte of it is read.
        check_state_dir(state_dir)
        self._dir = state_dir
        self._lock = threading.Lock()
        #: fingerprints with an entry on disk; lets ``settle`` skip the disk when none is
        self._pending: set[str] = {str(e.get("family")) for e in read_journal(state_dir)}

    def record(self, replaces: str, fp: str, creds: Credentials,
               members: list[ProfileKey]) -> None:
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
        with self._lock:
            entries = [e for e in read_journal(self._dir) if e.get("family") != fp]
            entries.append(entry)
            write_journal(self._dir, entries)
            self._pending.add(fp)

    def settle(self, fp: str) -> None:
        """Every member holds ``fp``'s tokens: forget them."""
        with self._lock:
            if fp not in self._pending:
                return
            entries = read_journal(self._dir)
            kept = [e for e in entries if e.get("family") != fp]
            if len(kept) != len(entries):
                write_journal(self._dir, kept)
            self._pending.discard(fp)

    def holds(self, fp: str) -> bool:
        return fp in self._pending

    def pending(self) -> list[tuple[str, str, Credentials, list[ProfileKey]]]:
        """(replaces, fp, credentials, members) for every entry still on disk."""
        out: list[tuple[str, str, Credentials, list[ProfileKey]]] = []
        with self._lock:
            entries = read_journal(self._dir)
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
