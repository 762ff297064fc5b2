"""What the daemon publishes about itself, and the only place it ever keeps a token.

``state.json`` (0600, no token values) is how ``status`` learns what the daemon knows without
talking to it: the daemon rewrites it atomically whenever something a person would care about
changes. ``journal.json`` (0600) holds rotated tokens only between the server's answer and the
moment every store has them, so a crash or a read-only store never loses a rotation.
``daemon.lock`` is flock-ed by the running daemon: status asks the kernel, not a pid file,
whether a daemon is alive. The file names, the schema version and the one reader of
``state.json`` and ``daemon.lock`` are ``published``'s (stdlib only, on ``status``'s fast path);
this module is the daemon's side: the row types, the writers, the journal, the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

from .errors import AlreadyRunning, StoreError, UnsafeStateDir
from .fileio import (
    atomic_write,
    check_private_dir,
    ensure_private_dir,
    file_type_name,
    read_regular_file,
)

# The schema constants and the reader live in ``published`` (one home, stdlib-only, shared
# with ``status``); re-exported here for the daemon's side.
from .published import (
    DAEMON_LOCK,
    JOURNAL_FILE,
    LINEAGE_FILE,
    MAX_JOURNAL_BYTES,
    MAX_STATE_BYTES,
    SALT_FILE,
    SCHEMA_VERSION,
    STATE_DIR_FILES,
    STATE_FILE,
    daemon_pid,
    read_published,
)

__all__ = [
    "DAEMON_LOCK",
    "JOURNAL_FILE",
    "LINEAGE_FILE",
    "MAX_JOURNAL_BYTES",
    "MAX_STATE_BYTES",
    "SALT_FILE",
    "SCHEMA_VERSION",
    "STATE_DIR_FILES",
    "STATE_FILE",
    "DaemonInfo",
    "DaemonLock",
    "HookStatus",
    "JournalEntry",
    "ProfileState",
    "ProfileStatus",
    "PublishedState",
    "StoreStatus",
    "check_state_dir",
    "daemon_pid",
    "ensure_state_dir",
    "load_salt",
    "read_journal",
    "read_published",
    "read_state",
    "state_file",
    "write_journal",
    "write_state",
]

ProfileState = Literal[
    "ok", "due", "refreshing", "retrying", "needs_login", "expired", "invalid_store"
]


class DaemonInfo(TypedDict):
    pid: int
    version: str
    started_at: float
    updated_at: float
    next_sweep_at: float | None
    #: The daemon's refresh margin, so that status judges "due" the way the daemon does.
    margin: NotRequired[float]


class HookStatus(TypedDict):
    """The last run of ``on_rotate`` for a profile's newest rotation (no token: the output
    line is redacted). ``failing_since`` is set while the gateway has not been told."""

    ok: bool
    at: float
    returncode: int | None
    timed_out: bool
    output: str
    failing_since: float | None
    failures: int
    next_retry_at: float | None


class ProfileStatus(TypedDict):
    store: str
    store_kind: str
    agent: str | None
    profile: str
    family: str | None
    state: ProfileState
    expires_at: float | None
    next_refresh_at: float | None
    last_refresh_at: float | None
    attempts: int
    last_error: str | None
    login_command: str | None
    #: Absent when no hook ran (and in states published by older versions).
    hook: NotRequired[HookStatus]


class StoreStatus(TypedDict):
    path: str
    kind: str
    error: str | None


class PublishedState(TypedDict):
    schema_version: int
    daemon: DaemonInfo
    profiles: list[ProfileStatus]
    stores: list[StoreStatus]
    #: Fingerprints the server rejected -> [when, reason]: never sent again after a restart.
    rejected: NotRequired[dict[str, list[float | str]]]
    #: Fleet mode only (``fleet/runtime.py`` ``fleet_state``; read by ``fleet/published.py``).
    fleet: NotRequired[dict[str, Any]]


class JournalEntry(TypedDict):
    """Tokens received but not yet in every member store (secrets: 0600, short-lived)."""

    family: str
    replaces: str  # fingerprint of the refresh token these tokens replace
    received_at: float
    access: str
    refresh: str
    expires_ms: int
    resource_url: str | None
    members: list[list[str]]  # [store path, profile id] still to be written


def state_file(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def read_state(state_dir: Path) -> PublishedState | None:
    """The daemon's last published state, or None if absent or unreadable
    (``published.read_published``: the one reader, shared with ``status``)."""
    return read_published(state_dir)[0]


def write_state(state_dir: Path, state: PublishedState) -> None:
    """Publish ``state``, every string in it scrubbed of known secrets in any encoding
    (``logsetup.dumps_redacted``): a server's error text echoed into ``last_error`` can carry
    our refresh token URL-encoded or base64, and ``status`` prints what this file says."""
    from .logsetup import dumps_redacted  # imported here: readers of this module stay light

    ensure_private_dir(state_dir)
    data = dumps_redacted(state, sort_keys=True, separators=(",", ":")).encode()
    atomic_write(state_dir / STATE_FILE, data, mode=0o600)


def load_salt(state_dir: Path) -> bytes:
    """The per-installation salt for fingerprints, created on first use."""
    path = state_dir / SALT_FILE
    with contextlib.suppress(StoreError):
        salt = read_regular_file(path, 4096).data
        if len(salt) >= 16:
            return salt
    ensure_state_dir(state_dir)
    salt = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        return read_regular_file(path, 4096).data
    try:
        os.write(fd, salt)
        os.fsync(fd)
    finally:
        os.close(fd)
    return salt


def read_journal(state_dir: Path) -> list[JournalEntry]:
    try:
        doc = json.loads(read_regular_file(state_dir / JOURNAL_FILE, MAX_JOURNAL_BYTES).data)
    except (StoreError, ValueError, RecursionError):
        return []
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict)]  # type: ignore[misc]  # checked on use


def write_journal(state_dir: Path, entries: list[JournalEntry]) -> None:
    """Persist pending rotations; an empty list removes the file (no token lingers on disk)."""
    path = state_dir / JOURNAL_FILE
    if not entries:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    ensure_private_dir(state_dir)
    atomic_write(path, json.dumps({"entries": entries}).encode(), mode=0o600)



def check_state_dir(state_dir: Path) -> None:
    """Refuse a state dir that is not ours alone, or that holds a non-file where ours belong.

    ``UnsafeStateDir`` (exit 78, one line naming the dir or the file): owned by someone else
    or wider than 0700 (``fileio.check_private_dir``), or a symlink, FIFO, socket, device or
    directory at ``state.json``, ``journal.json``, ``salt``, ``lineage.log`` or
    ``daemon.lock``: someone tampered with it, and following a planted symlink would make us
    truncate or append to the victim's file, a FIFO would hang us.
    """
    check_private_dir(state_dir)
    for name in STATE_DIR_FILES:
        path = state_dir / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UnsafeStateDir(path, f"cannot be checked: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise UnsafeStateDir(path, f"is a {file_type_name(mode)}, not a regular file; "
                                       "remove it (nothing of ours is lost)")


def ensure_state_dir(state_dir: Path) -> None:
    """Create the state dir 0700 if missing, then ``check_state_dir`` it."""
    ensure_private_dir(state_dir)
    check_state_dir(state_dir)


class DaemonLock:
    """An flock on ``daemon.lock``: held while a daemon runs, released by the kernel on death.

    A pid file can outlive its process (kill -9, reboot) and lie; an flock cannot.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DAEMON_LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        ensure_state_dir(self.path.parent)
        # O_NOFOLLOW|O_NONBLOCK: a planted symlink is never truncated through, a FIFO never
        # waited on (check_state_dir refused both already; this closes the race).
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o600)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafeStateDir(self.path, "is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = daemon_pid(self.path.parent)
            raise AlreadyRunning(
                f"another qwen-refresher (pid {pid or '?'}) already uses {self.path.parent}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
