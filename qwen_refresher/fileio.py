"""Reading store files defensively and replacing them atomically.

OpenClaw itself writes its store by truncate-and-write, so a reader can catch it half written.
We never do that: the new bytes go to a temporary file in the same directory, are fsynced, then
renamed over the target, and the directory is fsynced so the rename survives a power cut. A
reader sees the old file or the new one, never a mix. Stdlib only (``status`` reads through here).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreUnreadable, StoreWriteError

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


def resolve_confined(path: Path) -> Path:
    """The real file behind ``path``, refusing symlinks that leave the file's own directory.

    A store is a secret; a symlink from an agent dir to, say, ``/etc/shadow`` or another user's
    file must not make us read, lock or replace that file.
    """
    try:
        parent = path.parent.resolve()
        real = path.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before 3.13)
        raise StoreUnreadable(path, f"cannot be resolved: {exc}") from None
    if real.parent != parent and parent not in real.parents:
        raise StoreUnreadable(path, f"is a symlink to {real}, outside {parent}; refusing to follow")
    return real


def read_store_file(path: Path, *, max_bytes: int = MAX_STORE_BYTES) -> FileRead:
    """Read a whole store file, refusing anything that is not a small regular file.

    ``O_NONBLOCK`` keeps a FIFO planted at the path from hanging us; ``O_NOFOLLOW`` on the real
    path stops a symlink swapped in after ``resolve_confined`` from being followed.
    """
    real = resolve_confined(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise StoreUnreadable(path, "does not exist") from None
    except PermissionError:
        raise StoreUnreadable(path, "permission denied while reading") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreUnreadable(path, "is a symlink that changed while reading") from None
        raise StoreUnreadable(path, f"cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise StoreUnreadable(path, "is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise StoreUnreadable(path, "is not a regular file (fifo, socket or device)")
        if st.st_size > max_bytes:
            raise StoreUnreadable(
                path, f"is {st.st_size} bytes, larger than the {max_bytes}-byte limit for a store"
            )
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError as exc:
                raise StoreUnreadable(path, f"read failed: {exc.strerror}") from None
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise StoreUnreadable(path, f"grew past the {max_bytes}-byte limit while reading")
            chunks.append(chunk)
        return FileRead(
            data=b"".join(chunks),
            real_path=real,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime=st.st_mtime,
        )
    finally:
        os.close(fd)


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
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StoreWriteError(shown, f"cannot create a temporary file in {directory}: "
                                     f"{exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, mode)
            if owner is not None and (owner[0] != os.geteuid() or owner[1] != os.getegid()):
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, owner[0], owner[1])
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
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
