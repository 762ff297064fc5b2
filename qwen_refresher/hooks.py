"""Running the user's hook commands (``on_rotate``, ``on_needs_login``) safely.

A hook is a shell command line, run with ``/bin/sh -c`` like Vault Agent's template commands,
so users can write ``openclaw secrets reload || true``. What it learns comes through
``QWEN_REFRESHER_*`` environment variables that name profiles, stores and times; no token is
ever passed, in arguments or environment. A hook that hangs is killed (its whole process
group) at the timeout, and a failing hook is logged, never fatal: the rotation already landed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

ENV_PREFIX = "QWEN_REFRESHER_"
OPENCLAW_RELOAD = "openclaw secrets reload"


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


def run_hook(
    command: str,
    variables: Mapping[str, str],
    *,
    timeout: float,
    secrets: tuple[str, ...] = (),
) -> HookResult:
    """Run ``command`` with ``QWEN_REFRESHER_<NAME>`` variables added to our environment.

    ``secrets``: values that must not appear in what we log from the hook's output, should a
    hook print something it read from a store.
    """
    env = dict(os.environ)
    for name, value in variables.items():
        env[ENV_PREFIX + name.upper()] = value
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        timed_out = True
    output = _tail(out or "")
    for secret in secrets:
        if secret:
            output = output.replace(secret, "[redacted]")
    return HookResult(command, None if timed_out else proc.returncode, output, timed_out)
