"""``qwen-refresher login``: the command line of a new device-code login (parse, talk, print).

What a login writes and where is ``login.py``'s (``write_login``, ``linked_targets``,
``run_on_rotate``: shared with the daemon's assisted login); this module asks the person, shows
the code and the QR, waits with a countdown, and reports. Exit code: 0 logged in, 2 the code
expired or the login was denied, 130 cancelled.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from .. import paths
from ..config import load_settings
from ..errors import (
    EX_INTERRUPTED,
    DeviceFlowError,
    LoginTargetMissing,
    TransientOAuthError,
)
from ..escape import printable, shell_join
from ..login import (
    DEFAULT_PROFILE,
    credentials_from,
    linked_targets,
    run_on_rotate,
    write_login,
)
from ..qwen import DeviceAuthorization, QwenOAuthClient
from ..report import EX_OK
from ..stores import OpenClawStore, QwenCodeStore, Store
from ..stores.qwen_code import PROFILE_ID as QWEN_CODE_PROFILE


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
            raise exc.restated(f"cannot start a login at {settings.device_code_url}: "
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
    result = run_on_rotate(settings, targets, written, creds)
    if result is not None and result.ok:
        _say(f"Told the gateway: `{result.command}` succeeded.", err)
    elif result is not None:
        why = "timed out" if result.timed_out else f"exit code {result.returncode}"
        _say(f"warning: the on_rotate hook `{result.command}` failed ({why}): {result.output}; "
             "a running gateway may keep serving the old login until it reloads.", err)
    return EX_OK
