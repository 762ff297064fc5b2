"""``state.json`` and ``daemon.lock``: the schema constants, the ONE reader of both, and the
one constructor of a status row (``profile_row``, ``store_row``).

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

from .report import SEVERITY

TYPE_CHECKING = False  # not `from typing import ...`: status must not pay for typing
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from .errors import StateFileProblem as StateFileProblem  # served by __getattr__
    from .state import HookStatus, ProfileState, ProfileStatus, PublishedState, StoreStatus

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


def __getattr__(name: str) -> object:
    """``published.StateFileProblem``: its one home is ``errors`` (the tree), fetched when
    asked for; this module's own code raises and catches it through ``problem_kind``."""
    if name == "StateFileProblem":
        return problem_kind()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def problem_kind() -> type[StateFileProblem]:
    """``errors.StateFileProblem``, imported on the first problem, not on every health check
    (``errors`` defines the whole tree: ~1.3 ms of a ~40 ms ``status``). Used in ``except``
    clauses too: Python evaluates those only when an exception reaches them."""
    from .errors import StateFileProblem

    return StateFileProblem


def state_file_problem(path: Path | str, problem: str) -> StateFileProblem:
    return problem_kind()(path, problem)


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
            raise state_file_problem(path, "is a symlink, which the daemon never creates here; "
                                         "not read") from None
        raise state_file_problem(path, f"cannot be opened: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = next((name for test, name in _FILE_TYPES if test(st.st_mode)), "not a file")
        raise state_file_problem(path, f"is {kind}, not a regular file; not read")
    return fd, st


def read_state_file(path: Path | str, cap: int = MAX_STATE_BYTES) -> tuple[bytes, float]:
    """The whole of a regular file and its mtime, at most ``cap`` bytes read.

    Also ``settings_core``'s reader of ``config.toml`` (after resolving a dotfile manager's
    symlink): one hardened stdlib reader for every small file on ``status``'s path.
    """
    fd, st = open_state_file(path)
    try:
        if st.st_size > cap:
            raise state_file_problem(path, f"is {st.st_size} bytes, more than the {cap}-byte "
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
            raise state_file_problem(path, f"is more than {cap} bytes; not read")
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
    except problem_kind() as exc:
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
    except problem_kind() as exc:
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
            problems.append(state_file_problem(path, "is not valid JSON (a JSON object); not read"))
        return None, 0.0
    if doc.get("schema_version") != SCHEMA_VERSION:
        return None, 0.0
    return doc, mtime  # type: ignore[return-value]  # rows are coerced by their readers


# -- the rows: built here, and only here ------------------------------------------------------
#
# One home for a status row: the daemon (``runtime.publisher``) builds every published row with
# ``profile_row``, ``status`` builds its own rows (stores it reads itself, a broken store) with
# it, and ``published_profiles`` rebuilds each row read back from ``state.json`` with it. A new
# field is added here once, and every producer and reader has it.


def profile_row(store: str, store_kind: str, agent: str | None, profile: str,
                state: ProfileState, family: str | None = None,
                expires_at: float | None = None, next_refresh_at: float | None = None,
                last_refresh_at: float | None = None, attempts: int = 0,
                last_error: str | None = None, login_command: str | None = None,
                ) -> ProfileStatus:
    """One profile's status row (``state.ProfileStatus``; ``hook`` is added by who has one).

    Positional parameters in the field order, so that the status fast path can call it once
    per row (1,000 times per health check at 1,000 profiles) without keyword overhead.
    """
    return {"store": store, "store_kind": store_kind, "agent": agent, "profile": profile,
            "family": family, "state": state, "expires_at": expires_at,
            "next_refresh_at": next_refresh_at, "last_refresh_at": last_refresh_at,
            "attempts": attempts, "last_error": last_error, "login_command": login_command}


def store_row(path: str, kind: str, error: str | None) -> StoreStatus:
    """One store's status (``state.StoreStatus``): its path, adapter kind and why it cannot be
    used (None when it can)."""
    return {"path": path, "kind": kind, "error": error}


# -- the rows as read back from state.json ----------------------------------------------------


def as_number(value: object) -> float | None:
    """A published number as a float, or None: a half-upgraded daemon must not crash us."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def as_text(value: object) -> str | None:
    """A published string, or None for anything else."""
    return value if isinstance(value, str) else None


#: Every state a row can be in, for a hashable membership test.
_STATES = frozenset(SEVERITY)


def _coerce(raw: object) -> ProfileStatus | None:
    """One published profile entry with the types we print; None if it is not one.

    The state file is ours, but a health check must not crash on a half-upgraded daemon.
    Written inline, without a call per field (one ``profile_row`` per entry): at 1,000
    profiles this runs 1,000 times on every health check (``type(x) is T`` is exact for what
    ``json.loads`` returns, and leaves out ``bool``, which is an ``int``).
    """
    if type(raw) is not dict:
        return None
    get = raw.get
    store, profile = get("store"), get("profile")
    if type(store) is not str or type(profile) is not str:
        return None
    kind, agent, family, state = get("store_kind"), get("agent"), get("family"), get("state")
    exp, nxt, last = get("expires_at"), get("next_refresh_at"), get("last_refresh_at")
    attempts, error, login = get("attempts"), get("last_error"), get("login_command")
    row = profile_row(
        store, kind if type(kind) is str and kind else "openclaw",
        agent if type(agent) is str else None, profile,
        state if type(state) is str and state in _STATES else "invalid_store",
        family if type(family) is str else None,
        exp if type(exp) is float else float(exp) if type(exp) is int else None,
        nxt if type(nxt) is float else float(nxt) if type(nxt) is int else None,
        last if type(last) is float else float(last) if type(last) is int else None,
        attempts if type(attempts) is int else 0,
        error if type(error) is str else None,
        login if type(login) is str else None)
    if "hook" in raw:
        hook = _coerce_hook(raw["hook"])
        if hook is not None:
            row["hook"] = hook
    return row


def _coerce_hook(raw: object) -> HookStatus | None:
    """The last ``on_rotate`` result of a profile, if the daemon published one."""
    if not isinstance(raw, dict) or not isinstance(raw.get("ok"), bool):
        return None
    code, failures = raw.get("returncode"), raw.get("failures")
    return {"ok": raw["ok"], "at": as_number(raw.get("at")) or 0.0,
            "returncode": code if isinstance(code, int) and not isinstance(code, bool) else None,
            "timed_out": raw.get("timed_out") is True, "output": as_text(raw.get("output")) or "",
            "failing_since": as_number(raw.get("failing_since")),
            "failures": failures if isinstance(failures, int) else 0,
            "next_retry_at": as_number(raw.get("next_retry_at"))}


def published_profiles(published: PublishedState) -> list[ProfileStatus]:
    """The profile rows of a published state, each checked and rebuilt (``_coerce``)."""
    raw = published.get("profiles")
    entries: list[Any] = raw if isinstance(raw, list) else []
    return [row for entry in entries if (row := _coerce(entry)) is not None]


def published_stores(published: PublishedState) -> list[StoreStatus]:
    """The store rows of a published state; an entry without a path is dropped."""
    raw = published.get("stores")
    entries: list[Any] = raw if isinstance(raw, list) else []
    return [store_row(e["path"], as_text(e.get("kind")) or "openclaw", as_text(e.get("error")))
            for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)]


def published_by(published: PublishedState, pid: int | None) -> bool:
    """The state file belongs to the daemon holding the lock, not to one that died before it."""
    daemon = published.get("daemon")
    if not isinstance(daemon, dict) or not isinstance(published.get("profiles"), list):
        return False
    return pid is None or pid <= 0 or daemon.get("pid") == pid
