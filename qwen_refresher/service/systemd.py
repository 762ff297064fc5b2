"""Talking to the user's systemd manager: ``systemctl --user``, and probes that ask the manager
itself (with throw-away ``systemd-run --user`` units) which sandbox settings and which hook
runner work here, rather than guessing from sysctls.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .. import hooks
from ..errors import ServiceError
from .unit import HOOK_RUNNER, NAMESPACE_SETTINGS

SYSTEMCTL_TIMEOUT = 60.0
PROBE_TIMEOUT = 30.0
#: The linger flag files logind keeps, one per user (``loginctl enable-linger``).
LINGER_DIR = Path("/var/lib/systemd/linger")


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``systemctl --user ARGS``; a failure becomes a ServiceError naming the command."""
    command = ["systemctl", "--user", *args]
    try:
        proc = subprocess.run(command, capture_output=True, text=True,
                              timeout=SYSTEMCTL_TIMEOUT, check=False)
    except FileNotFoundError:
        raise ServiceError("systemctl not found: install-service needs systemd. Elsewhere run "
                           "`qwen-refresher run` under your own supervisor, or use the "
                           "Docker image") from None
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`{' '.join(command)}` did not finish in "
                           f"{SYSTEMCTL_TIMEOUT:.0f}s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        hint = ""
        if "bus" in detail.lower() or "XDG_RUNTIME_DIR" in detail:
            hint = (" (run it as the user who runs OpenClaw, from a login session, not through "
                    "sudo or su; or export XDG_RUNTIME_DIR=/run/user/$(id -u))")
        raise ServiceError(f"`{' '.join(command)}` failed: {detail or proc.returncode}{hint}")
    return proc


def _try_settings(settings: Sequence[tuple[str, str]]) -> tuple[bool | None, str]:
    """Run ``/bin/true`` in a throw-away user unit with ``settings``. None: could not ask."""
    command = ["systemd-run", "--user", "--wait", "--quiet", "--collect"]
    for name, value in settings:
        command += ["-p", f"{name}={value}"]
    command.append("/bin/true")
    return _probe(command)


def probe_hook_runner() -> tuple[bool | None, str]:
    """Whether a hook can run through ``HOOK_RUNNER`` here, exactly as run_hook would run it.

    None: could not ask (no ``systemd-run``, or no D-Bus session bus: ``--wait`` and ``--pipe``
    need one, where ``systemctl --user`` manages with the manager's private socket).
    """
    if shutil.which("systemd-run") is None:
        return None, "systemd-run not found"
    unit = f"{hooks.RUNNER_UNIT_PREFIX}probe-{secrets.token_hex(4)}"
    return _probe(hooks.runner_argv(HOOK_RUNNER, "true", {}, timeout=PROBE_TIMEOUT / 2,
                                    unit=unit, environ={}))


def _probe(command: Sequence[str]) -> tuple[bool | None, str]:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    detail = (proc.stderr or proc.stdout).strip()
    if proc.returncode != 0 and "bus" in detail.lower():
        return None, detail  # no manager or bus to ask through: says nothing about the test
    return proc.returncode == 0, detail


def probe_sandbox() -> tuple[list[str] | None, str]:
    """Which ``NAMESPACE_SETTINGS`` this user manager refuses ([]: none; None: could not ask).

    Asks the manager itself rather than guessing from sysctls. All settings at once first;
    if that fails, PrivateUsers= alone (refused: no user namespaces, so all are out), then each
    other setting beside it, and finally the survivors together. Containers and some VMs
    refuse single settings (a locked /proc/sys mount, no IPC namespaces) while the rest works;
    leaving out only those keeps the rest of the sandbox.
    """
    if shutil.which("systemd-run") is None:
        return None, "systemd-run not found"
    every = [name for name, _ in NAMESPACE_SETTINGS]
    ok, detail = _try_settings(NAMESPACE_SETTINGS)
    if ok is None or ok:
        return (None if ok is None else []), detail
    base = NAMESPACE_SETTINGS[:1]
    ok, base_detail = _try_settings(base)
    if not ok:
        return every, base_detail or detail
    refused = [name for name, value in NAMESPACE_SETTINGS[1:]
               if _try_settings([*base, (name, value)])[0] is not True]
    kept = [(name, value) for name, value in NAMESPACE_SETTINGS if name not in refused]
    ok, kept_detail = _try_settings(kept)
    if not ok:
        return every, kept_detail or detail
    return refused, detail


def preflight() -> None:
    """Reach the user manager before touching anything, so a failure leaves no half-install."""
    systemctl("show", "--property=Version")


def lingering(user: str) -> bool:
    return (LINGER_DIR / user).exists()


def user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER") or os.environ.get("LOGNAME") or "$USER"
