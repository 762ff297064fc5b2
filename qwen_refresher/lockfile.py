"""The lock-file protocols of the programs we share files with, spoken exactly as they speak them.

Both OpenClaw (``src/plugin-sdk/file-lock.ts``) and Qwen Code (``sharedTokenManager.ts``) lock a
file by exclusively creating a sibling lock file and release it by unlinking; they differ in what
the file holds and when a lock counts as abandoned. Taking *their* lock, not an flock of our own,
is what makes OpenClaw re-read our fresh token instead of refreshing over us.

Stdlib only. Waiting is bounded: past ``timeout`` we raise ``LockTimeout`` and the caller retries
later, holding nothing. Every round of the wait checks that deadline and sleeps, whatever sits at
the lock path; a thing that is not a regular file there (FIFO, symlink, directory, socket,
device) is never opened for reading and never removed: ``LockUnusable`` names it at once.

Taking over a stale lock is where both programs are racy: they read the lock, judge it, then
unlink the *path*, which by then may hold a newer, live lock (OpenClaw's own contender does
exactly that, and so did we: two of our workers both "took over" a dead daemon's lock and wrote
the store at once). Our takeover is made atomic among our own contenders, while the files on
disk stay what OpenClaw and Qwen Code expect:

- threads of one process hold a per-path mutex for as long as one of them holds the lock;
- processes take over only under an ``flock`` on the lock's directory (no new file on disk;
  the kernel drops it if the process dies), judge the lock again under it, move it aside with
  ``rename`` to a unique name, check that what was moved is the very file judged stale (same
  inode, mtime, size and content) and only then discard it and create theirs with ``link``
  (exclusive, like ``O_EXCL``). A lock that changed in between is put back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .errors import LockTimeout, LockUnusable
from .paths import sibling_name
from .protocols import StopSignal

#: OpenClaw's stale threshold for its lock files.
OPENCLAW_STALE_SECONDS = 30.0
#: Qwen Code's stale threshold for ``oauth_creds.lock``.
QWEN_CODE_STALE_SECONDS = 10.0
#: The most of a lock file we read. OpenClaw's are about 60 bytes, Qwen Code's 36; anything
#: longer is not a lock either program wrote, and is judged by its mtime alone.
MAX_LOCK_BYTES = 4096
#: Longest single sleep of a lock wait.
MAX_PAUSE = 1.0
#: The largest pid a kernel can hand out (``pid_t`` is 32-bit; Linux caps it at 2**22).
#: A lock file's pid outside 1..PID_MAX is no process, and ``os.kill`` would raise on it.
PID_MAX = 2**31 - 1


def pid_alive(pid: int) -> bool:
    """``kill(pid, 0)``, read as OpenClaw reads it: only "no such process" means dead.

    Anything but an int in 1..``PID_MAX`` is no process: ``os.kill`` would raise
    OverflowError (1e20) or TypeError on it, and a lock file's content is not ours to trust.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class LockStyle:
    """How one program writes and judges lock files."""

    name: str
    stale_after: float
    make_content: Callable[[], bytes]
    is_stale: Callable[[bytes, float, float], bool]  # (content, mtime, now) -> stale?


def _openclaw_content() -> bytes:
    now = datetime.now(UTC)
    created = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    return json.dumps({"pid": os.getpid(), "createdAt": created}, indent=2).encode()


def _parse_iso(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError):
        return None


def _lock_pid(value: object) -> int | None:
    """A lock file's pid if it is one a process can have (an int in 1..``PID_MAX``), else
    None. 1e20, NaN, Infinity, 12.5, "12", true: not a pid, whoever wrote them."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 < value <= PID_MAX else None


def _openclaw_stale(content: bytes, mtime: float, now: float) -> bool:
    """OpenClaw's ``isStaleLock``: a dead pid, an unparsable or old ``createdAt``, or an old
    mtime. A payload without a valid pid (``_lock_pid``) and a string createdAt counts for
    nothing: it is judged by its mtime, as OpenClaw judges content it cannot parse. Hostile
    content (deep nesting, huge numbers, NaN) never raises out of here."""
    try:
        payload = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, OverflowError):
        payload = None
    if isinstance(payload, dict):
        pid, created = _lock_pid(payload.get("pid")), payload.get("createdAt")
        if pid is not None and isinstance(created, str):
            if not pid_alive(pid):
                return True
            stamp = _parse_iso(created)
            if stamp is None or now - stamp > OPENCLAW_STALE_SECONDS:
                return True
    return now - mtime > OPENCLAW_STALE_SECONDS


def _qwen_code_stale(content: bytes, mtime: float, now: float) -> bool:
    return now - mtime > QWEN_CODE_STALE_SECONDS


OPENCLAW = LockStyle("openclaw", OPENCLAW_STALE_SECONDS, _openclaw_content, _openclaw_stale)
QWEN_CODE = LockStyle(
    "qwen-code", QWEN_CODE_STALE_SECONDS, lambda: str(uuid.uuid4()).encode(), _qwen_code_stale
)


@dataclass(frozen=True)
class _Seen:
    """One lock file as we looked at it: what we judge, and how we recognise it later.

    ``content`` is None when the file could not be read or is longer than any real lock; it is
    then judged by its mtime, as OpenClaw judges a payload it cannot parse.
    """

    dev: int
    ino: int
    mtime_ns: int
    size: int
    content: bytes | None

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9


_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFDIR: "directory", stat.S_IFLNK: "symbolic link",
          stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device"}


def _unusable(path: Path, mode: int) -> LockUnusable:
    kind = _KINDS.get(stat.S_IFMT(mode), "special file")
    return LockUnusable(path, f"not a regular file but a {kind}: no program we share this store "
                              "with makes its lock that way, so the store is skipped and the "
                              "thing is left alone; remove it if nothing uses it")


def _look(path: Path | str, shown: Path) -> _Seen | None:
    """``lstat`` then, for a regular file only, a non-blocking, non-following open, an ``fstat``
    check and a capped read. None: nothing there. Raises ``LockUnusable`` (naming ``shown``)
    for anything that is not a regular file; never blocks, never follows a symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise _unusable(shown, st.st_mode)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink put there since the lstat
            raise _unusable(shown, stat.S_IFLNK) from None
        return _Seen(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, None)
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            raise _unusable(shown, fst.st_mode)
        chunks: list[bytes] = []
        left = MAX_LOCK_BYTES + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        joined = b"".join(chunks)
        data: bytes | None = joined if len(joined) <= MAX_LOCK_BYTES else None
    except OSError:
        data = None
        fst = st
    finally:
        os.close(fd)
    return _Seen(fst.st_dev, fst.st_ino, fst.st_mtime_ns, fst.st_size, data)


_MUTEXES: dict[str, threading.Lock] = {}
_MUTEXES_GUARD = threading.Lock()


def _mutex_for(path: Path) -> threading.Lock:
    """The in-process mutex of one lock path: threads of one process never contend on disk."""
    key = os.path.abspath(path)
    with _MUTEXES_GUARD:
        return _MUTEXES.setdefault(key, threading.Lock())


@contextlib.contextmanager
def _directory_flock(directory: Path, deadline: float) -> Iterator[bool]:
    """An exclusive ``flock`` on ``directory``, for takeovers only; yields whether we have it.

    Holders keep it for microseconds, so we poll without blocking for at most a quarter of a
    second (then the caller's wait goes on, checking its deadline and ``stop``). Where the file
    system has no flock we go on without it (rename-and-verify still holds against everything
    but a put-back race); a directory we cannot open yields False.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield False
        return
    try:
        pause, give_up = 0.001, min(deadline, time.monotonic() + 0.25)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() + pause >= give_up:
                    yield False
                    return
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    yield True  # no flock here: rename-and-verify alone
                    return
                yield False
                return
        yield True
    finally:
        os.close(fd)  # also drops the flock


class FileLock:
    """One lock file of a given style. Not re-entrant; one holder per instance at a time."""

    def __init__(
        self,
        lock_path: Path,
        style: LockStyle,
        *,
        timeout: float = 40.0,
        stop: StopSignal | None = None,
    ) -> None:
        self.lock_path = lock_path
        self.style = style
        self.timeout = timeout
        self._stop = stop
        self._mutex = _mutex_for(lock_path)
        self._state = threading.Lock()
        #: (st_dev, st_ino, content) of the lock file we created, while we hold it.
        self._ours: tuple[int, int, bytes] | None = None
        self._holds_mutex = False
        self._aside_pattern = re.compile(re.escape(f".{lock_path.name}.") + r"[0-9a-f]{12}\.stale")

    # -- creating ----------------------------------------------------------------------------
    def _try_create(self) -> bool:
        """Create the lock file, content included, in one atomic step.

        OpenClaw and Qwen Code create the file, then write into it; killed in between, they
        leave an empty lock that blocks everyone until its mtime goes stale. We write the
        content to a temporary file and hard-link it into place, which is just as exclusive
        (``link`` fails if the name exists) and never leaves an empty lock behind. Where hard
        links are not supported, the ordinary exclusive create is used.
        """
        content = self.style.make_content()
        tmp = sibling_name(self.lock_path, "tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            return self._create_in_place(content)
        try:
            try:
                os.write(fd, content)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.lock_path, follow_symlinks=False)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                return self._create_in_place(content)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._ours = (st.st_dev, st.st_ino, content)
        return True

    def _create_in_place(self, content: bytes) -> bool:
        try:
            fd = os.open(
                self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
            )
        except FileExistsError:
            return False
        try:
            os.write(fd, content)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self._ours = (st.st_dev, st.st_ino, content)
        return True

    # -- judging and taking over ---------------------------------------------------------------
    def _is_stale(self, seen: _Seen) -> bool:
        return self.style.is_stale(seen.content or b"", seen.mtime, time.time())

    def _take_over(self, deadline: float) -> bool:
        """Replace a stale lock with ours; True when we now hold the lock.

        Under the directory flock no other contender of ours is between judging and removing,
        so the lock is judged afresh; then it is renamed aside (atomic: only one renamer gets
        any given file) and what was moved is compared with what was judged. Anything else (a
        writer that ignores the flock replaced it since) is put back with ``link``, which fails
        rather than overwrite a lock created meanwhile.
        """
        with _directory_flock(self.lock_path.parent, deadline) as locked:
            if not locked:
                return False
            self._remove_debris()
            judged = _look(self.lock_path, self.lock_path)
            if judged is None:
                return self._try_create()
            if not self._is_stale(judged):
                return False
            aside = sibling_name(self.lock_path, "stale")
            try:
                os.rename(self.lock_path, aside)
            except FileNotFoundError:
                return self._try_create()
            try:
                moved: _Seen | None = _look(aside, self.lock_path)
            except LockUnusable:
                moved = None
            if moved != judged:
                with contextlib.suppress(OSError):
                    os.link(aside, self.lock_path, follow_symlinks=False)
                with contextlib.suppress(OSError):
                    os.unlink(aside)
                return False
            with contextlib.suppress(OSError):
                os.unlink(aside)
            return self._try_create()

    def _remove_debris(self) -> None:
        """Stale locks moved aside by a taker killed before it could discard them. Called under
        the directory flock, so no taker is between its rename and its unlink."""
        with contextlib.suppress(OSError), os.scandir(self.lock_path.parent) as entries:
            for entry in entries:
                if self._aside_pattern.fullmatch(entry.name):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    # -- waiting -------------------------------------------------------------------------------
    def _pause(self, seconds: float) -> bool:
        """Sleep; True when told to stop."""
        if self._stop is not None:
            return self._stop.wait(seconds)
        time.sleep(seconds)
        return False

    def _take_mutex(self, start: float, deadline: float) -> None:
        while not self._mutex.acquire(timeout=max(0.0, min(0.1, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or (self._stop is not None and self._stop.is_set()):
                raise LockTimeout(self.lock_path, time.monotonic() - start)
        with self._state:
            self._holds_mutex = True

    def _drop_mutex(self) -> None:
        with self._state:
            if self._holds_mutex:
                self._holds_mutex = False
                self._mutex.release()

    def acquire(self) -> float:
        """Take the lock; returns how long we waited. Raises ``LockTimeout`` past the deadline
        (or when ``stop`` is set), ``LockUnusable`` at once when the lock path holds something
        that is not a regular file.

        Back-off starts at 50 ms and doubles to 1 s with jitter, a little faster than OpenClaw's
        own (it backs off to 10 s): we hold the lock for milliseconds, not seconds. Every round
        checks the deadline and sleeps; a lock that vanished as we looked is retried after a
        short sleep, not at once, so a lock that comes and goes cannot make us spin.
        """
        start = time.monotonic()
        deadline = start + self.timeout
        self._take_mutex(start, deadline)
        try:
            self._wait(start, deadline)
        except BaseException:
            self._drop_mutex()
            raise
        return time.monotonic() - start

    def _wait(self, start: float, deadline: float) -> None:
        delay = 0.05
        while True:
            try:
                if self._try_create():
                    return
            except FileNotFoundError:
                raise LockTimeout(self.lock_path, 0.0) from None
            seen = _look(self.lock_path, self.lock_path)
            if seen is not None and self._is_stale(seen) and self._take_over(deadline):
                return
            now = time.monotonic()
            if now >= deadline:
                raise LockTimeout(self.lock_path, now - start)
            base = 0.005 if seen is None else delay
            if self._pause(min(base, deadline - now) * (0.5 + random.random() / 2)):
                raise LockTimeout(self.lock_path, time.monotonic() - start)
            if seen is not None:
                delay = min(delay * 2, MAX_PAUSE)

    def release(self) -> None:
        """Unlink the lock, but only if it is still the file we created: same inode *and* same
        content, since a file system may give a replacement the inode number ours had. A lock
        someone replaced ours with is theirs. Safe to call twice and from another thread."""
        with self._state:
            ours, self._ours = self._ours, None
        try:
            if ours is not None:
                with contextlib.suppress(OSError, LockUnusable):
                    seen = _look(self.lock_path, self.lock_path)
                    if seen is not None and (seen.dev, seen.ino, seen.content) == ours:
                        os.unlink(self.lock_path)
        finally:
            self._drop_mutex()

    @contextlib.contextmanager
    def held(self) -> Iterator[float]:
        waited = self.acquire()
        try:
            yield waited
        finally:
            self.release()
