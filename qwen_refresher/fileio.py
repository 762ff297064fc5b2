"""Reading store files defensively and replacing them atomically.

OpenClaw itself writes its store by truncate-and-write, so a reader can catch it half written.
We never do that: the new bytes go to a temporary file in the same directory, are fsynced, then
renamed over the target, and the directory is fsynced so the rename survives a power cut. A
reader sees the old file or the new one, never a mix. Stdlib only (``status`` reads through here).

Every file the package reads goes through ``read_regular_file`` (no symlink followed, no FIFO
waited on, only regular files, size capped); a store's directories are checked from their
anchor down (``check_parents``), our state dir must be ours and 0700 (``check_private_dir``:
writable by nobody else, else refused; merely readable by others, tightened with a warning),
and a file holding tokens is always written 0600 with its owner kept or refused
(``tighten_mode``, ``owner_to_keep``), never silently changed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shlex
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import (
    FileMissing,
    FileRefused,
    OwnershipError,
    StoreUnreadable,
    StoreWriteError,
    UnsafeStateDir,
)
from .paths import sibling_name

_TEMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")
#: Stores are a few KiB; anything near this is not a store, and reading it whole would hurt.
MAX_STORE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class FileRead:
    """What we read and the identity of the file we read it from."""

    data: bytes
    real_path: Path
    mode: int
    uid: int
    gid: int
    mtime: float


class _SharedChecks:
    """What one scan of many stores looked up once for all of them (``shared_checks``)."""

    __slots__ = ("dir_stats", "real_dirs", "since")

    def __init__(self) -> None:
        self.real_dirs: dict[str, str] = {}
        self.dir_stats: dict[str, os.stat_result] = {}
        self.since = time.monotonic()


_SHARED = threading.local()
#: How long a directory looked up in a ``shared_checks`` scope is taken as it was: a scan
#: that takes longer (a store waited on under its writer's lock) looks again.
SHARED_CHECKS_MAX_AGE = 1.0


@contextlib.contextmanager
def shared_checks() -> Iterator[None]:
    """Within this block, on this thread, a directory that several stores share is looked up
    once: its real path (``resolve_confined``) and its ``lstat`` (``check_parents``).

    A scan reads every store; at 1,000 agents each store under ``<state>/agents/<id>/agent``
    repeated the ``realpath`` of the whole chain (one ``lstat`` per component, in Python) and
    the ``lstat`` of ``<state>`` and ``agents``: ~40 % of reading a store. Nothing is skipped:
    every directory is still checked, each once per scope (and again after
    ``SHARED_CHECKS_MAX_AGE``), and a store's own directories, which no other store shares,
    every time. The file itself is never looked up from here: its ``lstat``, the
    ``O_NOFOLLOW`` open and the ``fstat`` stay per read. Nested scopes share the outer one;
    other threads (an event's read, a refresh's write) see none of it.
    """
    if getattr(_SHARED, "scope", None) is not None:
        yield
        return
    _SHARED.scope = _SharedChecks()
    try:
        yield
    finally:
        _SHARED.scope = None


def _shared() -> _SharedChecks | None:
    scope: _SharedChecks | None = getattr(_SHARED, "scope", None)
    if scope is not None and time.monotonic() - scope.since > SHARED_CHECKS_MAX_AGE:
        scope = _SHARED.scope = _SharedChecks()
    return scope


def _real_dir(directory: str, scope: _SharedChecks | None) -> str:
    """``Path(directory).resolve()`` as text (a symlink loop raises, as there).

    In a ``shared_checks`` scope, an absolute directory is its parent's real path (looked up
    the same way, once per scope) plus its own name when that is not a symlink: one ``lstat``
    where ``realpath`` does one per component. Anything unusual (a symlink, ``..``, a
    missing directory, ``//``) takes the full resolution.
    """
    if scope is None or not directory.startswith("/") or directory.startswith("//"):
        return str(Path(directory).resolve())
    known = scope.real_dirs.get(directory)
    if known is not None:
        return known
    up, name = os.path.split(directory)
    if not name or name in (".", ".."):
        real = str(Path(directory).resolve())
    else:
        candidate = os.path.join(_real_dir(up, scope), name)
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except OSError:
            return str(Path(directory).resolve())  # missing, unreadable: not kept
        real = str(Path(candidate).resolve()) if is_link else candidate
    scope.real_dirs[directory] = real
    return real


def _chain_real(scope: _SharedChecks, directory: str, lst: os.stat_result,
                above: str | None) -> str | None:
    """The real path of ``directory`` as ``check_parents`` walks down to a store, noted for
    ``resolve_confined``: the real path of the directory above (``above``) plus the name,
    when ``lst`` (the walk's own ``lstat``) says it is no symlink; the top of the walk is
    resolved (once per scope). None from the first directory it cannot tell that way."""
    if above is None:
        try:
            return _real_dir(directory, scope)
        except (OSError, RuntimeError):
            return None
    name = directory.rpartition("/")[2]
    if stat.S_ISLNK(lst.st_mode) or name in ("", ".", ".."):
        return None
    return scope.real_dirs.setdefault(directory, f"{above.rstrip('/')}/{name}")


def resolve_confined(path: Path) -> Path:
    """The real file behind ``path``, refusing symlinks that leave the file's own directory.

    A store is a secret; a symlink from an agent dir to, say, ``/etc/shadow`` or another user's
    file must not make us read, lock or replace that file. The directory's real path is
    shared within a ``shared_checks`` scope; the file's own ``lstat`` is not.
    """
    scope = _shared()
    try:
        parent: Path | None
        if scope is None:
            parent = path.parent.resolve()
            here = parent / path.name
        else:
            directory, name = os.path.split(os.fspath(path))
            real_dir = _real_dir(directory or ".", scope)
            # No symlink on the way (the usual case): the path is its own real path.
            here = path if real_dir == directory else Path(os.path.join(real_dir, name))
            parent = None  # built below if needed
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before 3.13)
        raise StoreUnreadable(path, f"cannot be resolved: {exc}") from None
    # Not a symlink (the usual case): its real path is its real directory plus its name, which
    # spares a second pure-Python ``realpath`` per read. Swapped for a symlink after this look,
    # the ``O_NOFOLLOW`` open that follows refuses it.
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return here
    except FileNotFoundError:
        return here  # the open names it "does not exist"
    except OSError:
        pass  # judged by the full resolution below
    if parent is None:
        parent = here.parent
    try:
        real = path.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before 3.13)
        raise StoreUnreadable(path, f"cannot be resolved: {exc}") from None
    if real.parent != parent and parent not in real.parents:
        raise StoreUnreadable(path, f"is a symlink to {real}, outside {parent}; refusing to follow")
    return real


_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC


def file_type_name(mode: int) -> str:
    """A file type as people say it, for error messages: "fifo", "socket", "symlink"..."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _refuse_type(shown: Path, mode: int) -> FileRefused:
    kind = file_type_name(mode)
    if kind == "directory":
        return FileRefused(shown, "is a directory, not a file", file_type=kind)
    if kind == "symlink":
        return FileRefused(shown, "is a symlink; refusing to follow it", file_type=kind)
    return FileRefused(shown, f"is not a regular file (it is a {kind})", file_type=kind)


def read_regular_file(path: Path, max_bytes: int, *, shown: Path | None = None) -> FileRead:
    """Read a whole file that must be a small regular file: THE way this package reads a file.

    Every file we read goes through here (stores, Qwen Code's file, ``openclaw.json``, our own
    ``config.toml``, and ``state.json``, the journal, the lineage log, the salt and the pid
    file in our state dir), because each can be replaced by something hostile:

    * ``O_NONBLOCK``: a FIFO with no writer (or a device) cannot hang the open or the read;
    * ``O_NOFOLLOW``: a symlink at ``path`` is refused (``FileRefused``, ``file_type``
      "symlink"), never followed to someone else's file; callers that accept confined
      symlinks (stores) resolve them first with ``resolve_confined``;
    * ``fstat`` on the opened descriptor: anything but a regular file (fifo, socket, device,
      directory) is refused, naming the file and its type, before a byte is read;
    * ``max_bytes``: a file larger than the cap is refused from its size, and one that grows
      while we read stops at the cap, so memory stays bounded.

    Raises ``FileMissing`` (problem "does not exist"), ``FileRefused`` or ``StoreUnreadable``
    (permission denied, I/O error); every message names ``shown`` (default ``path``), the name
    the user knows. Stdlib only: ``status`` calls it.
    """
    shown = shown or path
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise FileMissing(shown, "does not exist") from None
    except PermissionError:
        raise StoreUnreadable(shown, "permission denied while reading") from None
    except OSError as exc:
        # ELOOP: a symlink under O_NOFOLLOW; ENXIO: a socket, or a device without its driver.
        with contextlib.suppress(OSError):
            raise _refuse_type(shown, os.lstat(path).st_mode) from None
        if exc.errno == errno.ELOOP:
            raise FileRefused(shown, "is a symlink; refusing to follow it",
                              file_type="symlink") from None
        raise StoreUnreadable(shown, f"cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse_type(shown, st.st_mode)
        if st.st_size > max_bytes:
            raise FileRefused(shown, f"is {st.st_size} bytes, larger than the {max_bytes}-byte "
                                     "limit for this file")
        chunks: list[bytes] = []
        total = 0
        # The first read asks for the size fstat gave, plus one byte to see a file that
        # grew; then a small read proves the end. A fixed 64 KiB read made a 64 KiB buffer
        # for a 2 KiB store, shrunk in place, twice per read (the second for the end): at
        # every refresh, heap holes that kept the resident size creeping up (issue 16).
        want = st.st_size + 1
        while True:
            try:
                chunk = os.read(fd, min(want, max_bytes + 1 - total))
            except OSError as exc:
                raise StoreUnreadable(shown, f"read failed: {exc.strerror}") from None
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise FileRefused(shown, f"grew past the {max_bytes}-byte limit while reading")
            chunks.append(chunk)
            want = 65536 if len(chunk) == want else 1
        return FileRead(
            data=b"".join(chunks),
            real_path=path,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime=st.st_mtime,
        )
    finally:
        os.close(fd)


def read_store_file(path: Path, *, max_bytes: int = MAX_STORE_BYTES) -> FileRead:
    """Read a whole store file through ``read_regular_file``, after ``resolve_confined``.

    A symlink confined to the store's own directory is followed (OpenClaw follows it too);
    ``O_NOFOLLOW`` on the real path then stops a symlink swapped in after the resolution.
    """
    real = resolve_confined(path)
    try:
        return read_regular_file(real, max_bytes, shown=path)
    except FileRefused as exc:
        if exc.file_type == "symlink":
            raise StoreUnreadable(path, "is a symlink that changed while reading") from None
        raise


def _owner_name(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


@functools.lru_cache(maxsize=8192)
def _parent_chain(parent: str, anchor: str | None) -> tuple[tuple[str, ...], bool]:
    """The directories ``check_parents`` checks, anchor first, and whether ``anchor`` was a
    real ancestor. Pure path arithmetic (no file system), so it is computed once per store
    directory: at 1,000 stores the pathlib work was most of a check, repeated on every read
    and write. The ``lstat`` of each directory stays per call, that is the check (per
    sweep, at most a second old, for a directory in a ``shared_checks`` scope). Strings,
    not Paths, keyed by strings: a Path per ancestor per store directory was 1.3 MB of the
    idle daemon at 1,000 stores."""
    if anchor is None or not (parent == anchor or parent.startswith(anchor.rstrip("/") + "/")):
        return (parent,), False
    chain = [anchor]
    for part in parent[len(anchor):].split("/"):
        if part:
            chain.append(os.path.join(chain[-1], part))
    return tuple(chain), True


def is_within(path: Path, directory: Path) -> bool:
    """``path == directory or directory in path.parents``, by comparing parts: the pathlib
    spelling builds a Path per ancestor and compares each (O(depth²) objects), which at 1,000
    stores was a measurable share of start-up."""
    inner, outer = path.parts, directory.parts
    return len(outer) <= len(inner) and inner[:len(outer)] == outer


def check_parents(path: Path, anchor: Path | None = None, *,
                  trusted_uids: Iterable[int] = ()) -> None:
    """Refuse a file whose directories, from ``anchor`` down to its own, could be swapped.

    The symlink check on a store file is worthless if a directory above it is a symlink to
    somewhere else (``agents/evil/agent -> /home/victim/...``) or belongs to another user, who
    can replace the file by a symlink between our check and our open. So every directory from
    ``anchor`` (OpenClaw's state dir, Qwen Code's home; default: the file's own directory) to
    the file's parent gets the store file's treatment: a symlink is followed only when it stays
    inside its own parent directory, and the directory must belong to us, to root, to the
    anchor's owner (whose tree it is), or to one of ``trusted_uids`` (the store's own owner,
    who controls the file anyway). Raises ``FileRefused`` naming the directory.

    In a ``shared_checks`` scope (a sweep), each directory's ``lstat`` is taken once for all
    the stores under it, and the real path of each directory found no symlink is noted for
    ``resolve_confined``, which then need not walk the chain again; the verdict is the same.
    """
    chain, given = _parent_chain(os.path.dirname(path) or ".",
                                 None if anchor is None else os.fspath(anchor))
    trusted = {os.geteuid(), 0, *trusted_uids}
    scope = _shared()
    seen = None if scope is None else scope.dir_stats
    walked: str | None = None  # in a scope: the real path of the directory last checked
    for index, directory in enumerate(chain):
        at_anchor = index == 0
        try:
            # In a ``shared_checks`` scope, a directory several stores share (the anchor,
            # ``agents``) is looked at once; what follows judges it for each store all the same.
            lst = seen.get(directory) if seen is not None else None
            if lst is None:
                lst = os.lstat(directory)
                if seen is not None:
                    seen[directory] = lst
        except FileNotFoundError:
            return  # nothing below exists yet; the file's own check reports it
        except OSError as exc:
            raise FileRefused(path, f"its directory {directory} cannot be checked: "
                                    f"{exc.strerror}") from None
        if scope is not None:
            walked = _chain_real(scope, directory, lst, None if at_anchor else walked)
        if stat.S_ISLNK(lst.st_mode) and at_anchor and given:
            lst = os.stat(directory)  # the anchor is where the user put the tree: trusted
        elif stat.S_ISLNK(lst.st_mode):
            try:
                real = Path(directory).resolve(strict=True)
                container = Path(directory).parent.resolve(strict=True)
            except (OSError, RuntimeError) as exc:
                raise FileRefused(path, f"its directory {directory} is a symlink that cannot be "
                                        f"resolved: {exc}", file_type="symlink") from None
            if real.parent != container:
                raise FileRefused(
                    path, f"its directory {directory} is a symlink to {real}, outside "
                          f"{container}; refusing to follow it", file_type="symlink")
            lst = os.stat(real)
        if not stat.S_ISDIR(lst.st_mode):
            kind = file_type_name(lst.st_mode)
            raise FileRefused(path, f"{directory} is a {kind}, not a directory", file_type=kind)
        if at_anchor and given:
            trusted.add(lst.st_uid)  # whose tree it is: a root daemon serving one user
        elif lst.st_uid not in trusted:
            raise FileRefused(
                path, f"its directory {directory} belongs to {_owner_name(lst.st_uid)}, not "
                      f"to us ({_owner_name(os.geteuid())}) or root: that user could swap the "
                      "file for a symlink; refusing to manage it")


#: State dirs already tightened from a wider mode, so each is named once per process.
_TIGHTENED_DIRS: set[Path] = set()


def check_private_dir(directory: Path) -> None:
    """Our state dir must be a real directory, ours, and 0700: else ``UnsafeStateDir`` (exit 78).

    It holds the journal (live tokens, briefly) and files we rewrite. Anyone else who can
    write there can plant symlinks (``state.json -> their victim's file``) or read tokens, so
    we refuse to start rather than trust per-file defences alone.

    The rule, decided on who could have written there:

    * a symlink, a non-directory, or another owner: refused (the owner could have planted
      anything, and can change the mode back);
    * ours but group- or other-WRITABLE (0775, 0777, 1777...): refused, since someone else
      may already have planted a symlink or a FIFO we cannot tell from our own files;
    * ours and wider than 0700 but writable by nobody else (0755, 0750, and 2755, what
      ``mkdir -p`` under umask 022 makes on a Kubernetes fsGroup volume): nobody but us (and
      root) could have created anything in it, so it is tightened to 0700 in place and a
      ``state_dir_mode_tightened`` warning names it and its old mode, once. Refusing it
      would only make the operator run the chmod we can run ourselves.

    The check and the ``fchmod`` act on one descriptor opened ``O_NOFOLLOW|O_DIRECTORY``, so
    a directory swapped in between cannot be the one we judge or change. Each refusal says
    the exact command that fixes it.
    """
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnsafeStateDir(directory, f"cannot be checked: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeStateDir(directory, "is a symlink; point the setting at the real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStateDir(directory, f"is a {file_type_name(st.st_mode)}, not a directory")
    quoted = shlex.quote(str(directory))
    if st.st_uid != os.geteuid():
        raise UnsafeStateDir(directory, f"belongs to {_owner_name(st.st_uid)}, not to us "
                                        f"({_owner_name(os.geteuid())}); fix it with "
                                        f"`chown {os.geteuid()} {quoted} && chmod 700 {quoted}` "
                                        "(as root), or use a directory of our own")
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return
    if mode & 0o022:
        raise UnsafeStateDir(directory, f"has mode {mode:04o}: others can write to it and "
                                        "could have planted symlinks; check its contents, then "
                                        f"fix it with `chmod 700 {quoted}`")
    _tighten_private_dir(directory, st, mode, quoted)


def _tighten_private_dir(directory: Path, seen: os.stat_result, mode: int, quoted: str) -> None:
    """chmod 0700 our own state dir found readable (not writable) by others; warn once."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_DIRECTORY", 0)
                     | _O_CLOEXEC)
    except OSError as exc:
        raise UnsafeStateDir(directory, f"has mode {mode:04o} and cannot be opened to "
                                        f"tighten it ({exc.strerror}); fix it with "
                                        f"`chmod 700 {quoted}`") from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino) or st.st_uid != os.geteuid() \
                or stat.S_IMODE(st.st_mode) & 0o022:
            raise UnsafeStateDir(directory, "changed while being checked; refusing it")
        os.fchmod(fd, 0o700)
    except OSError as exc:
        raise UnsafeStateDir(directory, f"has mode {mode:04o}; tightening it to 0700 failed "
                                        f"({exc.strerror}); fix it with `chmod 700 {quoted}`"
                             ) from None
    finally:
        os.close(fd)
    with _WARN_LOCK:
        first = directory not in _TIGHTENED_DIRS
        _TIGHTENED_DIRS.add(directory)
    if first:
        report("state_dir_mode_tightened", state_dir=str(directory), old_mode=f"{mode:04o}",
               mode="0700", message="our state dir was readable by others (nobody else could "
                                    "write to it); tightened to 0700")


def owner_to_keep(path: Path, uid: int, gid: int, *, euid: int | None = None,
                  egid: int | None = None,
                  groups: Iterable[int] | None = None) -> tuple[int, int] | None:
    """The owner to give the replacement of ``path`` (owned ``uid:gid``), or None if it is ours.

    A rename puts a new inode in place, owned by us: keeping the old owner needs a ``fchown``
    on the temporary file, which root can always do and a user only to change the group to one
    of its own groups. When the owner cannot be kept the store is refused (``OwnershipError``)
    before any refresh, never silently given to us.
    """
    euid = os.geteuid() if euid is None else euid
    egid = os.getegid() if egid is None else egid
    if uid == euid and gid == egid:
        return None  # the usual case, decided before asking for our groups (a system call)
    my_groups = (set(os.getgroups()) if groups is None else set(groups)) | {egid}
    if euid == 0 or (uid == euid and gid in my_groups):
        return (uid, gid)
    if uid != euid:
        raise OwnershipError(path, f"belongs to {_owner_name(uid)}; we run as "
                                   f"{_owner_name(euid)} and could not keep its owner when "
                                   "replacing it; run as that user, or chown the file")
    raise OwnershipError(path, f"has group {gid}, which we ({_owner_name(euid)}) are not a "
                               "member of: its group could not be kept when replacing it")


#: (real path) of stores already warned about, so each is named once per run.
_WIDENED_WARNED: set[Path] = set()
_WARN_LOCK = threading.Lock()


def tighten_mode(path: Path, shown: str, old_mode: int) -> int:
    """The mode a file holding tokens is written with: always 0600, as OpenClaw chmods its store.

    A file found wider than 0600 (group or others could read a token) is tightened, and the
    first time per file a ``store_mode_tightened`` warning names it and its old mode, so the
    change is never silent.
    """
    if old_mode & 0o077:
        with _WARN_LOCK:
            first = path not in _WIDENED_WARNED
            _WIDENED_WARNED.add(path)
        if first:
            report("store_mode_tightened", store=shown, old_mode=f"{old_mode:04o}",
                   mode="0600", message="the file holds tokens and was readable by others; "
                                        "written 0600 as OpenClaw does")
    return 0o600


def report(event: str, **fields: str) -> None:
    """Log a warning through the daemon's structured log when it is set up, else stdlib logging.

    This module stays importable without structlog (``status`` uses it).
    """
    try:
        import structlog
    except ImportError:  # pragma: no cover - structlog is a dependency of the daemon
        import logging

        logging.getLogger("qwen_refresher").warning("%s %s", event, fields)
        return
    structlog.get_logger("qwen_refresher").warning(event, **fields)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable. Some filesystems refuse; that is not an error."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o600,
    owner: tuple[int, int] | None = None,
    user_path: Path | None = None,
) -> None:
    """Replace ``path`` with ``data`` so that no reader ever sees a partial file.

    ``mode`` and ``owner`` are applied to the temporary file before the rename, so the secret is
    never visible with looser permissions, not even for an instant. ``user_path`` is the name
    the user knows (it may be a symlink to ``path``), used in error messages.
    """
    shown = user_path or path
    directory = path.parent
    tmp = sibling_name(path, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC,
                     0o600)
    except OSError as exc:
        raise StoreWriteError(shown, f"cannot create a temporary file in {directory}: "
                                     f"{exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                st = os.fstat(fd)
                if (st.st_uid, st.st_gid) != owner:
                    try:
                        os.fchown(fd, owner[0], owner[1])
                    except PermissionError:
                        raise OwnershipError(shown, f"belongs to {_owner_name(owner[0])} "
                                                    f"group {owner[1]}, which we cannot keep "
                                                    "on the new file; not replaced") from None
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OwnershipError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StoreWriteError(shown, f"write failed: {exc.strerror}") from None
    fsync_dir(directory)


def remove_stale_temp_files(directory: Path, names: Iterable[str], *,
                            older_than: float = 60.0) -> list[Path]:
    """Delete temporary files that ``atomic_write`` left behind when it was killed mid-write.

    Each holds a copy of the tokens it was about to write, so it must not linger. Only our own
    pattern (``.<name>.<12 hex>.tmp``) is touched, and only files older than any write could
    still be in flight.
    """
    wanted = set(names)
    now = time.time()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or match.group(1) not in wanted:
            continue
        try:
            if entry.is_file(follow_symlinks=False) and \
                    now - entry.stat(follow_symlinks=False).st_mtime > older_than:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` and every missing parent with mode 0700, as OpenClaw does.

    ``Path.mkdir(parents=True, mode=...)`` applies the mode to the last directory only (the
    parents get the umask's 0755), so each level is made here; existing ones are left as
    they are.
    """
    missing: list[Path] = []
    current = directory
    while not current.is_dir() and current != current.parent:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            raise StoreWriteError(path, f"cannot create directory: {exc.strerror}") from None
