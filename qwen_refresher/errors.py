"""Every error qwen-refresher raises on purpose, in one tree.

Keeping them in one module lets the CLI turn any of them into an exit code without knowing where
it came from (the exit code travels with the exception, as in click), and lets callers catch a
whole branch (``except StoreError``) without importing the modules that raise it.

Messages never contain a token: callers pass descriptions, never values, and the OAuth errors
carry only what the server said after redaction.

::

    QwenRefresherError                 exit 1
    ├── ConfigError                    exit 78 (EX_CONFIG): a bad setting, named
    │   └── UnsafeStateDir             our state dir is not ours alone, or holds a non-file
    ├── StoreError                     a store file we cannot use; names the file
    │   ├── StoreUnreadable            missing, no permission, not a regular file, symlink escape
    │   │   ├── FileMissing            it does not exist
    │   │   └── FileRefused            fifo/socket/device/dir/symlink, too large, unsafe parent
    │   ├── StoreMalformed             not JSON, wrong shape, wrong field types
    │   ├── StoreWriteError            the rotated tokens could not be written (they are journaled)
    │   │   └── OwnershipError         its owner could not be kept: refused, never changed
    │   └── LockUnusable               (a StoreUnreadable) a FIFO, symlink... at a lock path
    ├── LockTimeout                    someone else's live lock held past our patience
    ├── AlreadyRunning                 exit 75: another daemon owns this state dir
    ├── OAuthError                     the Qwen token endpoint did not give us tokens
    │   ├── TransientOAuthError        worth retrying: network, timeout, 5xx, 429
    │   │   └── UnusableAnswer         a 200 we cannot use: nothing is written, retried later
    │   ├── RefreshTokenRejected       exit 2: only a new login helps
    │   └── DeviceFlowError            exit 2: device code expired, denied or refused
    └── ServiceError                   install-service / uninstall-service could not do its job
"""

from __future__ import annotations

from pathlib import Path

EX_OK = 0
EX_FAILURE = 1
EX_NEEDS_LOGIN = 2
EX_NOT_RUNNING = 3
EX_USAGE = 64
EX_TEMPFAIL = 75
EX_CONFIG = 78


class QwenRefresherError(Exception):
    """Base of everything we raise on purpose; ``exit_code`` is what the CLI exits with."""

    exit_code: int = EX_FAILURE


class ConfigError(QwenRefresherError):
    """A setting is invalid. The message names the setting and the problem, in one line."""

    exit_code = EX_CONFIG

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"invalid setting {setting}: {problem}")


class StoreError(QwenRefresherError):
    """A store file cannot be used. ``path`` is the file as the user knows it."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class StoreUnreadable(StoreError):
    """The file is missing, unreadable, not a regular file, or a symlink leaving its directory."""


class FileMissing(StoreUnreadable):
    """The file does not exist (``problem`` is "does not exist", as callers long checked)."""


class FileRefused(StoreUnreadable):
    """A file we were about to read or write is not a plain file we may trust.

    A FIFO, socket, device, directory or symlink where a regular file belongs, a file past its
    size cap, a directory on the way that is a symlink or belongs to another user. Opening
    any of those could hang us, exhaust memory, or make us act on someone else's file.
    ``file_type`` names what was found ("fifo", "symlink", "directory", ...) when that is the
    problem.
    """

    def __init__(self, path: Path | str, problem: str, *, file_type: str | None = None) -> None:
        super().__init__(path, problem)
        self.file_type = file_type


class StoreMalformed(StoreError):
    """The file was read but is not a store we understand; we never write over it."""


class StoreWriteError(StoreError):
    """Writing the store failed; the tokens we meant to write are kept in the journal."""


class OwnershipError(StoreWriteError):
    """A store's owner could not be kept on the replacement file: we refuse rather than change it.

    Replacing a file by rename creates a new inode owned by whoever writes it; only root can
    give it back to its previous owner, so an ordinary user meeting a root-owned store must not
    rotate it (the owner would silently change, and the owner's programs may lose access).
    """


class UnsafeStateDir(ConfigError):
    """Our own state dir is not ours alone (another owner, wider than 0700, a symlink, or a file
    in it that is not a plain file): whoever can write there could plant symlinks that make us
    truncate or append to their victim's files, or read our journal of live tokens. Exit 78."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        super().__init__("state_dir (QWEN_REFRESHER_STATE_DIR)", f"{path}: {problem}")


class LockTimeout(QwenRefresherError):
    """A lock file stayed held by a live owner for longer than we are willing to wait."""

    exit_code = EX_TEMPFAIL

    def __init__(self, lock_path: Path, waited: float) -> None:
        self.lock_path = lock_path
        self.waited = waited
        super().__init__(f"{lock_path}: still held by another process after {waited:.1f}s")


class LockUnusable(StoreUnreadable):
    """Something that is not a regular file sits where a store's lock file belongs.

    No program we share files with makes its lock that way, so waiting cannot clear it and
    removing it could destroy something that is not ours; reading it could block (a FIFO) or
    never end. ``path`` is the lock path; the store is skipped until a person removes the thing.
    """


class AlreadyRunning(QwenRefresherError):
    """Two daemons on one state dir would refresh the same tokens against each other."""

    exit_code = EX_TEMPFAIL


class LoginTargetMissing(QwenRefresherError):
    """``login`` was about to create a store where OpenClaw has never run: a new user's typo or
    a machine without OpenClaw. Exit 64 (usage): name the store with ``--store``."""

    exit_code = EX_USAGE


class OAuthError(QwenRefresherError):
    """The token endpoint did not hand us usable tokens."""


class TransientOAuthError(OAuthError):
    """Worth trying again later; ``retry_after`` is the server's ``Retry-After`` in seconds."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


class UnusableAnswer(TransientOAuthError):
    """The server answered 200 but the answer cannot be used: not JSON, a token that fails
    the store rules (too long, spaces, control characters, missing), or a body that was too
    big or too slow. Nothing from it is written anywhere. The server may have rotated (then
    our token is spent and the retry's rejection ends in needs_login), or not (then the retry
    works): only the retry, after a back-off and a fresh read of the stores, can tell.
    """


class RotatedUnusableAccess(UnusableAnswer):
    """A 200 with a refresh token that passes the store rules and an access token that does
    not: the server HAS rotated, and ``refresh_token`` is now the lineage's only live token.
    It must be kept (journaled) and spent at once for a usable access token; discarding it
    would leave only the consumed token, and a lost login. The token is never in the message.
    """

    def __init__(self, reason: str, *, refresh_token: str) -> None:
        super().__init__(reason)
        self.refresh_token = refresh_token

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r})"


class RefreshTokenRejected(OAuthError):
    """The server refused the refresh token itself: retrying the same token cannot succeed."""

    exit_code = EX_NEEDS_LOGIN

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason)


class DeviceFlowError(OAuthError):
    """The device-code login ended without tokens (expired, denied, refused)."""

    exit_code = EX_NEEDS_LOGIN


class ServiceError(QwenRefresherError):
    """Installing or removing the systemd unit failed."""
