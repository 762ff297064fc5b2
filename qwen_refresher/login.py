"""A new Qwen login, by hand (``qwen-refresher login``) or assisted by the daemon.

Once Qwen has refused a refresh token, nothing but a new device-code login helps. OpenClaw's
own ``openclaw models auth login`` needs an interactive terminal on the gateway's machine and
writes the store without taking its lock; this module makes the same login short and safe:

* ``qwen-refresher login`` prints the verification URL, the user code and a QR code, polls until
  the person approves on any device, and writes the new tokens into the store under OpenClaw's
  (or Qwen Code's) own lock, atomically, mode 0600, creating the file and its 0700 directories
  when missing, touching no other profile. Every profile that held the same (dead) refresh
  token in any managed store gets the new tokens too, so a whole family recovers at once.
* ``AssistedLogin`` lets the daemon do the same without any terminal: it starts the flow when a
  profile needs a login, hands the URL to the notifier (the person taps "approve" on their
  phone), polls in the background and writes the tokens itself.

No token is ever printed, logged, put in a hook's environment or in an exception message.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from . import discovery, paths
from .config import Settings, load_settings
from .errors import (
    DeviceFlowError,
    LockTimeout,
    LoginTargetMissing,
    QwenRefresherError,
    StoreError,
    StoreWriteError,
    TransientOAuthError,
)
from .escape import printable, shell_join
from .fileio import ensure_private_dir
from .hooks import HookResult, resolve_on_rotate, run_hook
from .logsetup import REDACTOR
from .models import QWEN_PROVIDER, Credentials, ProfileKey, fingerprint
from .qwen import DeviceAuthorization, QwenOAuthClient, TokenGrant
from .stores import OpenClawStore, QwenCodeStore, Store
from .stores.qwen_code import PROFILE_ID as QWEN_CODE_PROFILE

DEFAULT_PROFILE = f"{QWEN_PROVIDER}:default"
EX_INTERRUPTED = 130

__all__ = [
    "DEFAULT_PROFILE",
    "AssistedLogin",
    "LoginWriteError",
    "add_parser",
    "linked_targets",
    "run",
    "write_login",
]


# --------------------------------------------------------------------------- writing


class LoginWriteError(StoreWriteError):
    """Some target stores did not get the new login; ``written`` are the ones that did.

    The new refresh token exists only in memory at this point, so the caller needs to know
    where it landed: a store that has it keeps working (and the daemon copies it on to the
    rest of the family), a store that does not still holds the refused token.
    """

    def __init__(self, path: Path | str, problem: str, written: list[ProfileKey]) -> None:
        super().__init__(path, problem)
        self.written = written


def _lock_order(store: Store) -> str:
    """Every writer of ours sorts locks the same way (the engine does too): no deadlock."""
    try:
        return str(store.lock_path())
    except StoreError:
        return str(store.path)


def check_profile_slot(store: Store, document: dict[str, Any], profile: str) -> None:
    """Refuse to turn someone else's profile into a qwen-portal one.

    OpenClaw's ``render`` updates an existing entry in place; pointed at, say, an
    ``anthropic:default`` API-key profile it would graft our tokens onto it. A login may
    create ``qwen-portal:<name>`` or replace a qwen-portal OAuth profile, nothing else.
    """
    if not isinstance(store, OpenClawStore):
        if profile != QWEN_CODE_PROFILE:
            raise StoreWriteError(store.path, f"Qwen Code's file holds one profile, "
                                              f"{QWEN_CODE_PROFILE!r}, not {profile!r}")
        return
    profiles = document.get("profiles")
    entry = profiles.get(profile) if isinstance(profiles, dict) else None
    if isinstance(entry, dict):
        if entry.get("type") == "oauth" and entry.get("provider") == QWEN_PROVIDER:
            return
        kind = f"{entry.get('type')!s}/{entry.get('provider')!s}"
        raise StoreWriteError(store.path, f"profile {profile!r} is a {kind} profile, not a "
                                          f"{QWEN_PROVIDER} OAuth one; refusing to overwrite it")
    if not profile.startswith(QWEN_PROVIDER + ":"):
        raise StoreWriteError(store.path, f"profile {profile!r} does not exist and a new one "
                                          f"must be named {QWEN_PROVIDER}:<name>")


def write_login(
    targets: Sequence[tuple[Store, str]],
    creds: Credentials,
    *,
    lock_timeout: float,
) -> list[ProfileKey]:
    """Write ``creds`` into every (store, profile) of ``targets``; returns what was written.

    Each store is locked with its own program's lock, re-read under it (a missing file is
    created as ``{"version": 1, "profiles": {...}}`` in a 0700 directory), written atomically
    and unlocked, one store at a time, in sorted lock-path order.

    Failure policy, chosen on purpose: a store that cannot be locked, read or written does not
    stop the others. The new refresh token exists only in our memory, so it should land in as
    many places as possible; each store gets the same tokens, so there is no cross-store
    consistency to protect by writing all or nothing. After trying every store, the first
    failure is raised as ``LoginWriteError`` (a ``StoreError``) whose ``written`` lists what did
    land. Locks are taken one at a time, so no lock is held while waiting for another.
    """
    by_store: dict[Path, tuple[Store, list[str]]] = {}
    for store, profile in targets:
        entry = by_store.setdefault(store.path, (store, []))
        if profile not in entry[1]:
            entry[1].append(profile)
    written: list[ProfileKey] = []
    first_error: StoreError | None = None
    for store, profiles in sorted(by_store.values(), key=lambda item: _lock_order(item[0])):
        try:
            _write_one(store, profiles, creds, lock_timeout)
        except StoreError as exc:
            first_error = first_error or exc
            continue
        written.extend(ProfileKey(store.path, p) for p in profiles)
    if first_error is not None:
        done = ", ".join(str(k) for k in written) or "nowhere"
        raise LoginWriteError(first_error.path, f"{first_error.problem} (the new login was "
                                                f"written to: {done})", written)
    return written


def _write_one(store: Store, profiles: list[str], creds: Credentials, lock_timeout: float) -> None:
    # The lock file lives in the store's directory, which a first login may have to create.
    ensure_private_dir(store.path.parent)
    try:
        lock = store.lock(timeout=lock_timeout)
        with lock.held():
            snapshot = store.read(allow_missing=True)
            for profile in profiles:
                check_profile_slot(store, snapshot.document, profile)
            store.write(snapshot, {p: creds for p in profiles})
    except LockTimeout as exc:
        raise StoreWriteError(store.path, f"could not take the lock {exc.lock_path} "
                                          f"(held by another process for {exc.waited:.0f}s)"
                              ) from None
    except OSError as exc:
        raise StoreWriteError(store.path, f"cannot lock: {exc.strerror}") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a.absolute() == b.absolute()


def linked_targets(store: Store, profile: str, settings: Settings) -> list[tuple[Store, str]]:
    """The target and every managed profile that holds the same refresh token right now.

    Those profiles share one token family: its refresh token was refused for all of them at
    once, and a login for one is a login for all. They are found by fingerprint with a
    throwaway salt, so the comparison needs neither the daemon's state dir nor a token kept
    longer than this call. A target whose file or profile does not exist (a first login), or
    whose profile holds no usable token, links to nothing. A target file that exists but
    cannot be used raises its ``StoreError`` here, before anyone approves a login that could
    not be written.
    """
    targets: list[tuple[Store, str]] = [(store, profile)]
    snapshot = store.read(allow_missing=True)
    check_profile_slot(store, snapshot.document, profile)
    record = snapshot.records.get(profile)
    if record is None or record.creds is None:
        return targets
    salt = secrets.token_bytes(32)
    wanted = fingerprint(record.creds.refresh, salt)
    seen: set[tuple[Path, str]] = {(store.path, profile)}
    candidates: list[Store] = [store]
    for path, kind in discovery.store_paths(explicit=settings.stores, discover=settings.discover,
                                            qwen_code=settings.qwen_code):
        if not _same_file(path, store.path):
            candidates.append(discovery.open_store(path, kind))
    for candidate in candidates:
        try:
            snap = snapshot if candidate is store else candidate.read_settled()
        except StoreError:
            continue  # an unusable other store is the daemon's business, not this login's
        for other_profile, other in snap.records.items():
            key = (candidate.path, other_profile)
            if key in seen or other.creds is None:
                continue
            if fingerprint(other.creds.refresh, salt) == wanted:
                seen.add(key)
                targets.append((candidate, other_profile))
    return targets


def credentials_from(grant: TokenGrant, now_ms: int) -> Credentials:
    """Stored credentials from a login grant; a login without a refresh token is useless."""
    if not grant.refresh_token:
        raise DeviceFlowError("the server approved the login but sent no refresh token; "
                              "nothing was written")
    creds = grant.to_credentials(now_ms, "")
    REDACTOR.add(creds.access, creds.refresh)
    return creds


def run_on_rotate(settings: Settings, written: list[ProfileKey],
                  creds: Credentials) -> HookResult | None:
    """Tell the gateway (``openclaw secrets reload`` by default): it serves tokens from memory,
    so a login it is not told about would not be used until its next restart.

    Same variables as the daemon's rotation hook, with ``EVENT=login``. None: no hook to run.
    """
    command = resolve_on_rotate(settings.on_rotate)
    if command is None or not written:
        return None
    first = next((k for k in written if k.store.name != paths.QWEN_CREDS_NAME), written[0])
    variables = {
        "EVENT": "login",
        "PROFILE": first.profile,
        "STORE": str(first.store),
        "EXPIRES_AT": datetime.fromtimestamp(creds.expires_at, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"),
        "EXPIRES_MS": str(creds.expires_ms),
        "PROFILES": "\n".join(str(k) for k in written),
    }
    return run_hook(command, variables, timeout=settings.hook_timeout,
                    secrets=(creds.access, creds.refresh), runner=settings.hook_runner_argv)


# --------------------------------------------------------------------------- assisted login


@dataclass
class _Flow:
    thread: threading.Thread
    stop: threading.Event


class AssistedLogin:
    """Device-code logins the daemon starts by itself, one per token family at a time.

    The person gets ``verification_uri_complete`` in their notification, approves on their
    phone, and the background thread writes the tokens: no terminal at all. A code that
    expires unapproved is not replaced at once (that would be a loop asking Qwen for codes
    nobody looks at): ``start`` refuses a family whose last flow began less than
    ``remind_interval`` ago, so the next code comes with the next reminder.
    """

    #: ``start`` tolerates this much of ``remind_interval`` (at most a minute): the notifier's
    #: reminder, due exactly ``remind_interval`` after the notice that started the last flow,
    #: must get a fresh code even though its clock was read a moment before ours.
    SLACK_FRACTION = 0.1
    SLACK_MAX = 60.0

    def __init__(
        self,
        settings: Settings,
        *,
        log: Any,
        on_written: Callable[[list[ProfileKey]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.log = log
        self.on_written = on_written
        self.clock = clock
        self._lock = threading.Lock()
        self._flows: dict[str, _Flow] = {}
        self._last_start: dict[str, float] = {}
        self._closed = False

    def running(self, family_id: str) -> bool:
        with self._lock:
            return family_id in self._flows

    def start(
        self,
        targets: Sequence[tuple[Store, str]],
        family_id: str,
        on_code: Callable[[DeviceAuthorization], None],
        *,
        on_end: Callable[[BaseException | None], None] | None = None,
    ) -> bool:
        """Start a login for ``family_id`` in the background; False if not started.

        Not started: one is already running for the family, one was started less than
        ``remind_interval`` ago, or we are closing. ``on_code`` is called (from the background
        thread) once the server has issued a code; ``on_end`` once the flow is over, with None
        after the tokens were written, else the reason (expired, denied, cancelled, network).
        Returns at once: the network is only touched in the thread.
        """
        if not targets:
            return False
        slack = min(self.SLACK_MAX, self.settings.remind_interval * self.SLACK_FRACTION)
        with self._lock:
            if self._closed or family_id in self._flows:
                return False
            now = self.clock()
            last = self._last_start.get(family_id)
            if last is not None and now - last < self.settings.remind_interval - slack:
                return False
            self._last_start[family_id] = now
            stop = threading.Event()
            thread = threading.Thread(
                target=self._run, args=(list(targets), family_id, on_code, on_end, stop),
                name=f"assisted-login:{family_id[:12]}", daemon=True)
            self._flows[family_id] = _Flow(thread, stop)
        thread.start()
        return True

    def cancel(self, family_id: str) -> None:
        """Stop polling for ``family_id`` (its profiles recovered some other way)."""
        with self._lock:
            flow = self._flows.get(family_id)
        if flow is not None:
            flow.stop.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop every flow and wait (bounded) for the threads; tokens already received are
        still written, since the stop only interrupts the polling."""
        with self._lock:
            self._closed = True
            flows = list(self._flows.values())
        for flow in flows:
            flow.stop.set()
        deadline = time.monotonic() + timeout
        for flow in flows:
            flow.thread.join(max(0.0, deadline - time.monotonic()))

    def _run(
        self,
        targets: list[tuple[Store, str]],
        family_id: str,
        on_code: Callable[[DeviceAuthorization], None],
        on_end: Callable[[BaseException | None], None] | None,
        stop: threading.Event,
    ) -> None:
        s = self.settings
        names = [f"{store.describe()}#{profile}" for store, profile in targets]
        log = self.log.bind(family=family_id[:12], profiles=names)
        error: BaseException | None = None
        client = QwenOAuthClient(s.token_url, s.device_code_url, s.client_id,
                                 timeout=s.http_timeout)
        try:
            auth = client.start_device_flow()
            log.info("assisted_login_started", user_code=auth.user_code,
                     verification_url=auth.verification_uri_complete or auth.verification_uri,
                     expires_in_s=round(auth.expires_in))
            try:
                on_code(auth)
            except Exception as exc:  # the notifier's problem must not lose the login
                log.warning("assisted_login_callback_failed", error=str(exc))
            grant = client.wait_for_device_token(auth, stop=stop)
            creds = credentials_from(grant, int(time.time() * 1000))
            try:
                written = write_login(targets, creds, lock_timeout=s.lock_timeout)
            except LoginWriteError as exc:
                error, written = exc, exc.written
            if error is not None:
                log.error("assisted_login_write_failed", error=str(error),
                          written=[str(k) for k in written])
            else:
                log.info("assisted_login_written", written=[str(k) for k in written])
            if written:
                result = run_on_rotate(s, written, creds)
                if result is not None and result.ok:
                    log.info("on_rotate_ok", command=result.command, trigger="login")
                elif result is not None:
                    log.warning("on_rotate_failed", command=result.command,
                                returncode=result.returncode, timed_out=result.timed_out,
                                output=result.output)
                if self.on_written is not None:
                    try:
                        self.on_written(written)
                    except Exception as exc:
                        log.warning("assisted_login_callback_failed", error=str(exc))
        except DeviceFlowError as exc:
            error = exc
            log.warning("assisted_login_ended", reason=str(exc),
                        message="no login; a new code comes with the next reminder")
        except QwenRefresherError as exc:
            error = exc
            log.warning("assisted_login_failed", error=str(exc),
                        message="a new code comes with the next reminder")
        except Exception as exc:  # a bug here must not kill the daemon's thread silently
            error = exc
            log.exception("assisted_login_crashed", error=f"{type(exc).__name__}: {exc}")
        finally:
            client.close()
            with self._lock:
                self._flows.pop(family_id, None)
            if on_end is not None:
                try:
                    on_end(error)
                except Exception as exc:
                    log.warning("assisted_login_callback_failed", error=str(exc))


# --------------------------------------------------------------------------- command line


def add_parser(subparsers: Any) -> None:
    """Register ``login`` on the CLI's subparsers (``argparse._SubParsersAction``)."""
    parser = subparsers.add_parser(
        "login",
        help="log a qwen-portal profile in again (device code, no TTY needed)",
        description="Run Qwen's device-code login: open the printed URL (or scan the QR code) "
                    "on any device and approve. The tokens are written into the store under "
                    "its lock, and into every profile that held the same refresh token. "
                    "Exit code: 0 logged in, 2 the code expired or the login was denied, "
                    "130 cancelled.",
    )
    parser.add_argument("--store", default=None, metavar="PATH",
                        help="the store to log in (default: the main agent's "
                             "auth-profiles.json; a file named oauth_creds.json is Qwen Code's)")
    parser.add_argument("--profile", default=None, metavar="ID",
                        help=f"profile id (default: {DEFAULT_PROFILE}; "
                             f"{QWEN_CODE_PROFILE} for Qwen Code's file)")
    parser.add_argument("--no-qr", action="store_true",
                        help="do not draw a QR code (it is drawn only on a terminal anyway)")
    parser.add_argument("--config", default=None, type=Path, metavar="FILE",
                        help="TOML config file")
    parser.add_argument("--token-url", default=None, metavar="URL", help="token endpoint")
    parser.add_argument("--device-code-url", default=None, metavar="URL",
                        help="device authorization endpoint")
    parser.add_argument("--state-dir", default=None, type=Path, metavar="DIR",
                        help="the daemon's state dir")
    parser.set_defaults(handler=run)


def resolve_target(store_arg: str | None, profile_arg: str | None) -> tuple[Store, str]:
    """The store and profile a ``login`` writes: defaults follow OpenClaw's main agent."""
    path = (Path(store_arg).expanduser() if store_arg
            else paths.main_agent_dir() / paths.AUTH_STORE_NAME).absolute()
    store: Store
    if path.name == paths.QWEN_CREDS_NAME:
        store = QwenCodeStore(path)
        profile = profile_arg or QWEN_CODE_PROFILE
    else:
        store = OpenClawStore(path)
        profile = profile_arg or DEFAULT_PROFILE
    return store, profile


def _confirm_new_openclaw_store(store: Store, err: TextIO) -> None:
    """No ``--store``, and the default store does not exist because OpenClaw has never run for
    this user: creating ``~/.openclaw/agents/main/agent/auth-profiles.json`` silently would
    leave a login nobody uses. Say so; on a terminal ask, elsewhere require ``--store``."""
    if store.path.exists() or Path(paths.openclaw_state_dir()).is_dir():
        return
    where = paths.shorten_home(store.path)
    _say(f"OpenClaw's state dir {paths.shorten_home(paths.openclaw_state_dir())} does not "
         f"exist (is OpenClaw installed for this user, or OPENCLAW_STATE_DIR set?). "
         f"A login now creates a new store: {where}", err)
    if sys.stdin is not None and sys.stdin.isatty() and err.isatty():
        err.write("Create it? [y/N] ")
        err.flush()
        if sys.stdin.readline().strip().lower() in ("y", "yes"):
            return
    raise LoginTargetMissing(
        f"no OpenClaw state dir; nothing was created. Name the store to create: "
        f"{shell_join(['qwen-refresher', 'login', '--store', str(store.path)])}")


SPINNER = "|/-\\"


class _Countdown:
    """The wait for approval, visible: a live "4m32s left" on a terminal, a plain line every
    minute otherwise (logs, CI). Used as ``wait_for_device_token``'s ``sleep``."""

    def __init__(self, deadline: float, stream: TextIO) -> None:
        self.deadline = deadline  # time.monotonic() based, as DeviceAuthorization.deadline
        self.stream = stream
        self.tty = stream.isatty()
        self.last_plain = time.monotonic()
        self.spinner = 0

    def __enter__(self) -> _Countdown:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tty:
            self.stream.write("\r\033[K")  # clear the countdown line
            self.stream.flush()

    def _left(self) -> str:
        left = max(0, int(self.deadline - time.monotonic()))
        return f"{left // 60}m{left % 60:02d}s" if left >= 60 else f"{left}s"

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            if self.tty:
                self.spinner = (self.spinner + 1) % len(SPINNER)
                self.stream.write(f"\r\033[K{SPINNER[self.spinner]} waiting for approval, "
                                  f"{self._left()} left (Ctrl-C cancels)")
                self.stream.flush()
            elif now - self.last_plain >= 60:
                self.last_plain = now
                _say(f"still waiting for approval, {self._left()} left", self.stream)
            time.sleep(min(1.0, end - now))


def _say(text: str, stream: TextIO) -> None:
    """One message for the person at the terminal; each line ``escape.printable``, since store
    paths and profile ids are names we do not choose (escape codes, undecodable bytes)."""
    stream.write("\n".join(printable(line) for line in text.split("\n")) + "\n")
    stream.flush()  # a pipe is block-buffered; the URL must show while we wait


def _show_code(auth: DeviceAuthorization, *, qr: bool, out: TextIO) -> None:
    url = auth.verification_uri_complete or auth.verification_uri
    _say("Open this page on any device and approve the login:", out)
    _say(f"  {url}", out)
    _say(f"or go to {auth.verification_uri} and enter the code: {auth.user_code}", out)
    if qr:
        import segno

        segno.make(url).terminal(out=out, compact=True)
        out.flush()


@contextlib.contextmanager
def _no_interrupt() -> Iterator[None]:
    """Hold Ctrl-C while the new tokens are written: they exist nowhere else yet."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(args: argparse.Namespace) -> int:
    """``qwen-refresher login``: URL and QR code on stdout, progress on stderr.

    Returns 0 once the tokens are written; raises ``DeviceFlowError`` (exit 2) when the code
    expires or the login is denied, other ``QwenRefresherError`` for config and store problems;
    Ctrl-C returns 130.
    """
    out, err = sys.stdout, sys.stderr
    try:
        return _login(args, out, err)
    except KeyboardInterrupt:
        _say("\nlogin cancelled; nothing was written", err)
        return EX_INTERRUPTED


def _login(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    settings = load_settings({
        "token_url": getattr(args, "token_url", None),
        "device_code_url": getattr(args, "device_code_url", None),
        "state_dir": getattr(args, "state_dir", None),
    }, config_file=getattr(args, "config", None))
    store, profile = resolve_target(getattr(args, "store", None), getattr(args, "profile", None))
    if getattr(args, "store", None) is None:
        _confirm_new_openclaw_store(store, err)
    # Before any code is shown: a store we could not write must not cost the person a login.
    targets = linked_targets(store, profile, settings)
    _say(f"Logging in {store.describe()}#{profile}", err)
    if len(targets) > 1:
        others = [f"{s.describe()}#{p}" for s, p in targets[1:]]
        _say("The same refresh token is also in: " + ", ".join(others)
             + " (they get the new login too)", err)
    qr = out.isatty() and not getattr(args, "no_qr", False)
    with QwenOAuthClient(settings.token_url, settings.device_code_url, settings.client_id,
                         timeout=settings.http_timeout) as client:
        try:
            auth = client.start_device_flow()
        except TransientOAuthError as exc:
            raise TransientOAuthError(f"cannot start a login at {settings.device_code_url}: "
                                      f"{exc.reason}; nothing was written") from None
        _show_code(auth, qr=qr, out=out)
        valid = (f"{auth.expires_in:.0f} s" if auth.expires_in < 90
                 else f"{auth.expires_in / 60:.0f} min")
        _say(f"Waiting for approval (the code is valid for {valid}; Ctrl-C cancels)...", err)
        try:
            with _Countdown(auth.deadline, err) as countdown:
                grant = client.wait_for_device_token(auth, sleep=countdown.sleep)
        except DeviceFlowError as exc:
            again = shell_join(["qwen-refresher", "login", "--store", str(store.path),
                                "--profile", profile])
            raise DeviceFlowError(f"login failed: {exc}; nothing was written. "
                                  f"Run `{again}` to try again.") from None
        with _no_interrupt():
            creds = credentials_from(grant, int(time.time() * 1000))
            written = write_login(targets, creds, lock_timeout=settings.lock_timeout)
    expires = datetime.fromtimestamp(creds.expires_at).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    _say("Logged in. New tokens written to: " + ", ".join(str(k) for k in written), err)
    _say(f"The access token is valid until {expires}; a running qwen-refresher picks the new "
         "login up by itself and keeps it fresh.", err)
    result = run_on_rotate(settings, written, creds)
    if result is not None and result.ok:
        _say(f"Told the gateway: `{result.command}` succeeded.", err)
    elif result is not None:
        why = "timed out" if result.timed_out else f"exit code {result.returncode}"
        _say(f"warning: the on_rotate hook `{result.command}` failed ({why}): {result.output}; "
             "a running gateway may keep serving the old login until it reloads.", err)
    return 0
