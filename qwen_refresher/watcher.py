"""Directory watches that turn file-system noise into "store X may have changed".

Files are never watched directly (a replaced file's watch goes silent); their directories are.
Events for our own temp files and lock files are dropped here, so the daemon only hears about
paths it might care about. inotify is used where it works; on network file systems (where
changes made by other hosts never raise inotify events) and where inotify cannot start, a
polling observer takes over.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "afs",
                        "ceph", "glusterfs", "fuse.glusterfs", "lustre", "davfs"})

#: The only events that can mean "a store may have changed": a write (modified, or closed after
#: writing), a rename, a creation, a deletion. Passed to watchdog as ``event_filter``, which
#: turns it into the inotify mask, so the kernel never even queues IN_OPEN, IN_ACCESS or
#: IN_CLOSE_NOWRITE: a program *reading* a store (``cat``, OpenClaw on every request) wakes no
#: thread of ours. A directory's "modified" is left out too (every write in it raises one; the
#: file's own event covers that write). A file's attribute change (IN_ATTRIB, already in the
#: mask for FileModifiedEvent) is kept, so a chmod that makes an unreadable store readable is
#: seen at once, not at the next sweep.
EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileModifiedEvent, FileAttribEvent, FileClosedEvent, FileMovedEvent, DirMovedEvent,
    FileCreatedEvent, DirCreatedEvent, FileDeletedEvent, DirDeletedEvent,
]


def _mount_table() -> list[str] | None:
    try:
        return Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None


def filesystem_type(path: Path, mounts: list[str] | None = None) -> str | None:
    """The type of the mount holding ``path``, from /proc/self/mounts (Linux only).

    ``mounts``: the table already read (``watch()`` reads it once for all its directories,
    not once per directory: 1,000 agent dirs at start-up were 1,000 reads of it)."""
    lines = mounts if mounts is not None else _mount_table()
    if lines is None:
        return None
    best, best_type = "", None
    target = str(path.resolve())
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and \
                len(mount) > len(best):
            best, best_type = mount, parts[2]
    return best_type


class _Handler(FileSystemEventHandler):
    """Passes on events for store file names and for directories; drops the rest.

    A recursive watch on OpenClaw's ``agents/`` also sees session transcripts being written on
    every message; those are dropped here, before they cost the daemon anything.
    """

    def __init__(self, callback: Callable[[Path], None], names: frozenset[str]) -> None:
        self._callback = callback
        self._names = names

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # never asked for (``EVENT_FILTER``); a polling observer ignores filters
        if event.is_directory and event.event_type == "modified":
            # Every write in a directory "modifies" it; only a directory created, moved or
            # deleted can add or remove a store, and the file's own event covers the rest.
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(raw) if raw else ""
            if path and (event.is_directory or os.path.basename(path) in self._names):
                self._callback(Path(path))


class DirectoryWatcher:
    """Keeps one watch per directory; ``watch()`` re-arms to a new set."""

    def __init__(self, callback: Callable[[Path], None], names: Iterable[str], *,
                 force_polling: bool = False, poll_interval: float = 2.0) -> None:
        self._callback = callback
        self._names = frozenset(names)
        self._force_polling = force_polling
        self._poll_interval = poll_interval
        self._native: Any = None
        self._polling: Any = None
        self._watches: dict[Path, Any] = {}
        self.mode: dict[Path, str] = {}

    def _observer(self, directory: Path, mounts: list[str] | None = None) -> Any:
        poll = self._force_polling or filesystem_type(directory, mounts) in NETWORK_FS
        if not poll and self._native is None:
            try:
                native = Observer()
                native.start()
                self._native = native
            except OSError:
                self._force_polling = True
                poll = True
        if poll or self._native is None:
            if self._polling is None:
                self._polling = PollingObserver(timeout=self._poll_interval)
                self._polling.start()
            return self._polling
        return self._native

    def watch(self, directories: dict[Path, bool]) -> None:
        """Watch exactly these directories (value: recursively?), re-arming what changed."""
        wanted = dict(directories)
        for directory in list(self._watches):
            if wanted.get(directory) != self._watches[directory][2]:
                observer, watch, _ = self._watches.pop(directory)
                with contextlib.suppress(KeyError, OSError):
                    observer.unschedule(watch)
                self.mode.pop(directory, None)
        mounts: list[str] | None = None
        for directory, recursive in wanted.items():
            if directory in self._watches or not directory.is_dir():
                continue
            if mounts is None:
                mounts = _mount_table()
            observer = self._observer(directory, mounts)
            handler = _Handler(self._callback, self._names)
            try:
                watch = observer.schedule(handler, str(directory), recursive=recursive,
                                          event_filter=EVENT_FILTER)
            except OSError:
                # inotify watch limit reached, or similar: poll this one instead.
                if observer is self._polling:
                    continue
                self._force_polling = True
                observer = self._observer(directory)
                try:
                    watch = observer.schedule(handler, str(directory), recursive=recursive,
                                              event_filter=EVENT_FILTER)
                except OSError:
                    continue
            self._watches[directory] = (observer, watch, recursive)
            self.mode[directory] = "polling" if observer is self._polling else "inotify"

    def stop(self) -> None:
        for observer in (self._native, self._polling):
            if observer is not None:
                observer.stop()
        for observer in (self._native, self._polling):
            if observer is not None:
                with contextlib.suppress(RuntimeError):
                    observer.join(timeout=2)
        self._watches.clear()
