"""Login episodes: telling people a profile needs a login, and the assisted login.

The notifier (``notify.Notifier``, delivery) and the assisted login (``AssistedLogin``, here:
the device flow the daemon runs by itself, writing with ``login.write_login``) are built here
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

from ..config import Settings
from ..errors import DeviceFlowError, LoginWriteError, QwenRefresherError
from ..history import TokenHistory
from ..login import credentials_from, run_on_rotate, write_login
from ..models import ProfileKey
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
        from ..notify import Notifier, check_notify_setup

        inputs = _relogin_inputs(settings)
        if self.notifier is not None and inputs == self._inputs:
            return
        check_notify_setup(settings)
        assisted = None
        if settings.auto_login:
            assisted = AssistedLogin(settings, log=self.log,
                                     on_written=lambda keys: self._on_written())
        old, self.notifier = self.notifier, Notifier(settings, log=self.log,
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
