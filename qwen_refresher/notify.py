"""Telling a person that a profile needs a new login, where they are, and when it is fixed.

When Qwen refuses a refresh token only a new login helps, and until now people learned it when
their agent stopped answering. The daemon hands every published status to ``Notifier.update``;
the notifier turns the *transitions* into notices:

* a profile enters ``needs_login``: one notice (the ``on_needs_login`` hook, every apprise URL
  in ``notify_urls``, and a desktop notification on a desktop session), saying which profile
  and store, what the server said, and the exact command to run. With ``auto_login`` the
  daemon also starts a device-code login for the profile's family and the notice carries its
  ``verification_uri_complete``: approving on a phone is the whole re-login;
* it still needs a login ``remind_interval`` after the last notice: a reminder (with a fresh
  code if the last one expired unapproved);
* it leaves ``needs_login`` for a healthy state: one "recovered" notice.

Delivery happens on one worker thread, so ``update`` never blocks the daemon on a slow hook or
a dead webhook; every failure to notify is logged and otherwise ignored. Messages, hook
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import discovery
from .config import Settings
from .errors import ConfigError
from .escape import printable, shell_join
from .hooks import run_hook
from .logsetup import REDACTOR, redact_text
from .paths import shorten_home
from .state import ProfileStatus

if TYPE_CHECKING:
    from .protocols import Logger
    from .qwen import DeviceAuthorization
    from .runtime.relogin import AssistedLogin
    from .stores import Store

Event = Literal["needs_login", "reminder", "recovered"]

NOTIFY_SETTING = "notify_urls (QWEN_REFRESHER_NOTIFY_URLS)"
#: States that mean the profile works again: refreshing resumed (``retrying`` is a transient
#: failure of a token the server has not refused). ``expired`` and ``invalid_store`` are not
#: a recovery: the person still has something to do, so the episode stays open, silently.
RECOVERED_STATES = frozenset({"ok", "due", "refreshing", "retrying"})
DESKTOP_ENV = ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS")
DESKTOP_TIMEOUT = 10.0
#: How long a notice waits for the assisted login's code before it goes out without one.
CODE_WAIT_MIN = 10.0


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


# --------------------------------------------------------------------------- the notifier


@dataclass
class _Episode:
    """One stretch of ``needs_login`` of one profile, from the first notice to recovery."""

    family: str
    started_at: float
    last_notice_at: float
    status: ProfileStatus


@dataclass
class _Waiting:
    """A notice held back until the family's assisted-login code arrives."""

    key: tuple[str, str]
    event: Event
    queued_at: float


_STOP = object()


class Notifier:
    """Turns status transitions into notices; thread-safe, never blocks the caller.

    ``update`` is cheap (no I/O): it diffs, decides, and queues. One worker thread delivers,
    in order: the ``on_needs_login`` hook (for every event, told apart by ``EVENT``), apprise,
    then ``notify-send``. ``close`` drains the queue (bounded) and also closes the
    ``AssistedLogin`` it was given.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        log: Logger,
        assisted_login: AssistedLogin | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.log = log
        self.assisted = assisted_login
        self.clock = clock
        self._lock = threading.Lock()
        self._episodes: dict[tuple[str, str], _Episode] = {}
        self._codes: dict[str, LoginCode] = {}  # family -> live code of its assisted login
        self._starting: set[str] = set()  # families whose login started but has no code yet
        self._waiting: dict[str, list[_Waiting]] = {}
        self._queue: queue.Queue[Notice | object] = queue.Queue()
        self._closed = False
        self._desktop = desktop_command(settings)
        self._apprise = self._make_apprise(settings.notify_urls)
        self._code_wait = max(CODE_WAIT_MIN, 2 * settings.http_timeout + 5)
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

    # -- deciding ---------------------------------------------------------------------------
    def update(self, profiles: list[ProfileStatus]) -> None:
        """Diff ``profiles`` (every profile the daemon knows) against the last call and queue
        the notices the transitions call for. Call it after each publish and at least once a
        minute: reminders and held-back notices are only sent from here."""
        now = self.clock()
        current = {(p["store"], p["profile"]): p for p in profiles}
        with self._lock:
            if self._closed:
                return
            for key, ended in list(self._episodes.items()):
                status = current.get(key)
                if status is None:
                    # The store or profile is gone (Qwen Code deletes its file on a refusal):
                    # nothing left to log in here, and nothing recovered either.
                    self._end_episode(key, ended)
                    self.log.info("needs_login_gone", store=key[0], profile=key[1])
                elif status["state"] in RECOVERED_STATES:
                    self._end_episode(key, ended)
                    self._send(Notice("recovered", status.copy(), since=ended.started_at,
                                      now=now))
            for key, status in current.items():
                if status["state"] != "needs_login" or not key[1]:
                    continue
                episode = self._episodes.get(key)
                if episode is None:
                    episode = _Episode(_family_id(status), now, now, status)
                    self._episodes[key] = episode
                    self._announce("needs_login", key, episode, profiles, now)
                elif now - episode.last_notice_at >= self.settings.remind_interval:
                    episode.status, episode.last_notice_at = status, now
                    self._announce("reminder", key, episode, profiles, now)
                else:
                    episode.status = status
            self._flush_overdue(now)

    def _end_episode(self, key: tuple[str, str], episode: _Episode) -> None:
        del self._episodes[key]
        for family, items in list(self._waiting.items()):
            self._waiting[family] = [w for w in items if w.key != key]
        family = episode.family
        if self.assisted is not None and not any(e.family == family
                                                 for e in self._episodes.values()):
            # Logged in some other way: stop polling, or a late approval would replace it.
            self.assisted.cancel(family)

    def _announce(self, event: Event, key: tuple[str, str], episode: _Episode,
                  profiles: list[ProfileStatus], now: float) -> None:
        family = episode.family
        if self.assisted is None:
            self._send(self._notice(event, episode, None, now))
            return
        code = self._codes.get(family)
        if code is not None and code.expires_at <= now:
            code = None
            del self._codes[family]
        if code is None and family not in self._starting and self._start_login(
                family, episode, profiles):
            self._starting.add(family)
        if code is None and family in self._starting:
            self._waiting.setdefault(family, []).append(_Waiting(key, event, now))
            return
        self._send(self._notice(event, episode, code, now))

    def _start_login(self, family: str, episode: _Episode,
                     profiles: list[ProfileStatus]) -> bool:
        assert self.assisted is not None
        targets = _family_targets(family, episode.status, profiles)
        try:
            return self.assisted.start(
                targets, family,
                lambda auth: self._code_ready(family, auth),
                on_end=lambda error: self._login_ended(family, error))
        except Exception as exc:  # never let the login helper take the daemon down
            self.log.warning("assisted_login_not_started", error=str(exc))
            return False

    def _notice(self, event: Event, episode: _Episode, code: LoginCode | None,
                now: float) -> Notice:
        return Notice(event, episode.status.copy(), code, since=episode.started_at, now=now)

    def _code_ready(self, family: str, auth: DeviceAuthorization) -> None:
        """From the assisted login's thread: the code exists, send what waited for it."""
        with self._lock:
            now = self.clock()
            code = LoginCode(auth.verification_uri_complete or auth.verification_uri,
                             auth.verification_uri, auth.user_code, now + auth.expires_in)
            self._codes[family] = code
            self._starting.discard(family)
            self._release(family, code, now)

    def _login_ended(self, family: str, error: BaseException | None) -> None:
        """The flow is over (written, expired, denied, cancelled): its code is dead."""
        with self._lock:
            self._codes.pop(family, None)
            self._starting.discard(family)
            self._release(family, None, self.clock())

    def _release(self, family: str, code: LoginCode | None, now: float) -> None:
        for waiting in self._waiting.pop(family, []):
            episode = self._episodes.get(waiting.key)
            if episode is not None:
                self._send(self._notice(waiting.event, episode, code, now))

    def _flush_overdue(self, now: float) -> None:
        """A code that never comes (network down) must not swallow the notice."""
        for family, items in list(self._waiting.items()):
            if items and now - items[0].queued_at >= self._code_wait:
                self.log.warning("assisted_login_code_late", family=family[:12],
                                 message="notifying without a login link")
                self._release(family, None, now)

    # -- delivering -------------------------------------------------------------------------
    def _send(self, notice: Notice) -> None:
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

    # -- lifecycle --------------------------------------------------------------------------
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is delivered (tests, orderly shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop the assisted logins, deliver what is queued (at most ``timeout``), stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout
        if self.assisted is not None:
            self.assisted.close(timeout / 2)
        self._queue.put(_STOP)
        self._worker.join(max(0.0, deadline - time.monotonic()))
        if self._worker.is_alive():
            self.log.warning("notify_unsent", pending=self._queue.qsize(),
                             message="shutting down with notices still queued")


def _family_id(status: ProfileStatus) -> str:
    """Profiles sharing a refresh token share a family id; a lone profile is its own family."""
    return status.get("family") or f"{status['store']}#{status['profile']}"


def _family_targets(family: str, status: ProfileStatus,
                    profiles: list[ProfileStatus]) -> list[tuple[Store, str]]:
    """Every (store, profile) of the family: one login, written to all who shared the token."""
    members = [status]
    if status.get("family"):
        members = [p for p in profiles if p["profile"] and _family_id(p) == family] or members
    targets: list[tuple[Store, str]] = []
    for member in members:
        try:
            store = discovery.open_store(Path(member["store"]), member["store_kind"])
        except KeyError:
            continue
        targets.append((store, member["profile"]))
    return targets
