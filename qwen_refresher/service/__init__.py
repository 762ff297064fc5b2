"""``install-service`` / ``uninstall-service``: run the refresher as a systemd **user** service.

Why a user unit: the stores the refresher rewrites (``~/.openclaw/agents/*/agent/
auth-profiles.json``, ``~/.qwen/oauth_creds.json``) belong to the user who runs OpenClaw, and so
does the gateway it reloads with ``openclaw secrets reload``. A user unit runs as that user
without root, and ``loginctl enable-linger`` keeps it running without a login session.

The unit text has one source, ``render_unit`` below; ``systemd/qwen-refresher.service`` in the
repository is ``shipped_unit()`` (a test keeps the two equal), so the file people read, the
file ``systemd-analyze security`` scores and the file the installer writes cannot drift apart.
The installer fills in what only the installing machine knows: the absolute path of the
executable, the resolved OpenClaw and Qwen Code directories, a ``PATH`` that finds
``openclaw`` and ``node`` for the ``on_rotate`` hook, and whether the sandbox can be used.

Sandbox decisions, each one checked here rather than assumed:

- Filesystem namespacing (``ProtectSystem=strict`` + ``ReadWritePaths=``, ``PrivateTmp=``,
  ``PrivateDevices=`` ...) works in a *user* manager only with ``PrivateUsers=yes``, i.e. an
  unprivileged user namespace. Ubuntu 23.10+ restricts those through AppArmor
  (``kernel.apparmor_restrict_unprivileged_userns=1``) and the unit would then fail to start
  with ``226/NAMESPACE``; some containers and VMs allow the namespace but refuse single
  settings in it (a user manager in a container refused ``PrivateIPC=``,
  ``ProtectKernelTunables=`` and ``ProtectKernelLogs=``). ``--sandbox auto`` asks the user
  manager itself with throw-away ``systemd-run --user`` units and leaves out only what it
  refuses; without user namespaces, that is the whole filesystem part (the ``basic``
  sandbox: seccomp-based settings only).
- ``MemoryDenyWriteExecute=yes`` protects the refresher (CPython, pydantic-core, watchdog run
  fine under it), but a hook run as its child would inherit it, and the default hook is
  OpenClaw's CLI, a Node.js program: V8 aborts at its first JIT compilation under it, and
  ``node --jitless`` dies too because undici's HTTP parser needs WebAssembly. So the unit sets
  ``QWEN_REFRESHER_HOOK_RUNNER`` (``HOOK_RUNNER``) and every hook runs in a transient user unit
  of its own (``systemd-run --user --wait --pipe``, see ``hooks.runner_argv``), outside this
  sandbox. That needs the user's D-Bus session bus; ``--sandbox auto`` tries the runner, and
  where it fails (no ``dbus-user-session``) leaves both out, so hooks keep working inside the
  sandbox as before.
- ``ProtectProc=``, ``ProcSubset=``, ``ProtectControlGroups=`` and ``RemoveIPC=`` are system-only
  settings (systemd.exec(5)); a user unit gains nothing from them, so they are not listed to
  flatter the exposure score.
- ``StateDirectory=`` is not used: in systemd 252 (Debian 12) a user unit's state directory
  is ``$XDG_CONFIG_HOME``, not ``~/.local/state`` (later versions moved it); the installer
  creates our state dir (0700) and lists it in ``ReadWritePaths=`` instead.

What store directories the sandbox leaves writable comes from ``settings_core`` (the daemon's
own resolution and discovery, ``openclaw.json`` agent dirs included), so the service can write
every store the daemon manages.

The rooms: ``unit`` (the template and ``render_unit``), ``machine`` (what this machine needs
in the unit), ``systemd`` (``systemctl --user`` and the probes), ``steps`` (the steps of both
commands: sandbox and hook-runner choice, writing or removing the unit, what systemd is asked;
no output). The commands themselves (parse, print) are ``commands/service.py``. This package
re-exports the names the module had before it was split.

Stdlib only, imported only when one of the two commands runs.
"""

from __future__ import annotations

from . import machine, steps, systemd, unit
from .machine import (
    Resolved,
    configured,
    default_unit_dir,
    resolve,
    resolve_exec_start,
    unit_params,
)
from .steps import read_existing, write_atomic
from .systemd import (
    LINGER_DIR,
    PROBE_TIMEOUT,
    SYSTEMCTL_TIMEOUT,
    lingering,
    preflight,
    probe_hook_runner,
    probe_sandbox,
    systemctl,
    user_name,
)
from .unit import (
    BASE_PATH,
    GATEWAY_UNIT,
    HOOK_RUNNER,
    MARKER,
    NAMESPACE_SETTINGS,
    PASS_THROUGH_ENV,
    RUNNER_ENV,
    UNIT_NAME,
    UnitParams,
    is_ours,
    quote_arg,
    render_unit,
    shipped_unit,
)

__all__ = [
    "BASE_PATH", "GATEWAY_UNIT", "HOOK_RUNNER", "LINGER_DIR", "MARKER", "NAMESPACE_SETTINGS",
    "PASS_THROUGH_ENV", "PROBE_TIMEOUT", "RUNNER_ENV", "SYSTEMCTL_TIMEOUT", "UNIT_NAME",
    "Resolved", "UnitParams", "configured", "default_unit_dir", "is_ours", "lingering",
    "machine", "preflight", "probe_hook_runner", "probe_sandbox", "quote_arg", "read_existing",
    "render_unit", "resolve", "resolve_exec_start", "shipped_unit", "steps", "systemctl",
    "systemd", "unit", "unit_params", "user_name", "write_atomic",
]

#: The commands' half, ``commands/service.py``, under its old names here.
_COMMAND_NAMES = frozenset({"add_parsers", "install", "uninstall"})


def __getattr__(name: str) -> object:
    """``service.add_parsers``/``install``/``uninstall`` live in ``commands.service``, which
    imports this package: fetched lazily, no import cycle."""
    if name in _COMMAND_NAMES:
        from ..commands import service as command

        return getattr(command, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
