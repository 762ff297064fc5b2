"""The unit text: its one template, ``render_unit``, the shipped copy and the marker that
tells our unit from someone else's (why each setting is there: the package docstring).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ServiceError

UNIT_NAME = "qwen-refresher.service"
#: The environment variable of the ``hook_runner`` setting.
RUNNER_ENV = "QWEN_REFRESHER_HOOK_RUNNER"
#: First line of every unit we write; a unit without it is someone else's and is not touched.
MARKER = "# Written by qwen-refresher install-service"
#: OpenClaw's own user unit (``openclaw gateway install``); we start after it when both exist.
GATEWAY_UNIT = "openclaw-gateway.service"
#: Directories appended to the unit's PATH after the ones we found tools in.
BASE_PATH = ("/usr/local/bin", "/usr/bin", "/bin")
#: Variables copied from the installing shell into the unit when set, so that the daemon, its
#: hook and ``qwen-refresher status`` in that shell all look at the same files and gateway.
#: Never secrets: ``OPENCLAW_GATEWAY_TOKEN`` belongs in the optional EnvironmentFile.
PASS_THROUGH_ENV = (
    "XDG_CONFIG_HOME",
    "XDG_STATE_HOME",
    "OPENCLAW_HOME",
    "OPENCLAW_PROFILE",
    "OPENCLAW_CONFIG_PATH",
    "OPENCLAW_AGENT_DIR",
    "PI_CODING_AGENT_DIR",
    "OPENCLAW_GATEWAY_PORT",
    "OPENCLAW_GATEWAY_URL",
    "QWEN_REFRESHER_CONFIG",
    "QWEN_REFRESHER_STATE_DIR",
)

#: ``hook_runner`` of the installed unit: hooks run in transient units of their own, started by
#: the user manager, so they do not inherit MemoryDenyWriteExecute= (Node.js aborts under it)
#: or the filesystem sandbox. They keep the unit's umask and no-new-privileges; run_hook adds
#: --wait, --pipe, --unit, RuntimeMaxSec= and the environment (``hooks.runner_argv``).
HOOK_RUNNER: tuple[str, ...] = ("systemd-run", "--user", "--property=UMask=0077",
                                "--property=NoNewPrivileges=yes")

#: Settings that need a user namespace in a user manager, in the order the unit lists them.
#: ``--sandbox auto`` probes exactly these (see ``probe_sandbox``).
NAMESPACE_SETTINGS: tuple[tuple[str, str], ...] = (
    ("PrivateUsers", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "read-only"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    # No PrivateIPC=: in a user manager it makes ExecReload= (the SIGHUP) fail with
    # 226/NAMESPACE, and the daemon uses no System V IPC anyway (same exposure score).
    ("PrivateMounts", "yes"),
    ("ProtectHostname", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
)


_HEADER_INSTALLED = """{marker}; edits here are lost on the next install.
# Change settings in ~/.config/qwen-refresher/config.toml, or add a drop-in with
# `systemctl --user edit qwen-refresher`; remove with `qwen-refresher uninstall-service`."""

_HEADER_SHIPPED = """\
# qwen-refresher as a systemd user service (template).
# `qwen-refresher install-service` writes a filled-in copy of this file to
# ~/.config/systemd/user/ (absolute paths, a PATH that finds `openclaw`, the resolved OpenClaw
# directories) and is the supported way to install it. To use this file by hand instead:
#   mkdir -p -m 0700 ~/.local/state/qwen-refresher
#   cp qwen-refresher.service ~/.config/systemd/user/ && systemctl --user daemon-reload
#   systemctl --user enable --now qwen-refresher
# and make sure ExecStart= points at your qwen-refresher and PATH= finds `openclaw` and `node`."""

_BODY = """\
#
# It refreshes OpenClaw's qwen-portal OAuth tokens before they expire, writes them back under
# OpenClaw's lock and runs on_rotate (by default `openclaw secrets reload`) so the gateway
# picks them up. Logs: journalctl --user -u qwen-refresher. Health: qwen-refresher status.
# Without `loginctl enable-linger $USER` it stops when your last session ends.

[Unit]
Description=qwen-refresher: keep OpenClaw's qwen-portal OAuth tokens fresh
# Ordering only (no dependency): if the gateway is a user service too, start after it so the
# first on_rotate finds it listening. The refresher works without it.
After={gateway_unit}
# Five failed starts in ten minutes and systemd stops trying (see `systemctl --user status`):
# a crash loop would otherwise hammer Qwen's token endpoint with the same refresh token.
StartLimitIntervalSec=10min
StartLimitBurst=5

[Service]
# READY=1 once the stores are loaded, WATCHDOG=1 from the main loop, STOPPING=1 on SIGTERM.
Type=notify
NotifyAccess=main
ExecStart={exec_start}
# SIGHUP re-reads config.toml and rediscovers stores without dropping state.
ExecReload=/bin/kill -HUP $MAINPID
# A main loop silent for a minute is hung; systemd kills it and Restart= starts a fresh one.
WatchdogSec=60s
TimeoutStopSec=30s
Restart=on-failure
RestartSec=15s
# 78 (EX_CONFIG) is a bad setting; restarting cannot fix it, so fail once, loudly.
RestartPreventExitStatus=78
{environment}
# Optional KEY=value lines, e.g. OPENCLAW_GATEWAY_TOKEN if your gateway token is not in
# openclaw.json (keep the file 0600). Secrets never go into this unit.
EnvironmentFile=-%E/qwen-refresher/env
# Stores and journal hold OAuth tokens: everything we create is private to the user.
UMask=0077
# A core dump would hold every token in the daemon's memory: none is ever written (the
# daemon sets RLIMIT_CORE to 0 itself too; under this sandbox it may not call setrlimit).
LimitCORE=0

# Sandbox. `systemd-analyze security --offline=true` (systemd 252) scores this unit 1.9 with the
# filesystem part below; Vault Agent's shipped unit scores 6.0 on the same check.
NoNewPrivileges=yes
# Unix sockets for sd_notify and journald, IPv4/IPv6 for Qwen and the gateway; nothing else.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# A denied call fails with EPERM instead of killing the process (e.g. a best-effort fchown).
SystemCallErrorNumber=EPERM
KeyringMode=private
{memory}{namespaces}
[Install]
WantedBy=default.target
"""

_MEMORY_ON = """\
# No memory that is both writable and executable, so injected code cannot run. Node.js (like
# OpenClaw's CLI) aborts under it, so hooks (on_rotate, on_needs_login) do not inherit it: they
# run through this systemd-run command line, each in a transient unit of its own outside this
# sandbox (qwen-refresher-hook-*.service). Empty runs them inside it (then not Node.js).
MemoryDenyWriteExecute=yes
{runner}
"""

_MEMORY_OFF = """\
# MemoryDenyWriteExecute= left out: this user manager could not run a hook in a unit of its own
# when install-service tried (`systemd-run --user --wait` needs the user's D-Bus session bus,
# e.g. Debian's dbus-user-session), and inside this sandbox Node.js hooks such as OpenClaw's
# CLI would abort under it. Install the bus and re-run install-service to get both.
#MemoryDenyWriteExecute=yes
"""

_NAMESPACES_HEAD = """
# Filesystem and kernel sandbox. In a user manager these need a user namespace (PrivateUsers=).
# The whole tree is read-only except the directories below; "-" skips one that does not exist
# yet (it then stays read-only until the service is restarted after it appears)."""

_NAMESPACES_PARTIAL = """\
# Left out because this machine's user manager refused them in a user namespace when
# install-service probed it (226/NAMESPACE); the rest of the sandbox works here:
# {names}"""

_NAMESPACES_BASIC = """
# Filesystem sandbox (ProtectSystem=strict, ReadWritePaths=, PrivateTmp= ...) left out: this
# machine's user manager cannot create user namespaces (probed at install time; Ubuntu 23.10+
# restricts them through AppArmor). Re-run `qwen-refresher install-service --sandbox full`
# after allowing them (kernel.apparmor_restrict_unprivileged_userns=0).
"""


def _namespace_block(read_write: str, omitted: Sequence[str]) -> str:
    """The namespace part of the unit: every ``NAMESPACE_SETTINGS`` entry not in ``omitted``,
    with ``ReadWritePaths=`` right after the settings that make the tree read-only."""
    if "PrivateUsers" in omitted:
        return _NAMESPACES_BASIC
    lines = [_NAMESPACES_HEAD]
    if omitted:
        lines.append(_NAMESPACES_PARTIAL.format(names=", ".join(f"{n}=" for n in omitted)))
    for name, value in NAMESPACE_SETTINGS:
        if name in omitted:
            continue
        lines.append(f"{name}={value}")
        after_read_only = name == "ProtectHome" or (
            name == "ProtectSystem" and "ProtectHome" in omitted)
        if after_read_only and read_write:
            lines.append(read_write)
    return "\n".join(lines) + "\n"


_SHIPPED_READ_WRITE = ("%h/.openclaw", "%h/.qwen", "%h/.local/state/qwen-refresher")


@dataclass(frozen=True)
class UnitParams:
    """Everything that differs between two installs of the unit."""

    exec_start: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()
    #: Directories the service may write; each is written as ``-<path>`` (missing is fine).
    read_write_paths: tuple[str, ...] = ()
    #: ``NAMESPACE_SETTINGS`` names to leave out; leaving out PrivateUsers leaves out all.
    omitted: tuple[str, ...] = ()
    #: Installed units carry ``MARKER``; the shipped template does not, so a copy of it placed
    #: by hand is treated as the user's own file.
    installed: bool = True
    version: str = ""
    #: Values written as they are, so that specifiers such as ``%h`` work (the shipped
    #: template); installed units escape ``%`` because their paths are literal.
    specifiers: bool = False
    #: ``QWEN_REFRESHER_HOOK_RUNNER`` with ``MemoryDenyWriteExecute=yes``; empty: neither.
    hook_runner: tuple[str, ...] = HOOK_RUNNER


def _escape(text: str, *, specifiers: bool) -> str:
    """``%`` starts a specifier in unit files; a literal one is written ``%%``."""
    return text if specifiers else text.replace("%", "%%")


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_arg(arg: str, *, specifiers: bool = False) -> str:
    """One ExecStart= word: ``$`` would expand a variable, ``%`` a specifier, space splits."""
    text = _escape(arg, specifiers=specifiers).replace("$", "$$")
    if text and not any(c in text for c in " \t\"'\\;"):
        return text
    return _quoted(text)


def _environment_line(name: str, value: str, *, specifiers: bool) -> str:
    return "Environment=" + _quoted(_escape(f"{name}={value}", specifiers=specifiers))


def _path_line(path: str, *, specifiers: bool) -> str:
    text = "-" + _escape(path, specifiers=specifiers)
    if any(c in text for c in " \t\"'\\"):
        text = _quoted(text)
    return f"ReadWritePaths={text}"


def render_unit(params: UnitParams) -> str:
    """The unit file text for ``params``."""
    for value in (*params.exec_start, *params.read_write_paths, *params.hook_runner,
                  *(v for pair in params.environment for v in pair)):
        if "\n" in value or "\r" in value:
            raise ServiceError(f"cannot put a line break into a unit file: {value!r}")
    raw = params.specifiers
    if params.installed:
        marker = MARKER + (f" {params.version}" if params.version else "")
        header = _HEADER_INSTALLED.format(marker=marker)
    else:
        header = _HEADER_SHIPPED
    environment = "\n".join(_environment_line(k, v, specifiers=raw)
                            for k, v in params.environment)
    rw = "\n".join(_path_line(p, specifiers=raw) for p in params.read_write_paths)
    namespaces = _namespace_block(rw, params.omitted)
    memory = _MEMORY_OFF
    if params.hook_runner:
        memory = _MEMORY_ON.format(runner=_environment_line(
            RUNNER_ENV, shlex.join(params.hook_runner), specifiers=raw))
    return header + "\n" + _BODY.format(
        gateway_unit=GATEWAY_UNIT,
        exec_start=" ".join(quote_arg(a, specifiers=raw) for a in params.exec_start),
        environment=environment,
        memory=memory,
        namespaces=namespaces,
    )


def shipped_unit() -> str:
    """``systemd/qwen-refresher.service``: the template with specifiers, scored by CI."""
    return render_unit(UnitParams(
        exec_start=("%h/.local/bin/qwen-refresher", "run"),
        environment=(("PYTHONUNBUFFERED", "1"),),
        read_write_paths=_SHIPPED_READ_WRITE,
        installed=False,
        specifiers=True,
    ))


def is_ours(text: str) -> bool:
    """Whether a unit file was written by install-service (its first line is ``MARKER``)."""
    first = text.lstrip("\ufeff").split("\n", 1)[0]
    return first.startswith(MARKER)


