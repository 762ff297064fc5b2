"""The lock-file protocols of the programs we share files with, spoken exactly as they speak them.

Both OpenClaw (``src/plugin-sdk/file-lock.ts``) and Qwen Code (``sharedTokenManager.ts``) lock a
file by exclusively creating a sibling lock file and release it by unlinking; they differ in what
the file holds and when a lock counts as abandoned. Taking *their* lock, not an flock of our own,
is what makes OpenClaw re-read our fresh token instead of refreshing over us.

Stdlib only. Waiting is bounded: past ``timeout`` we raise ``LockTimeout`` and the caller retries
later, holding nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .errors import LockTimeout

#: OpenClaw's stale threshold for its lock files.
OPENCLAW_STALE_SECONDS = 30.0
#: Qwen Code's stale threshold for ``oauth_creds.lock``.
QWEN_CODE_STALE_SECONDS = 10.0


def pid_alive(pid: int) -> bool:
    """``kill(pid, 0)``, read as OpenClaw reads it: only "no such process" means dead."""
    if pid <= 0:
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
    except ValueError:
        return None


def _openclaw_stale(content: bytes, mtime: float, now: float) -> bool:
    """OpenClaw's ``isStaleLock``: a dead pid, an unparsable or old ``createdAt``, or an old
    mtime. A payload without a numeric pid and a string createdAt counts for nothing."""
    try:
        payload = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        payload = None
    if isinstance(payload, dict):
        pid, created = payload.get("pid"), payload.get("createdAt")
        if isinstance(pid, int | float) and not isinstance(pid, bool) and isinstance(created, str):
            if pid and not pid_alive(int(pid)):
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


class FileLock:
    """One lock file of a given style. Not re-entrant; one holder per instance at a time."""

    def __init__(
        self,
        lock_path: Path,
        style: LockStyle,
        *,
        timeout: float = 40.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.lock_path = lock_path
        self.style = style
        self.timeout = timeout
        self._stop = stop
        self._content: bytes | None = None

    def _try_create(self) -> bool:
        """Create the lock file, content included, in one atomic step.

        OpenClaw and Qwen Code create the file, then write into it; killed in between, they
        leave an empty lock that blocks everyone until its mtime goes stale. We write the
        content to a temporary file and hard-link it into place, which is just as exclusive
        (``link`` fails if the name exists) and never leaves an empty lock behind. Where hard
        links are not supported, the ordinary exclusive create is used.
        """
        content = self.style.make_content()
        tmp = self.lock_path.with_name(f".{self.lock_path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            return self._create_in_place(content)
        try:
            try:
                os.write(fd, content)
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
                tmp.unlink()
        self._content = content
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
        finally:
            os.close(fd)
        self._content = content
        return True

    def _remove_if_stale(self) -> bool:
        """Remove an abandoned lock. Re-checks the content just before unlinking so that a lock
        taken over by a third process in between is not removed by mistake."""
        try:
            st = os.stat(self.lock_path, follow_symlinks=False)
            content = self.lock_path.read_bytes()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if not self.style.is_stale(content, st.st_mtime, time.time()):
            return False
        try:
            if self.lock_path.read_bytes() != content:
                return False
            self.lock_path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True

    def acquire(self) -> float:
        """Take the lock; returns how long we waited. Raises ``LockTimeout``.

        Back-off starts at 50 ms and doubles to 1 s with jitter, a little faster than OpenClaw's
        own (it backs off to 10 s): we hold the lock for milliseconds, not seconds.
        """
        start = time.monotonic()
        delay = 0.05
        while True:
            try:
                if self._try_create():
                    return time.monotonic() - start
            except FileNotFoundError:
                raise LockTimeout(self.lock_path, 0.0) from None
            if self._remove_if_stale():
                continue
            waited = time.monotonic() - start
            if waited >= self.timeout:
                raise LockTimeout(self.lock_path, waited)
            pause = min(delay, self.timeout - waited) * (0.5 + random.random() / 2)
            if self._stop is not None:
                if self._stop.wait(pause):
                    raise LockTimeout(self.lock_path, time.monotonic() - start)
            else:
                time.sleep(pause)
            delay = min(delay * 2, 1.0)

    def release(self) -> None:
        """Unlink the lock, but only if it is still the one we wrote."""
        content, self._content = self._content, None
        if content is None:
            return
        with contextlib.suppress(OSError):
            if self.lock_path.read_bytes() == content:
                self.lock_path.unlink()

    @contextlib.contextmanager
    def held(self) -> Iterator[float]:
        waited = self.acquire()
        try:
            yield waited
        finally:
            self.release()
