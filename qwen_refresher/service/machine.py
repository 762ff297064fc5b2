"""What the unit needs from this machine: the command to run, the directories the sandbox must
leave writable (the daemon's own settings and discovery, ``settings_core``), and a PATH that
finds ``openclaw`` and ``node`` for the ``on_rotate`` hook.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import paths, settings_core
from .unit import BASE_PATH, HOOK_RUNNER, PASS_THROUGH_ENV, RUNNER_ENV, UnitParams

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

