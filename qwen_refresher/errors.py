"""Every error qwen-refresher raises on purpose, in one tree.

Keeping them in one module lets the CLI turn any of them into an exit code without knowing where
it came from, and lets callers catch a whole branch (``except StoreError``) without importing the
modules that raise it. A failure *kind* is a class, never a message: each carries, as class
attributes (as click does with ``exit_code``),

- ``exit_code``: what the CLI exits with when the error ends a command;
- ``metric_label``: the ``reason`` label of ``qwen_refresher_refresh_failures_total``;
- ``result``: for kinds a refresh can end in, the engine ``Outcome.result`` it produces
  (``transient``, ``rejected``, ``unavailable``, ``lock_timeout``, ``write_failed``), else None.

The daemon reads these from ``Outcome.failure``; nothing decides anything from message text.
Messages never contain a token: callers pass descriptions, never values, and the OAuth errors
carry only what the server said after redaction.

Stdlib only, and cheap: ``status`` (run by health checks every few seconds) imports this module
through ``settings_core`` and ``published``, whose kinds (``SettingsError``, ``StateFileProblem``)
live here too. So no ``typing``, no ``dataclasses`` and no ``pathlib`` at import time: a
``path`` attribute is made a ``Path`` when an error is raised (``_as_path``), never before.

::

    class                        exit  metric_label     result        what
    QwenRefresherError             1   other            -             base of everything
    ├── ConfigError               78   config           -             a bad setting, named
    │   ├── SettingsError         78   config           -             ...found by settings_core
    │   ├── UnsafeStateDir        78   config           -             state dir not ours alone
    │   └── ConfigUnusable        78   config           -             openclaw.json unusable
    ├── StateFileProblem           1   state_file       -             our state.json/lock unusable
    ├── StoreError                 1   unavailable      unavailable   a store file we cannot use
    │   ├── StoreUnreadable        1   unavailable      unavailable   missing, refused, no access
    │   │   ├── FileMissing        1   unavailable      unavailable   it does not exist
    │   │   ├── FileRefused        1   unavailable      unavailable   fifo/symlink/too large...
    │   │   └── LockUnusable       1   unavailable      unavailable   not a file at a lock path
    │   ├── StoreMalformed         1   unavailable      unavailable   not JSON, wrong shape
    │   └── StoreWriteError        1   write_failed     write_failed  tokens not written (journaled)
    │       ├── OwnershipError     1   write_failed     write_failed  owner could not be kept
    │       └── LoginWriteError    1   write_failed     write_failed  a login missed some stores
    ├── LockTimeout               75   lock_timeout     lock_timeout  a live lock held too long
    ├── AlreadyRunning            75   already_running  -             another daemon, same state
    ├── LoginTargetMissing        64   usage            -             login where OpenClaw never ran
    ├── InternalError              1   internal         transient     a bug ended one refresh
    ├── OAuthError                 1   other            -             no tokens from the endpoint
    │   ├── TransientOAuthError    1   other            transient     retry later (a base)
    │   │   ├── RateLimited        1   http_429         transient     HTTP 429
    │   │   │   └── SlowDown       1   http_429         transient     device poll: slow_down
    │   │   ├── ServerError        1   http_5xx         transient     HTTP 5xx
    │   │   ├── UnexpectedStatus   1   http_4xx         transient     a 4xx that names no token
    │   │   ├── RequestTimeout     1   timeout          transient     no answer within deadline
    │   │   ├── NetworkError       1   network          transient     connect/reset/protocol
    │   │   ├── NotSent            1   cancelled        transient     stopping: never sent
    │   │   └── UnusableAnswer     1   bad_response     transient     a 200 we cannot use
    │   │       └── RotatedUnusableAccess               transient     ...with a live new token
    │   ├── RefreshTokenRejected   2   rejected         rejected      only a new login helps
    │   └── DeviceFlowError        2   login_failed     -             code expired/denied
    └── ServiceError               1   service          -             install-service failed

A subclass shares its parent's label and result on purpose (a ``SlowDown`` *is* a rate limit);
two unrelated kinds never share one (``tests/test_errors.py`` checks both).
"""

from __future__ import annotations

# The exit codes' one home is ``report`` (stdlib, shared with ``status``); re-exported here so
# that an exception's code and a status verdict cannot drift apart.
from .report import (
    EX_BROKEN_PIPE,
    EX_CONFIG,
    EX_FAILURE,
    EX_INTERRUPTED,
    EX_NEEDS_LOGIN,
    EX_NOT_RUNNING,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
)

TYPE_CHECKING = False  # not `from typing import ...`: status imports this module, and pays
if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from typing import ClassVar, Literal

    from .models import ProfileKey

    #: The engine results a failure kind can end a refresh in (``engine.Result`` has the rest).
    FailedResult = Literal["transient", "rejected", "unavailable", "lock_timeout",
                           "write_failed"]

__all__ = [
    "EX_BROKEN_PIPE", "EX_CONFIG", "EX_FAILURE", "EX_INTERRUPTED", "EX_NEEDS_LOGIN",
    "EX_NOT_RUNNING", "EX_OK", "EX_TEMPFAIL", "EX_USAGE", "OTHER",
    "AlreadyRunning", "ConfigError", "ConfigUnusable", "DeviceFlowError", "FileMissing",
    "FileRefused", "InternalError", "LockTimeout", "LockUnusable", "LoginTargetMissing",
    "LoginWriteError", "NetworkError", "NotSent", "OAuthError", "OwnershipError",
    "QwenRefresherError", "RateLimited", "RefreshTokenRejected", "RequestTimeout",
    "RotatedUnusableAccess", "ServerError", "ServiceError", "SettingsError", "SlowDown",
    "StateFileProblem", "StoreError", "StoreMalformed", "StoreUnreadable", "StoreWriteError",
    "TransientOAuthError",
    "UnexpectedStatus", "UnsafeStateDir", "UnusableAnswer", "kinds", "refresh_failure_labels",
    "refresh_results",
]

#: The label a failure nobody classified is counted under.
OTHER = "other"


def _as_path(path: Path | str) -> Path:
    """``Path(path)``, with pathlib imported only now: raising is rare, importing is not."""
    from pathlib import Path

    return Path(path)


class QwenRefresherError(Exception):
    """Base of everything we raise on purpose; see the table in the module docstring."""

    exit_code: ClassVar[int] = EX_FAILURE
    metric_label: ClassVar[str] = OTHER
    #: The engine result this kind ends a refresh in; None for kinds a refresh cannot end in.
    result: ClassVar[FailedResult | None] = None


class ConfigError(QwenRefresherError):
    """A setting is invalid. The message names the setting and the problem, in one line."""

    exit_code = EX_CONFIG
    metric_label = "config"

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"invalid setting {setting}: {problem}")


class SettingsError(ConfigError, ValueError):
    """A setting ``settings_core`` resolves (the stdlib resolution ``status``,
    ``install-service`` and the daemon share) is unusable: the message names it (and its
    variable) and the problem.

    Also a ValueError, as it was when it lived in ``settings_core``: raised inside a pydantic
    validator it still becomes a validation error. ``config.load_settings`` restates it as a
    plain ``ConfigError``; ``status`` exits 78 with it; ``install-service`` warns and goes on
    with what it could read.
    """


class UnsafeStateDir(ConfigError):
    """Our own state dir is not ours alone (another owner, wider than 0700, a symlink, or a file
    in it that is not a plain file): whoever can write there could plant symlinks that make us
    truncate or append to their victim's files, or read our journal of live tokens. Exit 78."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = _as_path(path)
        super().__init__("state_dir (QWEN_REFRESHER_STATE_DIR)", f"{path}: {problem}")


class ConfigUnusable(ConfigError, ValueError):
    """``openclaw.json`` cannot be used; the message names the problem (not the file).

    Also a ValueError, as it was when it lived in ``discovery``: callers that caught it that
    way keep working. ``str(exc)`` is the bare problem, which discovery's report prefixes with
    the file.
    """

    def __init__(self, problem: str) -> None:
        self.setting = "openclaw.json"
        self.problem = problem
        Exception.__init__(self, problem)


class StateFileProblem(QwenRefresherError):
    """A file in our state dir is not what the daemon writes there (a FIFO, a directory, a
    symlink, a huge or garbled file). Readers (``published``) name it and carry on without it;
    ``status`` shows it and exits 1. ``path`` is kept as given (text on status's path)."""

    metric_label = "state_file"

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def as_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "problem": self.problem}


class StoreError(QwenRefresherError):
    """A store file cannot be used. ``path`` is the file as the user knows it."""

    metric_label = "unavailable"
    result: ClassVar[FailedResult | None] = "unavailable"

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = _as_path(path)
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


class LockUnusable(StoreUnreadable):
    """Something that is not a regular file sits where a store's lock file belongs.

    No program we share files with makes its lock that way, so waiting cannot clear it and
    removing it could destroy something that is not ours; reading it could block (a FIFO) or
    never end. ``path`` is the lock path; the store is skipped until a person removes the thing.
    """


class StoreMalformed(StoreError):
    """The file was read but is not a store we understand; we never write over it."""


class StoreWriteError(StoreError):
    """Writing the store failed; the tokens we meant to write are kept in the journal."""

    metric_label = "write_failed"
    result: ClassVar[FailedResult | None] = "write_failed"


class OwnershipError(StoreWriteError):
    """A store's owner could not be kept on the replacement file: we refuse rather than change it.

    Replacing a file by rename creates a new inode owned by whoever writes it; only root can
    give it back to its previous owner, so an ordinary user meeting a root-owned store must not
    rotate it (the owner would silently change, and the owner's programs may lose access).
    """


class LoginWriteError(StoreWriteError):
    """Some target stores did not get the new login; ``written`` are the ones that did.

    The new refresh token exists only in memory at this point, so the caller needs to know
    where it landed: a store that has it keeps working (and the daemon copies it on to the
    rest of the family), a store that does not still holds the refused token.
    """

    def __init__(self, path: Path | str, problem: str, written: list[ProfileKey]) -> None:
        super().__init__(path, problem)
        self.written = written


class LockTimeout(QwenRefresherError):
    """A lock file stayed held by a live owner for longer than we are willing to wait."""

    exit_code = EX_TEMPFAIL
    metric_label = "lock_timeout"
    result: ClassVar[FailedResult | None] = "lock_timeout"

    def __init__(self, lock_path: Path, waited: float) -> None:
        self.lock_path = lock_path
        self.waited = waited
        super().__init__(f"{lock_path}: still held by another process after {waited:.1f}s")


class AlreadyRunning(QwenRefresherError):
    """Two daemons on one state dir would refresh the same tokens against each other."""

    exit_code = EX_TEMPFAIL
    metric_label = "already_running"


class LoginTargetMissing(QwenRefresherError):
    """``login`` was about to create a store where OpenClaw has never run: a new user's typo or
    a machine without OpenClaw. Exit 64 (usage): name the store with ``--store``."""

    exit_code = EX_USAGE
    metric_label = "usage"


class InternalError(QwenRefresherError):
    """A bug (an exception none of the kinds above describes) ended one refresh.

    The daemon keeps running: the family is retried with back-off like a transient failure,
    and the traceback is logged once. Never raised by our code on purpose; it is the kind the
    daemon records for such a crash, so that it is counted under its own label.
    """

    metric_label = "internal"
    result: ClassVar[FailedResult | None] = "transient"


class OAuthError(QwenRefresherError):
    """The token endpoint did not hand us usable tokens."""


class TransientOAuthError(OAuthError):
    """Worth trying again later; ``retry_after`` is the server's ``Retry-After`` in seconds.

    Raised as one of its subclasses, which say *why*; the base itself is what a caller
    catches, and what is left for a kind that none of them names (label "other").
    """

    result: ClassVar[FailedResult | None] = "transient"

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)

    def restated(self, reason: str) -> TransientOAuthError:
        """The same failure (same kind, same ``retry_after``) told with more context: a caller
        that adds what it was doing keeps the type, which is what decides."""
        clone = type(self).__new__(type(self), reason)
        clone.__dict__.update(self.__dict__)
        clone.reason = reason
        return clone


class RateLimited(TransientOAuthError):
    """HTTP 429: the server wants fewer requests; ``retry_after`` says when, if it said."""

    metric_label = "http_429"


class SlowDown(RateLimited):
    """``poll_device_token`` raises this for ``slow_down``: poll 1.5x less often.

    A rate limit, so a caller who only knows "retry later" still behaves;
    ``QwenOAuthClient.wait_for_device_token`` handles it for you.
    """

    def __init__(self) -> None:
        super().__init__("token endpoint asked us to poll more slowly (slow_down)")


class ServerError(TransientOAuthError):
    """HTTP 5xx: the server's trouble, not the token's."""

    metric_label = "http_5xx"


class UnexpectedStatus(TransientOAuthError):
    """A 4xx that does not name the refresh token (a WAF's 403, a moved endpoint's 404):
    it says nothing about the token, so the credentials are kept and retried later."""

    metric_label = "http_4xx"


class RequestTimeout(TransientOAuthError):
    """No (whole) answer within the request's deadline, or a connect that timed out."""

    metric_label = "timeout"


class NetworkError(TransientOAuthError):
    """The connection could not be made, or broke without a valid answer."""

    metric_label = "network"


class NotSent(TransientOAuthError):
    """The daemon is stopping and the request was never sent: nothing was spent."""

    metric_label = "cancelled"


class UnusableAnswer(TransientOAuthError):
    """The server answered 200 but the answer cannot be used: not JSON, a token that fails
    the store rules (too long, spaces, control characters, missing), or a body that was too
    big or too slow. Nothing from it is written anywhere. The server may have rotated (then
    our token is spent and the retry's rejection ends in needs_login), or not (then the retry
    works): only the retry, after a back-off and a fresh read of the stores, can tell.
    """

    metric_label = "bad_response"


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
    metric_label = "rejected"
    result: ClassVar[FailedResult | None] = "rejected"

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason)


class DeviceFlowError(OAuthError):
    """The device-code login ended without tokens (expired, denied, refused)."""

    exit_code = EX_NEEDS_LOGIN
    metric_label = "login_failed"


class ServiceError(QwenRefresherError):
    """Installing or removing the systemd unit failed."""

    metric_label = "service"


# --------------------------------------------------------------------------- the tree as data


def kinds(root: type[QwenRefresherError] = QwenRefresherError,
          ) -> Iterator[type[QwenRefresherError]]:
    """Every kind under ``root`` (itself included), parents before children."""
    yield root
    for sub in root.__subclasses__():
        yield from kinds(sub)


def refresh_failure_labels() -> tuple[str, ...]:
    """The ``reason`` labels a refresh can fail with: those of the kinds with a ``result``,
    plus ``other``. The metrics pre-create exactly these, so no series exists that nothing
    can produce."""
    labels = {k.metric_label for k in kinds() if k.result is not None} - {OTHER}
    return (*sorted(labels), OTHER)


def refresh_results() -> tuple[str, ...]:
    """The failed results a kind can produce (``transient``, ``rejected``, ...), sorted."""
    return tuple(sorted({k.result for k in kinds() if k.result is not None}))
