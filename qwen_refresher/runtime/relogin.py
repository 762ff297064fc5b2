"""Login episodes: telling people a profile needs a login, and the assisted login.

Three parts, all here: ``LoginEpisodes`` follows each profile's ``needs_login`` episode and
decides which notice goes out when (first notice, reminders, recovered, holding a notice for the
assisted login's code; ``notify.Courier`` only delivers them); ``AssistedLogin`` is the device
flow the daemon runs by itself, writing with ``login.write_login``; ``Relogin`` builds the pair
from the settings, and rebuilt by a reload when a setting either of them reads changed (an
unchanged pair is kept: a login in progress, and who was already told, survive a SIGHUP).
``Relogin.update`` is the daemon's one call after every change: it costs nothing unless a
login episode is in play.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import discovery
from ..config import Settings
from ..errors import DeviceFlowError, LoginWriteError, QwenRefresherError
from ..history import TokenHistory
from ..login import credentials_from, run_on_rotate, write_login
from ..models import ProfileKey
from ..notify import Courier, Event, LoginCode, Notice, check_notify_setup
from ..protocols import Logger, NotifierLike
from ..qwen import DeviceAuthorization, QwenOAuthClient
from ..state import ProfileStatus
from ..stores import Store
from .memory import Memory

#: The settings the notifier and the assisted login read: a reload that changes one of
#: these rebuilds them.
RELOGIN_SETTINGS = ("notify_urls", "notify_desktop", "on_needs_login", "remind_interval",
                    "hook_timeout", "hook_runner", "http_timeout", "auto_login", "token_url",
                    "device_code_url", "client_id", "lock_timeout", "stores", "discover",
                    "qwen_code", "on_rotate")


def _relogin_inputs(settings: Settings) -> tuple[object, ...]:
    return tuple(getattr(settings, name) for name in RELOGIN_SETTINGS)


class Relogin:
    """The notifier and assisted login of the running daemon."""

    def __init__(self, memory: Memory, history: TokenHistory, *, log: Logger,
                 statuses: Callable[[], list[ProfileStatus]],
                 on_written: Callable[[], None]) -> None:
        self.memory = memory
        self.history = history
        self.log = log
        self._statuses = statuses
        self._on_written = on_written
        self.notifier: NotifierLike | None = None
        self._inputs: tuple[object, ...] | None = None
        #: a profile needed a login at the last update: keep telling the notifier until none
        self._episode = False

    def configure(self, settings: Settings) -> None:
        """Build the notifier (and the assisted login, if enabled) for ``settings``; raises
        ``ConfigError`` when notifications cannot work. Kept as is when nothing it reads
        changed; else the old one is closed and the new one told the current state."""
        inputs = _relogin_inputs(settings)
        if self.notifier is not None and inputs == self._inputs:
            return
        check_notify_setup(settings)
        assisted = None
        if settings.auto_login:
            assisted = AssistedLogin(settings, log=self.log,
                                     on_written=lambda keys: self._on_written())
        old, self.notifier = self.notifier, LoginEpisodes(settings, log=self.log,
                                                          assisted_login=assisted)
        self._inputs = inputs
        if old is not None:
            old.close(2.0)
            self._episode = True  # the new notifier learns who needs a login now

    def update(self) -> None:
        """Let the notifier diff the profiles, but only while a login episode is in play (or
        has just ended): building every profile's status after each of thousands of refreshes
        would cost more than the refreshes."""
        if self.notifier is None:
            return
        if not self._episode and not self.history.rejected():
            # Only a rejection makes a profile needs_login (``families.row_state``): with
            # none, the scan over every profile below (O(profiles) per refresh, quadratic in a
            # storm) could only find nothing.
            return
        with self.memory.lock:
            in_play = any(rt.state == "needs_login" for rt in self.memory.runtime.values())
        if in_play or self._episode:
            self._episode = in_play
            self.notifier.update(self._statuses())

    def close(self, timeout: float = 2.0) -> None:
        if self.notifier is not None:
            self.notifier.close(timeout)


# -- login episodes -------------------------------------------------------------------------
#: States that mean the profile works again: refreshing resumed (``retrying`` is a transient
#: failure of a token the server has not refused). ``expired`` and ``invalid_store`` are not
#: a recovery: the person still has something to do, so the episode stays open, silently.
RECOVERED_STATES = frozenset({"ok", "due", "refreshing", "retrying"})
#: How long a notice waits for the assisted login's code before it goes out without one.
CODE_WAIT_MIN = 10.0


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


class LoginEpisodes:
    """Turns status transitions into notices; thread-safe, never blocks the caller.

    * a profile enters ``needs_login``: one notice saying which profile and store, what the
      server said, and the exact command to run. With ``auto_login`` (an ``AssistedLogin``
      given) a device-code login starts for the profile's family and the notice waits (at
      most ``CODE_WAIT_MIN``, or two HTTP timeouts) for its ``verification_uri_complete``:
      approving on a phone is the whole re-login;
    * it still needs a login ``remind_interval`` after the last notice: a reminder (with a
      fresh code if the last one expired unapproved);
    * it leaves ``needs_login`` for a healthy state: one "recovered" notice (and the assisted
      login, now useless, is cancelled).

    ``update`` is cheap (no I/O): it diffs, decides, and hands notices to a
    ``notify.Courier``, which delivers them on its own thread. ``close`` closes the
    ``AssistedLogin`` it was given, then drains the courier (bounded).
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
        self._closed = False
        self._courier = Courier(settings, log=log)
        self._code_wait = max(CODE_WAIT_MIN, 2 * settings.http_timeout + 5)

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

    def _send(self, notice: Notice) -> None:
        if not self._closed:
            self._courier.send(notice)

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

    # -- lifecycle --------------------------------------------------------------------------
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every notice decided so far is delivered (tests, orderly shutdown)."""
        return self._courier.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the assisted logins, deliver what is queued (at most ``timeout``), stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout
        if self.assisted is not None:
            self.assisted.close(timeout / 2)
        self._courier.close(max(0.0, deadline - time.monotonic()))


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


# -- assisted login -------------------------------------------------------------------------
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
        log: Logger,
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
                result = run_on_rotate(s, targets, written, creds)
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
