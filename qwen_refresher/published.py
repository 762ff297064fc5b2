"""``state.json`` and ``daemon.lock``: the schema constants and the ONE reader of both.

The daemon publishes what it knows in ``<state_dir>/state.json`` (``state.write_state``, atomic,
0600, no token) and holds an ``flock`` on ``<state_dir>/daemon.lock`` while it runs. ``status``,
the daemon itself at start-up (``state.read_state``, to remember histories) and the tests all read
them through this module, so the file names, the schema version and the hardening exist once.

Hardening, because ``status`` runs every few seconds from health checks and must answer, not
hang: files are opened ``O_NONBLOCK`` (a FIFO cannot block the ``open``), ``O_NOFOLLOW`` (the
daemon never puts a symlink here; one to ``/dev/zero`` would read forever), their type checked
on the open descriptor (``fstat``: nothing can be swapped in between), their size capped before
and while reading, and JSON parsed inside a guard. A file that fails any of this is a
``StateFileProblem`` naming the file and what is wrong; a missing file is simply absent.

Stdlib only and no ``typing``/``dataclasses``/``pathlib`` at run time (paths are taken as text
or ``Path``, joined with ``os.path``): this is on ``status``'s fast path, where every import is
paid on every health check.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat

TYPE_CHECKING = False  # not `from typing import ...`: status must not pay for typing
if TYPE_CHECKING:
    from pathlib import Path

    from .state import PublishedState

#: ``state.json``'s format; a reader ignores a file with another version (an older daemon).
SCHEMA_VERSION = 1
STATE_FILE = "state.json"
JOURNAL_FILE = "journal.json"
SALT_FILE = "salt"
LINEAGE_FILE = "lineage.log"
DAEMON_LOCK = "daemon.lock"
#: Every file the daemon keeps in its state dir; each must be a plain file when present.
STATE_DIR_FILES = (STATE_FILE, JOURNAL_FILE, SALT_FILE, LINEAGE_FILE, DAEMON_LOCK)

#: A published state is a few hundred bytes per profile (about 0.5 MiB at 1,000 stores x 2);
#: anything past this is not ours, and a health check must not read it.
MAX_STATE_BYTES = 16 * 1024 * 1024
#: The journal holds a few tokens per pending rotation.
MAX_JOURNAL_BYTES = 16 * 1024 * 1024

_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class StateFileProblem(Exception):
    """A file in our state dir is not what the daemon writes there (a FIFO, a directory, a
    symlink, a huge or garbled file). Readers name it and carry on without it."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def as_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "problem": self.problem}


def open_state_file(path: Path | str) -> tuple[int, os.stat_result]:
    """A descriptor on a regular file of our state dir, or ``StateFileProblem``.

    A missing file raises ``FileNotFoundError``: that is the normal "no daemon ever ran" case.
    """
    try:
        fd = os.open(path, _FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateFileProblem(path, "is a symlink, which the daemon never creates here; "
                                         "not read") from None
        raise StateFileProblem(path, f"cannot be opened: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = next((name for test, name in _FILE_TYPES if test(st.st_mode)), "not a file")
        raise StateFileProblem(path, f"is {kind}, not a regular file; not read")
    return fd, st


def read_state_file(path: Path | str, cap: int = MAX_STATE_BYTES) -> tuple[bytes, float]:
    """The whole of a regular file and its mtime, at most ``cap`` bytes read.

    Also ``settings_core``'s reader of ``config.toml`` (after resolving a dotfile manager's
    symlink): one hardened stdlib reader for every small file on ``status``'s path.
    """
    fd, st = open_state_file(path)
    try:
        if st.st_size > cap:
            raise StateFileProblem(path, f"is {st.st_size} bytes, more than the {cap}-byte "
                                         "limit for this file; not read")
        chunks: list[bytes] = []
        size = 0
        while size <= cap:
            chunk = os.read(fd, min(1 << 20, cap + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > cap:  # it grew while we read
            raise StateFileProblem(path, f"is more than {cap} bytes; not read")
        return b"".join(chunks), st.st_mtime
    finally:
        os.close(fd)


def daemon_pid(state_dir: Path | str, problems: list[StateFileProblem] | None = None,
               ) -> int | None:
    """The running daemon's pid (-1 if unreadable), or None when no daemon holds the lock.

    An flock cannot outlive its process, unlike a pid file, so this cannot be fooled by a
    daemon killed with -9. A lock path that is not a regular file is added to ``problems``:
    no daemon of ours can be holding it.
    """
    try:
        fd, _ = open_state_file(os.path.join(state_dir, DAEMON_LOCK))
    except FileNotFoundError:
        return None
    except StateFileProblem as exc:
        if problems is not None:
            problems.append(exc)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.read(fd, 32).decode(errors="replace").strip()
            return int(raw) if raw.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_published(state_dir: Path | str, problems: list[StateFileProblem] | None = None,
                   ) -> tuple[PublishedState | None, float]:
    """The daemon's last published state and when it was written (its mtime), or (None, 0).

    A file of another ``schema_version`` is not ours to interpret: (None, 0), silently. A state
    file we cannot use is added to ``problems`` (named, with what is wrong).
    """
    path = os.path.join(state_dir, STATE_FILE)
    try:
        data, mtime = read_state_file(path)
    except FileNotFoundError:
        return None, 0.0
    except StateFileProblem as exc:
        if problems is not None:
            problems.append(exc)
        return None, 0.0
    if not data:
        return None, 0.0
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        if problems is not None:
            problems.append(StateFileProblem(path, "is not valid JSON (a JSON object); not read"))
        return None, 0.0
    if doc.get("schema_version") != SCHEMA_VERSION:
        return None, 0.0
    return doc, mtime  # type: ignore[return-value]  # rows are coerced by their readers
