"""Running the user's hook commands (``on_rotate``, ``on_needs_login``) safely.

A hook is a shell command line, run with ``/bin/sh -c`` like Vault Agent's template commands,
so users can write ``openclaw secrets reload || true``. What it learns comes through
``QWEN_REFRESHER_*`` environment variables that name profiles, stores and times; no token is
ever passed, in arguments or environment. A hook that hangs is killed (its whole process
group) at the timeout, and a failing hook is logged, never fatal: the rotation already landed.

With a *runner* (the ``hook_runner`` setting; the installed systemd unit sets one), the hook
runs in its own transient unit started with ``systemd-run`` instead of as our child, so it does
not inherit the service's sandbox: ``MemoryDenyWriteExecute=`` in particular, under which
Node.js (OpenClaw's CLI) aborts. The transient unit gets our environment by *name*
(``--setenv=NAME``: systemd-run copies the value from its own environment, so no value is on a
command line) and the ``QWEN_REFRESHER_*`` variables by value (names, paths and times only).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets as _secrets
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ENV_PREFIX = "QWEN_REFRESHER_"
OPENCLAW_RELOAD = "openclaw secrets reload"
#: Transient hook units are named ``<prefix><random>.service``.
RUNNER_UNIT_PREFIX = "qwen-refresher-hook-"
#: The transient unit's own limit is this much longer than the hook timeout: normally we kill
#: it first (and report a timeout); the limit ends it even if we die while it runs.
RUNNER_GRACE = 5.0
#: How long to wait for ``systemctl kill`` and for the output after killing a hook.
KILL_WAIT = 10.0
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


def _tail(text: str, limit: int = 400) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def hook_variables(variables: Mapping[str, str]) -> dict[str, str]:
    """``{"PROFILE": ...}`` as the hook sees it: ``{"QWEN_REFRESHER_PROFILE": ...}``."""
    return {ENV_PREFIX + name.upper(): value for name, value in variables.items()}


def _passable(name: str, value: str) -> bool:
    if name in UNIT_VARIABLES or not _ENV_NAME.fullmatch(name):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes (surrogateescape): systemd would refuse it
        return False
    return True


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
    empty runs it as our child.
    """
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
            text=True,
            errors="replace",
        )
    except OSError as exc:
        return HookResult(command, None, f"could not start: {exc.strerror}")
    try:
        out, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        if unit:  # killing systemd-run alone would leave the hook's unit running
            _kill_unit(runner, unit)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, _ = proc.communicate(timeout=KILL_WAIT if unit else None)
        except subprocess.TimeoutExpired:  # something still holds our pipe; give up on it
            if proc.stdout is not None:
                proc.stdout.close()
            proc.wait()
            out = ""
        timed_out = True
    output = out or ""
    for secret in secrets:  # before clipping: a clip could cut a token and hide it from us
        if secret:
            output = output.replace(secret, "[redacted]")
    output = _tail(output)
    return HookResult(command, None if timed_out else proc.returncode, output, timed_out)
