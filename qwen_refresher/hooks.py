"""Running the user's hook commands (``on_rotate``, ``on_needs_login``) safely.

A hook is a shell command line, run with ``/bin/sh -c`` like Vault Agent's template commands,
so users can write ``openclaw secrets reload || true``. What it learns comes through
``QWEN_REFRESHER_*`` environment variables that name profiles, stores and times; no token is
ever passed, in arguments or environment. A failing hook is logged, never fatal: the rotation
already landed.

A hook is a shell, so it may do anything a shell can, and none of it may hold the daemon:

- It runs in a session (and process group) of its own. At its deadline the whole group gets
  SIGTERM, and ``TERM_GRACE`` later SIGKILL; the shell is reaped only after that, so its
  process-group id cannot be reused by another process while we signal it.
- The hook is over when its shell exits. A child it left behind (``sleep 300 &``, or
  ``setsid ...`` out of reach of the group) that still holds the hook's stdout is not waited
  for: what is already in the pipe is read for ``DRAIN_GRACE``, then the pipe is closed. Such a
  child is the hook's own business and keeps running (a hook may start a daemon on purpose);
  it should not write to its inherited stdout, which is closed.
- Output is read as it comes, in chunks, and only the last ``OUTPUT_CAP`` bytes are kept: a
  hook printing gigabytes costs CPU, never memory. What is logged is the end of that, with
  tokens removed and control characters escaped (a hook cannot drive the operator's terminal
  through our log).
- When the daemon stops, ``abort_all`` ends the hooks that are running (as at a deadline), so
  SIGTERM is never held up by a hook's timeout.

With a *runner* (the ``hook_runner`` setting; the installed systemd unit sets one), the hook
runs in its own transient unit started with ``systemd-run`` instead of as our child, so it does
not inherit the service's sandbox: ``MemoryDenyWriteExecute=`` in particular, under which
Node.js (OpenClaw's CLI) aborts. The transient unit gets our environment by *name*
(``--setenv=NAME``: systemd-run copies the value from its own environment, so no value is on a
command line) and the ``QWEN_REFRESHER_*`` variables by value (names, paths and times only).
At the deadline the unit itself is killed (``systemctl kill``), then systemd-run's group.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets as _secrets
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from . import escape

if TYPE_CHECKING:
    from .models import Credentials
    from .stores.base import Store

ENV_PREFIX = "QWEN_REFRESHER_"
OPENCLAW_RELOAD = "openclaw secrets reload"
#: Transient hook units are named ``<prefix><random>.service``.
RUNNER_UNIT_PREFIX = "qwen-refresher-hook-"
#: The transient unit's own limit is this much longer than the hook timeout: normally we kill
#: it first (and report a timeout); the limit ends it even if we die while it runs.
RUNNER_GRACE = 5.0
#: How long to wait for ``systemctl kill``, and for a SIGKILLed shell to be reaped.
KILL_WAIT = 10.0
#: Between SIGTERM to a hook's process group and SIGKILL to what is left of it.
TERM_GRACE = 2.0
#: After the hook's shell exits, how long we go on reading what its children still write.
DRAIN_GRACE = 0.2
#: The end of a hook's output that is kept (bytes); the log shows the last ``LOG_TAIL`` chars.
OUTPUT_CAP = 64 * 1024
LOG_TAIL = 400
#: How often a running hook looks at ``abort_all`` (and, without pidfds, at its shell).
POLL_INTERVAL = 0.1
_READ_SIZE = 64 * 1024
#: Variables that describe *our* unit, not the hook's; systemd sets its own in the hook's unit.
UNIT_VARIABLES = frozenset({
    "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "INVOCATION_ID", "JOURNAL_STREAM",
    "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "MAINPID", "MANAGER_PID", "SYSTEMD_EXEC_PID",
    "PIDFILE", "SERVICE_RESULT", "EXIT_CODE", "EXIT_STATUS", "CREDENTIALS_DIRECTORY",
    "RUNTIME_DIRECTORY", "STATE_DIRECTORY", "CACHE_DIRECTORY", "LOGS_DIRECTORY",
    "CONFIGURATION_DIRECTORY", "MEMORY_PRESSURE_WATCH", "MEMORY_PRESSURE_WRITE",
})
#: What systemd accepts as a variable name (``env_name_is_valid``); others cannot be passed.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: What systemd refuses in a ``--setenv`` value (``env_value_is_valid``): C0 controls but tab
#: and newline, and anything that is not UTF-8 (surrogates: undecodable bytes of our
#: environment come as U+DC80..U+DCFF). DEL and C1 controls are refused with them.
_NOT_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")

#: Bumped by ``abort_all``: a hook started before the bump is ended. A count, not a flag, so
#: that hooks started afterwards (another Daemon in the same process: tests) run normally.
_aborts = 0


@dataclass(frozen=True)
class HookResult:
    command: str
    returncode: int | None  # None: killed at the timeout, or could not start
    output: str  # last lines of combined output, for the log
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def resolve_on_rotate(setting: str | None) -> str | None:
    """``auto`` means "reload the gateway if this machine has OpenClaw's CLI", else nothing."""
    if setting is None:
        return None
    if setting.strip().lower() == "auto":
        return OPENCLAW_RELOAD if shutil.which("openclaw") else None
    return setting


def abort_all() -> None:
    """The daemon is stopping: end every hook running now (SIGTERM, then SIGKILL, as at its
    deadline), so that no hook's timeout delays the exit. Called from the main thread only."""
    global _aborts
    _aborts += 1


def env_text(value: str) -> str:
    """``value`` as a hook sees it: printable UTF-8, one line per line of ``value``.

    The escaping rule: each line (the newline is kept: ``PROFILES`` is a list, one per line)
    goes through ``escape.printable``, which writes every character ``str.isprintable``
    refuses as a visible backslash escape, the way Python's ``repr`` does: a control character
    as ``\\x1b`` (tab as ``\\t``, CR as ``\\r``), a byte of a file name that is not UTF-8 as
    the ``\\xff`` it is on disk, a lone surrogate (a profile id from a JSON ``"\\ud800"``) as
    ``\\ud800``, a bidi override as ``\\u202e``. A printable name, backslashes and all, is
    passed exactly as it is. Why: the environment must be encodable at all (``Popen`` raises
    on a lone surrogate), systemd refuses a ``--setenv`` value that is not UTF-8 or holds
    control characters (so the hook would not run in its unit), and a hook that prints or
    logs a name must not carry terminal escape codes someone put into a profile id. The same
    rule applies with or without a runner. The cost: a path that needed escaping no longer
    names its file; the hook gets such a store's name for people, not for ``open``.
    """
    if value.isprintable():
        return value
    return "\n".join(escape.printable(line) for line in value.split("\n"))


def printable(text: str) -> str:
    """Hook output for a log line, by the rule of ``env_text`` (lines kept): output cannot
    reach the operator's terminal as escape codes through our log."""
    return env_text(text)


def _tail(text: str, limit: int = LOG_TAIL) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def on_rotate_variables(event: str, written: Sequence[tuple[Store, str]],
                        creds: Credentials) -> dict[str, str]:
    """What ``on_rotate`` learns of a rotation, a sync or a login: the one rule for the daemon
    (``runtime``), its resumed episodes after a restart, and ``qwen-refresher login``.

    ``written`` is every (store, profile) that now holds ``creds``, in the caller's order.
    ``STORE``/``PROFILE`` name the first *OpenClaw* store among them (the gateway reads those;
    Qwen Code's file means nothing to it), else the first written; ``PROFILES`` lists them all
    (``store#profile``, one a line). Names and times only: never a token. The values are raw;
    ``hook_variables`` prefixes and escapes them for the environment (``run_hook`` does that).
    """
    if not written:
        raise ValueError("on_rotate_variables: nothing was written")
    store, profile = next(((s, p) for s, p in written if s.kind == "openclaw"), written[0])
    return {
        "EVENT": event,
        "PROFILE": profile,
        "STORE": str(store.path),
        "EXPIRES_AT": datetime.fromtimestamp(creds.expires_at, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"),
        "EXPIRES_MS": str(creds.expires_ms),
        "PROFILES": "\n".join(f"{s.path}#{p}" for s, p in written),
    }


def hook_variables(variables: Mapping[str, str]) -> dict[str, str]:
    """``{"PROFILE": ...}`` as the hook sees it: ``{"QWEN_REFRESHER_PROFILE": ...}``, every value
    escaped by ``env_text`` and scrubbed of known tokens in any encoding
    (``logsetup.redact_environ``: a reason may quote a server that echoed our request); these
    values also reach a runner's argv (``--setenv=NAME=value``)."""
    from .logsetup import redact_environ

    return redact_environ(
        {ENV_PREFIX + name.upper(): env_text(value) for name, value in variables.items()})


def _passable(name: str, value: str) -> bool:
    if name in UNIT_VARIABLES or not _ENV_NAME.fullmatch(name):
        return False
    # Undecodable bytes (surrogateescape) or control characters: systemd would refuse it.
    return _NOT_TEXT.search(value) is None


def runner_argv(
    runner: Sequence[str],
    command: str,
    variables: Mapping[str, str],
    *,
    timeout: float,
    unit: str,
    environ: Mapping[str, str],
) -> list[str]:
    """The command line that runs ``command`` through ``runner`` (``systemd-run ...``).

    ``runner`` says where and how (``--user``, ``--property=...``); what run_hook relies on is
    added here: wait for the hook and return its exit status (``--wait``), hand it our pipes
    (``--pipe``), a unit name we can kill at the timeout (``--unit``), a limit that ends it
    should we not (``RuntimeMaxSec=``), and its environment. ``variables`` are the hook's own
    (``QWEN_REFRESHER_*`` names, passed by value); ``environ`` is ours, passed by name only.
    """
    own = hook_variables(variables)
    limit = math.ceil(max(timeout, 0.0) + RUNNER_GRACE)
    argv = [*runner, "--quiet", "--wait", "--pipe", "--collect", f"--unit={unit}",
            f"--property=RuntimeMaxSec={limit}s", "--property=TimeoutStopSec=5s"]
    argv += [f"--setenv={name}" for name, value in environ.items()
             if name not in own and _passable(name, value)]
    argv += [f"--setenv={name}={value}" for name, value in own.items()]
    return [*argv, "--", "/bin/sh", "-c", command]


def _kill_unit(runner: Sequence[str], unit: str) -> None:
    """SIGKILL every process of a transient hook unit (it is then collected)."""
    scope = ["--user"] if "--user" in runner else []
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["systemctl", *scope, "kill", "--signal=SIGKILL", f"{unit}.service"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=KILL_WAIT,
                       check=False)


class _Output:
    """A hook's combined output, read as it comes without blocking; only the end is kept."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.pipe = proc.stdout
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.kept = bytearray()
        self.eof = False

    def read(self) -> None:
        """Read what is there now (at most a few chunks, so a flood cannot starve the rest)."""
        for _ in range(16):
            try:
                chunk = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
                return
            self.kept += chunk
            if len(self.kept) > OUTPUT_CAP:
                del self.kept[:len(self.kept) - OUTPUT_CAP]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.close()

    def text(self) -> str:
        return self.kept.decode("utf-8", "backslashreplace")


class _Hook:
    """One started hook: its shell, its output and the waits on both, each with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes], generation: int) -> None:
        self.proc = proc
        self.generation = generation
        self.out = _Output(proc)
        self.exited = False
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.out.fd, selectors.EVENT_READ, "out")
        self.pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # Linux >= 5.3 only
            self.pidfd = os.pidfd_open(proc.pid)
            self.selector.register(self.pidfd, selectors.EVENT_READ, "exit")

    def _check_exit(self) -> bool:
        """Has the shell exited? Asked without reaping it (``WNOWAIT``): a zombie keeps its
        pid, and so its process group's id, from being reused while we may still signal it."""
        if self.exited:
            return True
        try:
            exited = os.waitid(os.P_PID, self.proc.pid,
                               os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped already: gone all the same
            exited = True
        if exited:
            self.exited = True
            if self.pidfd is not None:
                self.selector.unregister(self.pidfd)
        return exited

    def pump(self, deadline: float, *, abortable: bool) -> str:
        """Read output until the shell has exited ("exited"), ``deadline`` passes ("timeout")
        or, if ``abortable``, ``abort_all`` is called after the hook started ("aborted").

        Once the shell has exited, the pipe is read until it is at its end or for
        ``DRAIN_GRACE`` more, whichever comes first: a child that outlives the hook and keeps
        the pipe open is never waited for.
        """
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if drain_until is None and self._check_exit():
                drain_until = now + DRAIN_GRACE
            if drain_until is not None and (self.out.eof or now >= drain_until):
                return "exited"
            if drain_until is None:
                if now >= deadline:
                    return "timeout"
                if abortable and _aborts != self.generation:
                    return "aborted"
                wait = min(deadline - now, POLL_INTERVAL)
            else:
                wait = drain_until - now
            if self.out.eof and self.pidfd is None:  # output closed early, exit not pollable
                time.sleep(min(wait, POLL_INTERVAL / 2))
                continue
            for key, _ in self.selector.select(wait):
                if key.data == "out":
                    self.out.read()
                    if self.out.eof:
                        self.selector.unregister(self.out.fd)
                else:
                    self._check_exit()

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def end(self) -> None:
        """SIGTERM to the whole group, output still read for ``TERM_GRACE``, then SIGKILL to
        whatever of the group is left (the shell, unreaped until now, keeps the id ours)."""
        self.signal_group(signal.SIGTERM)
        self.pump(time.monotonic() + TERM_GRACE, abortable=False)
        self.signal_group(signal.SIGKILL)

    def close(self) -> int | None:
        """Reap the shell and release the pipe and pidfd; its exit status, if it has one."""
        self.out.close()
        self.selector.close()
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
        try:
            return self.proc.wait(timeout=KILL_WAIT)
        except subprocess.TimeoutExpired:  # unkillable (stuck in the kernel): leave it
            return None


def run_hook(
    command: str,
    variables: Mapping[str, str],
    *,
    timeout: float,
    secrets: tuple[str, ...] = (),
    runner: Sequence[str] = (),
) -> HookResult:
    """Run ``command`` with ``QWEN_REFRESHER_<NAME>`` variables added to our environment.

    ``secrets``: values that must not appear in what we log from the hook's output, should a
    hook print something it read from a store. ``runner``: a ``systemd-run`` command line (the
    ``hook_runner`` setting, split into words) to run the hook in a transient unit of its own;
    empty runs it as our child. Returns within ``timeout`` plus ``TERM_GRACE`` (plus
    ``KILL_WAIT`` for ``systemctl kill`` with a runner), whatever the hook does.
    """
    generation = _aborts
    env = dict(os.environ)
    env.update(hook_variables(variables))
    argv = ["/bin/sh", "-c", command]
    unit = ""
    if runner:
        unit = RUNNER_UNIT_PREFIX + _secrets.token_hex(6)
        argv = runner_argv(runner, command, variables, timeout=timeout, unit=unit,
                           environ=os.environ)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        return HookResult(command, None, f"could not start: {exc.strerror}")
    except ValueError as exc:  # a NUL byte in the command line
        return HookResult(command, None, f"could not start: {exc}")
    hook = _Hook(proc, generation)
    try:
        how = hook.pump(time.monotonic() + max(timeout, 0.0), abortable=True)
        timed_out = how != "exited"
        if timed_out:
            if unit:  # killing systemd-run alone would leave the hook's unit running
                _kill_unit(runner, unit)
            hook.end()
    finally:
        returncode = hook.close()
    output = hook.out.text()
    # Before clipping (a clip could cut a token and hide it from the log's redactor), in every
    # encoding: a hook may print the store, its URL-encoded or base64 form, or a curl -v trace.
    from .logsetup import redact_text, secret_forms

    forms = sorted({f for secret in secrets if secret for f in secret_forms(secret)},
                   key=len, reverse=True)
    for form in forms:
        output = output.replace(form, "[redacted]")
    output = printable(_tail(redact_text(output)))
    return HookResult(command, None if timed_out else returncode, output, timed_out)
