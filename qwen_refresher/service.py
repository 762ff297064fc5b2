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
every store the daemon manages. The commands themselves (parse, ask, print) are
``commands/service.py``; this module renders the unit and talks to systemd.

Stdlib only, imported only when one of the two commands runs.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import hooks, paths, settings_core
from .errors import ServiceError

UNIT_NAME = "qwen-refresher.service"
#: The environment variable of the ``hook_runner`` setting.
RUNNER_ENV = "QWEN_REFRESHER_HOOK_RUNNER"
#: First line of every unit we write; a unit without it is someone else's and is not touched.
MARKER = "# Written by qwen-refresher install-service"
#: OpenClaw's own user unit (``openclaw gateway install``); we start after it when both exist.
GATEWAY_UNIT = "openclaw-gateway.service"
SYSTEMCTL_TIMEOUT = 60.0
PROBE_TIMEOUT = 30.0
#: The linger flag files logind keeps, one per user (``loginctl enable-linger``).
LINGER_DIR = Path("/var/lib/systemd/linger")
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


# --- resolving what the unit needs -------------------------------------------------------------

@dataclass
class Resolved:
    """What ``install-service`` found on this machine; the unit is rendered from it."""

    exec_start: tuple[str, ...]
    environment: list[tuple[str, str]]
    read_write_paths: list[Path]
    #: the stores a daemon started by this unit manages now (``settings_core.store_paths``)
    stores: list[Path]
    state_dir: Path
    openclaw_state_dir: Path
    qwen_home: Path
    openclaw_cli: str | None
    warnings: list[str] = field(default_factory=list)


def resolve_exec_start(env: Mapping[str, str], argv0: str | None = None) -> tuple[str, ...]:
    """The command systemd should run: this very installation of qwen-refresher.

    The running console script wins over the first one on PATH (someone running
    ``~/venvs/x/bin/qwen-refresher install-service`` means that one). Symlinks are kept, not
    resolved: pipx's ``~/.local/bin/qwen-refresher`` survives upgrades, its target does not.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    if argv0 and Path(argv0).name.startswith("qwen-refresher"):
        if os.sep in argv0:
            candidate = Path(argv0).expanduser().absolute()
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return (str(candidate), "run")
        else:
            found = shutil.which(argv0, path=env.get("PATH"))
            if found:
                return (str(Path(found).absolute()), "run")
    found = shutil.which("qwen-refresher", path=env.get("PATH"))
    if found:
        return (str(Path(found).absolute()), "run")
    # Installed without its console script (e.g. ``python -m qwen_refresher``): run the module
    # with this interpreter, unresolved so a venv's python keeps finding its site-packages.
    return (str(Path(sys.executable).absolute()), "-m", "qwen_refresher", "run")


def configured(env: Mapping[str, str], warnings: list[str]) -> settings_core.CoreSettings:
    """The daemon's own resolution of what it manages (``settings_core.resolve``: environment,
    then the config file), as far as the sandbox needs it.

    A setting or file the daemon would refuse is a warning here, not a failure: the unit is
    still written (the daemon names the problem and exits 78 when it starts), with what could
    be read.
    """
    try:
        core = settings_core.resolve(env)
    except settings_core.SettingsError as exc:
        warnings.append(f"{exc}; the service will fail to start until it is fixed")
        try:
            core = settings_core.resolve(env, file={})
        except settings_core.SettingsError:
            core = settings_core.CoreSettings(paths.default_state_dir(env))
    if "hook_runner" in core.file:
        warnings.append(f"{core.config_file} sets hook_runner, but the unit's {RUNNER_ENV} "
                        "takes precedence; change it with `systemctl --user edit "
                        f"qwen-refresher` ([Service] / Environment={RUNNER_ENV}=...)")
    return core


def _tool_dirs(env: Mapping[str, str], exec_start: Sequence[str]) -> tuple[list[str], str | None]:
    """PATH entries for the unit, and OpenClaw's CLI if found.

    The user manager's PATH rarely contains ``~/.npm-global/bin`` or an nvm directory, and
    without ``openclaw`` on PATH the default ``on_rotate`` (auto) silently does nothing. The
    ``openclaw`` launcher is ``#!/usr/bin/env node``, so the directory of ``node`` is needed
    too; the one next to ``openclaw`` first (nvm keeps both in one bin directory).
    """
    search = env.get("PATH")
    openclaw = shutil.which("openclaw", path=search)
    node = shutil.which("node", path=search)
    found = [Path(exec_start[0]).parent]
    found += [Path(tool).absolute().parent for tool in (openclaw, node) if tool]
    dirs: list[str] = []
    for entry in [*(str(d) for d in found if str(d) not in BASE_PATH), *BASE_PATH]:
        if entry not in dirs:
            dirs.append(entry)
    return dirs, (str(Path(openclaw).absolute()) if openclaw else None)


def _writable_dirs(candidates: Iterable[Path]) -> list[Path]:
    """Deduplicated, parents before children dropped: one ``ReadWritePaths=`` per subtree."""
    unique: list[Path] = []
    for path in candidates:
        if path not in unique:
            unique.append(path)
    kept: list[Path] = []
    for path in unique:
        if any(path != other and path.is_relative_to(other) for other in unique):
            continue
        kept.append(path)
    return kept


def resolve(env: Mapping[str, str] | None = None, argv0: str | None = None) -> Resolved:
    """Work out the unit's paths and environment for the current user."""
    e: Mapping[str, str] = os.environ if env is None else env
    warnings: list[str] = []
    exec_start = resolve_exec_start(e, argv0)
    openclaw_dir = paths.openclaw_state_dir(e)
    qwen_dir = paths.qwen_home(e)
    core = configured(e, warnings)
    state_dir = core.state_dir

    writable: list[Path] = [openclaw_dir]
    if any(e.get(v, "").strip() for v in ("OPENCLAW_AGENT_DIR", "PI_CODING_AGENT_DIR")):
        writable.append(paths.main_agent_dir(e))
    problems: list[tuple[Path, str]] = []
    if core.discover:
        # Agent dirs set in openclaw.json, even before their store exists: a first login
        # there must be writable by the sandboxed service.
        writable += settings_core.configured_agent_dirs(e, problems)
    writable += [qwen_dir, state_dir]
    # Exactly the stores the daemon will manage (settings_core.store_paths, the daemon's own
    # discovery), and the targets of symlinked ones: OpenClaw's lock file is
    # ``<realpath>.lock`` and our atomic write puts its temporary file next to the target.
    stores = [path for path, _ in core.store_paths(e)]
    for store in stores:
        writable.append(store.parent)
        real = Path(os.path.realpath(store))
        if real != store:
            writable.append(real.parent)
    for config, problem in problems:
        warnings.append(f"{config} {problem}: agent dirs set in it (agents.list[].agentDir) "
                        "are neither managed nor writable until it is fixed")

    path_dirs, openclaw_cli = _tool_dirs(e, exec_start)
    environment: list[tuple[str, str]] = [
        ("PATH", ":".join(path_dirs)),
        ("PYTHONUNBUFFERED", "1"),
        ("OPENCLAW_STATE_DIR", str(openclaw_dir)),
        ("QWEN_HOME", str(qwen_dir)),
    ]
    for name in PASS_THROUGH_ENV:
        value = e.get(name, "").strip()
        if value and name not in dict(environment):
            environment.append((name, value))
    if openclaw_cli is None:
        warnings.append("`openclaw` is not on PATH: with on_rotate = auto the gateway will not "
                        "be told to reload after a rotation; set on_rotate in config.toml")
    return Resolved(
        exec_start=exec_start,
        environment=environment,
        read_write_paths=_writable_dirs(writable),
        stores=stores,
        state_dir=state_dir,
        openclaw_state_dir=openclaw_dir,
        qwen_home=qwen_dir,
        openclaw_cli=openclaw_cli,
        warnings=warnings,
    )


def unit_params(resolved: Resolved, omitted: Sequence[str] = (), version: str = "",
                hook_runner: Sequence[str] = HOOK_RUNNER) -> UnitParams:
    return UnitParams(
        exec_start=resolved.exec_start,
        environment=tuple(resolved.environment),
        read_write_paths=tuple(str(p) for p in resolved.read_write_paths),
        omitted=tuple(omitted),
        installed=True,
        version=version,
        hook_runner=tuple(hook_runner),
    )


def default_unit_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/systemd/user``: where a user manager looks for the user's units."""
    return paths.default_config_file(env).parent.parent / "systemd" / "user"


# --- talking to systemd ------------------------------------------------------------------------

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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(0o644)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ServiceError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_existing(path: Path) -> str | None:
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""  # unreadable or a dangling symlink: certainly not a unit we wrote


#: The commands' half, ``commands/service.py``, under its old names here.
_COMMAND_NAMES = frozenset({"add_parsers", "install", "uninstall"})


def __getattr__(name: str) -> object:
    """``service.add_parsers``/``install``/``uninstall`` live in ``commands.service``, which
    imports this module: fetched lazily, no import cycle."""
    if name in _COMMAND_NAMES:
        from .commands import service as command

        return getattr(command, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
