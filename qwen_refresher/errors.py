"""Every error qwen-refresher raises on purpose, in one tree.

Keeping them in one module lets the CLI turn any of them into an exit code without knowing where
it came from (the exit code travels with the exception, as in click), and lets callers catch a
whole branch (``except StoreError``) without importing the modules that raise it.

Messages never contain a token: callers pass descriptions, never values, and the OAuth errors
carry only what the server said after redaction.

::

    QwenRefresherError                 exit 1
    ├── ConfigError                    exit 78 (EX_CONFIG): a bad setting, named
    ├── StoreError                     a store file we cannot use; names the file
    │   ├── StoreUnreadable            missing, no permission, not a regular file, symlink escape
    │   ├── StoreMalformed             not JSON, wrong shape, wrong field types
    │   └── StoreWriteError            the rotated tokens could not be written (they are journaled)
    ├── LockTimeout                    someone else's live lock held past our patience
    ├── AlreadyRunning                 exit 75: another daemon owns this state dir
    ├── OAuthError                     the Qwen token endpoint did not give us tokens
    │   ├── TransientOAuthError        worth retrying: network, timeout, 5xx, 429, broken 200
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


class StoreMalformed(StoreError):
    """The file was read but is not a store we understand; we never write over it."""


class StoreWriteError(StoreError):
    """Writing the store failed; the tokens we meant to write are kept in the journal."""


class LockTimeout(QwenRefresherError):
    """A lock file stayed held by a live owner for longer than we are willing to wait."""

    exit_code = EX_TEMPFAIL

    def __init__(self, lock_path: Path, waited: float) -> None:
        self.lock_path = lock_path
        self.waited = waited
        super().__init__(f"{lock_path}: still held by another process after {waited:.1f}s")


class AlreadyRunning(QwenRefresherError):
    """Two daemons on one state dir would refresh the same tokens against each other."""

    exit_code = EX_TEMPFAIL


class OAuthError(QwenRefresherError):
    """The token endpoint did not hand us usable tokens."""


class TransientOAuthError(OAuthError):
    """Worth trying again later; ``retry_after`` is the server's ``Retry-After`` in seconds."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


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
