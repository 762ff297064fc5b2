"""Delivering a notice about a login: the hook, apprise, the desktop. Delivery only.

Which notices to send, and when, is decided elsewhere: ``runtime.relogin.LoginEpisodes``
follows every profile's ``needs_login`` episode (first notice, reminders, the assisted login's
code, recovery) and hands each notice to a ``Courier`` from here. This module knows how a
notice reads (``Notice``: one text for every channel) and how it travels:

* the ``on_needs_login`` hook (for every event, told apart by ``EVENT``);
* every apprise URL in ``notify_urls``;
* ``notify-send`` on a desktop session.

Delivery happens on one worker thread, so queueing a notice never blocks the daemon on a slow
hook or a dead webhook; every failure to notify is logged and otherwise ignored. Messages, hook
variables and logs never contain a token (the notice text is also run through the redactor);
apprise URLs carry their own secrets (bot tokens, passwords), so they are never logged either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .config import Settings
from .errors import ConfigError
from .escape import printable, shell_join
from .hooks import run_hook
from .logsetup import REDACTOR, redact_text
from .paths import shorten_home
from .state import ProfileStatus

if TYPE_CHECKING:
    from .protocols import Logger

Event = Literal["needs_login", "reminder", "recovered"]

NOTIFY_SETTING = "notify_urls (QWEN_REFRESHER_NOTIFY_URLS)"
DESKTOP_ENV = ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS")
DESKTOP_TIMEOUT = 10.0


# --------------------------------------------------------------------------- set-up checks


@contextlib.contextmanager
def _quiet_apprise() -> Iterator[None]:
    """apprise logs a URL it cannot parse in full, and such URLs carry secrets."""
    logger = logging.getLogger("apprise")
    previous = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _import_apprise() -> Any:
    """apprise is the optional ``notify`` extra; None when it is not installed."""
    try:
        import apprise
    except ImportError:
        return None
    return apprise


def _scheme(url: str) -> str:
    """What we may say about a notify URL in a message: its scheme, never the rest."""
    scheme, sep, _ = url.partition("://")
    return f"a {scheme}:// URL" if sep and scheme.isalnum() else "a value that is not a URL"


def check_notify_setup(settings: Settings) -> None:
    """Fail at start-up, not at the first lost login, when notifications cannot work.

    Raises ``ConfigError`` (exit 78) when URLs are configured but apprise (the optional
    ``notify`` extra) is missing, or when apprise cannot parse one of them.
    """
    if not settings.notify_urls:
        return
    apprise = _import_apprise()
    if apprise is None:
        raise ConfigError(NOTIFY_SETTING, "apprise is not installed; "
                                          "pip install 'qwen-refresher[notify]'")
    for index, url in enumerate(settings.notify_urls, start=1):
        with _quiet_apprise():
            plugin = apprise.Apprise.instantiate(url.strip())
        if plugin is None:
            raise ConfigError(NOTIFY_SETTING, f"entry {index} ({_scheme(url.strip())}) is not a "
                                              "URL apprise understands; see "
                                              "https://github.com/caronc/apprise/wiki")


def desktop_command(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """``notify-send``'s path when a desktop notification can reach someone, else None."""
    environ = os.environ if env is None else env
    if not settings.notify_desktop or not any(environ.get(name) for name in DESKTOP_ENV):
        return None
    return shutil.which("notify-send", path=environ.get("PATH"))


# --------------------------------------------------------------------------- notices


@dataclass(frozen=True)
class LoginCode:
    """The assisted login's code as a person needs it (nothing secret in here)."""

    url: str  # verification_uri_complete, or the bare URI when the server sent none
    verification_uri: str
    user_code: str
    expires_at: float  # on the notifier's clock


@dataclass(frozen=True)
class Notice:
    """One message about one profile, rendered the same way for every channel."""

    event: Event
    status: ProfileStatus
    code: LoginCode | None = None
    since: float | None = None  # when the episode began (reminders say how long ago)
    now: float = field(default_factory=time.time)

    @property
    def profile(self) -> str:
        return self.status["profile"]

    @property
    def store(self) -> str:
        return self.status["store"]

    def shown_profile(self) -> str:
        """The profile id as people see it (``escape.printable``): titles and bodies reach
        desktops and terminals, and an id may hold escape codes or a lone surrogate."""
        return printable(self.profile)

    def where(self) -> str:
        agent = self.status.get("agent")
        shown = shorten_home(self.store)
        return printable(f"{shown} (agent {agent})" if agent else shown)

    def reason(self) -> str:
        return REDACTOR.scrub(self.status.get("last_error") or "no reason recorded")

    def refresher_command(self) -> str:
        """Quoted for pasting (``escape.shell_join``): the path and id are not ours to trust."""
        return shell_join(["qwen-refresher", "login", "--store", self.store,
                           "--profile", self.profile])

    def title(self) -> str:
        agent = self.status.get("agent")
        owner = printable(f"agent {agent}" if agent else (
            "Qwen Code" if self.status.get("store_kind") == "qwen-code" else Path(self.store).name))
        if self.event == "recovered":
            return f"Qwen login restored: {self.shown_profile()} ({owner})"
        prefix = "Reminder: " if self.event == "reminder" else ""
        return f"{prefix}Qwen login needed: {self.shown_profile()} ({owner})"

    def body(self) -> str:
        if self.event == "recovered":
            return REDACTOR.scrub(
                f"Profile {self.shown_profile()} in {self.where()} has working tokens again; "
                "qwen-refresher keeps them fresh as before. Nothing more to do.")
        lines = [
            f"Profile {self.shown_profile()} in {self.where()} needs a new Qwen login: the server "
            "refused its refresh token, and retrying cannot help.",
            f"The server said: {self.reason()}",
        ]
        if self.event == "reminder" and self.since is not None:
            lines.append(f"This has been so for {_ago(self.now - self.since)}.")
        lines.append("")
        if self.code is not None:
            left = max(0.0, self.code.expires_at - self.now)
            valid = f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min"
            lines += [
                "Approve a new login from any device (your phone is fine):",
                f"  {self.code.url}",
                f"(or open {self.code.verification_uri} and enter the code "
                f"{self.code.user_code}; valid for {valid}). qwen-refresher writes "
                "the new tokens itself.",
                "",
                "Or log in from a terminal on this machine:",
            ]
        else:
            lines.append("Log in again from a terminal on this machine:")
        # qwen-refresher's login first: it writes every store of the family at once.
        lines.append(f"  {self.refresher_command()}")
        if self.status.get("login_command"):
            lines += ["or, with OpenClaw (this store only):",
                      f"  {printable(self.status['login_command'] or '')}"]
        return REDACTOR.scrub("\n".join(lines))

    def variables(self) -> dict[str, str]:
        """The hook's environment (as ``QWEN_REFRESHER_<NAME>``): names and text, no token.
        (``hooks.hook_variables`` escapes the values for the environment.)"""
        variables = {
            "EVENT": self.event,
            "PROFILE": self.profile,
            "STORE": self.store,
            "AGENT": self.status.get("agent") or "",
            "REASON": "" if self.event == "recovered" else self.reason(),
            "LOGIN_COMMAND": self.status.get("login_command") or self.refresher_command(),
        }
        if self.code is not None:
            variables["VERIFICATION_URL"] = self.code.url
        return variables


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# --------------------------------------------------------------------------- delivery


_STOP = object()


class Courier:
    """Delivers notices in order on one worker thread; ``send`` never blocks the caller.

    For each notice, in turn: the ``on_needs_login`` hook, apprise, then ``notify-send``; a
    channel failing does not stop the others. ``close`` delivers what is queued (bounded).
    """

    def __init__(self, settings: Settings, *, log: Logger) -> None:
        self.settings = settings
        self.log = log
        self._queue: queue.Queue[Notice | object] = queue.Queue()
        self._closed = False
        self._desktop = desktop_command(settings)
        self._apprise = self._make_apprise(settings.notify_urls)
        self._worker = threading.Thread(target=self._work, name="notifier", daemon=True)
        self._worker.start()

    def _make_apprise(self, urls: list[str]) -> Any:
        if not urls:
            return None
        apprise = _import_apprise()
        if apprise is None:  # check_notify_setup stops the daemon before this in practice
            self.log.error("notify_unavailable", setting=NOTIFY_SETTING,
                           message="apprise is not installed; pip install "
                                   "'qwen-refresher[notify]'")
            return None
        target = apprise.Apprise()
        for index, url in enumerate(urls, start=1):
            with _quiet_apprise():
                added = target.add(url.strip())
            if not added:
                self.log.error("notify_url_invalid", entry=index, kind=_scheme(url.strip()))
        return target if len(target) else None

    def send(self, notice: Notice) -> None:
        """Queue ``notice`` for delivery (dropped once closed)."""
        if not self._closed:
            self._queue.put(notice)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if isinstance(item, Notice):
                    self._deliver(item)
            finally:
                self._queue.task_done()

    def _deliver(self, notice: Notice) -> None:
        # The boundary for apprise (webhooks included) and the desktop: whatever the text is
        # built from, no known token leaves in any encoding (the hook's environment is
        # scrubbed where it is built, ``hooks.hook_variables``).
        title, body = redact_text(notice.title()), redact_text(notice.body())
        self.log.info("notify", notice=notice.event, store=notice.store, profile=notice.profile,
                      login_link=notice.code is not None)
        for channel, send in (("hook", self._run_hook), ("apprise", self._send_apprise),
                              ("desktop", self._send_desktop)):
            try:
                send(notice, title, body)
            except Exception as exc:  # a channel failing must not stop the others
                self.log.warning("notify_failed", channel=channel, notice=notice.event,
                                 error=f"{type(exc).__name__}: {exc}")

    def _run_hook(self, notice: Notice, title: str, body: str) -> None:
        command = self.settings.on_needs_login
        if command is None:
            return
        result = run_hook(command, notice.variables(), timeout=self.settings.hook_timeout,
                          runner=self.settings.hook_runner_argv)
        if result.ok:
            self.log.info("on_needs_login_ok", notice=notice.event, command=command)
        else:
            self.log.warning("on_needs_login_failed", notice=notice.event, command=command,
                             returncode=result.returncode, timed_out=result.timed_out,
                             output=result.output)

    def _send_apprise(self, notice: Notice, title: str, body: str) -> None:
        if self._apprise is None:
            return
        import apprise

        kind = apprise.NotifyType.SUCCESS if notice.event == "recovered" else \
            apprise.NotifyType.WARNING
        if self._apprise.notify(body=body, title=title, notify_type=kind):
            self.log.info("notify_sent", channel="apprise", notice=notice.event,
                          targets=len(self._apprise))
        else:
            self.log.warning("notify_failed", channel="apprise", notice=notice.event,
                             error="at least one notify URL did not accept the message")

    def _send_desktop(self, notice: Notice, title: str, body: str) -> None:
        if self._desktop is None:
            return
        urgency = "normal" if notice.event == "recovered" else "critical"
        proc = subprocess.run(
            [self._desktop, "--app-name=qwen-refresher", f"--urgency={urgency}", title, body],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
            timeout=DESKTOP_TIMEOUT, check=False)
        if proc.returncode != 0:
            self.log.warning("notify_failed", channel="desktop", notice=notice.event,
                             error=(proc.stderr or proc.stdout).strip()[-200:]
                             or f"exit code {proc.returncode}")

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is delivered (tests, orderly shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (at most ``timeout``), then stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._worker.join(max(0.0, timeout))
        if self._worker.is_alive():
            self.log.warning("notify_unsent", pending=self._queue.qsize(),
                             message="shutting down with notices still queued")
