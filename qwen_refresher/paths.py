"""Where things are: OpenClaw's state and agent dirs, Qwen Code's home, our own XDG dirs.

Resolution follows OpenClaw's own ``resolveStateDir``/``resolveOpenClawAgentDir`` so that we
manage exactly the files the gateway uses. Stdlib only: ``status`` calls this on every run.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

AUTH_STORE_NAME = "auth-profiles.json"
QWEN_CREDS_NAME = "oauth_creds.json"
LEGACY_STATE_DIRNAMES = (".clawdbot", ".moldbot", ".moltbot")
NEW_STATE_DIRNAME = ".openclaw"
DEFAULT_AGENT_ID = "main"


def sibling_name(path: Path, tag: str) -> str:
    """A fresh name beside ``path`` for a short-lived file: ``.<name>.<12 hex>.<tag>``.

    A ``str``, never a ``Path``: ``pathlib`` interns every part of a path it parses, and a
    name made once per refresh (a temporary file, a lock's) churned the interpreter's table
    of interned strings, whose periodic 1-2 MB rebuilds fragmented the heap under token
    churn (issue 16). ``os`` calls take the ``str`` as they are.
    """
    return os.path.join(os.path.dirname(path),
                        f".{os.path.basename(path)}.{secrets.token_hex(6)}.{tag}")


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _expand(raw: str, env: Mapping[str, str]) -> Path:
    """Expand a leading ``~`` against the OpenClaw home, as OpenClaw's resolveUserPath does."""
    raw = raw.strip()
    if raw == "~" or raw.startswith("~/"):
        return openclaw_home(env) / raw[2:] if raw != "~" else openclaw_home(env)
    return Path(raw).absolute()


def expand_user_path(raw: str, env: Mapping[str, str] | None = None) -> Path:
    """OpenClaw's ``resolveUserPath``: ``~`` is the OpenClaw home, relative paths are absolute."""
    return _expand(raw, _env(env))


def openclaw_home(env: Mapping[str, str] | None = None) -> Path:
    """``$OPENCLAW_HOME`` replaces ``~`` in every OpenClaw path; else the user's home."""
    e = _env(env)
    override = e.get("OPENCLAW_HOME", "").strip()
    if override:
        if override.startswith("~"):
            return Path(e.get("HOME") or Path.home()).joinpath(override[2:])
        return Path(override).absolute()
    home = e.get("HOME", "").strip()
    return Path(home) if home else Path.home()


def openclaw_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """OpenClaw's state dir, resolved in OpenClaw's order.

    ``$OPENCLAW_STATE_DIR``, then ``$CLAWDBOT_STATE_DIR``, then ``~/.openclaw`` if it exists, then
    the first existing legacy dir, else ``~/.openclaw`` (which may not exist yet).
    """
    e = _env(env)
    for var in ("OPENCLAW_STATE_DIR", "CLAWDBOT_STATE_DIR"):
        value = e.get(var, "").strip()
        if value:
            return _expand(value, e)
    home = openclaw_home(e)
    new_dir = home / NEW_STATE_DIRNAME
    if new_dir.exists():
        return new_dir
    for name in LEGACY_STATE_DIRNAMES:
        legacy = home / name
        if legacy.exists():
            return legacy
    return new_dir


def main_agent_dir(env: Mapping[str, str] | None = None) -> Path:
    """The main agent's dir: ``$OPENCLAW_AGENT_DIR`` / ``$PI_CODING_AGENT_DIR`` win."""
    e = _env(env)
    for var in ("OPENCLAW_AGENT_DIR", "PI_CODING_AGENT_DIR"):
        value = e.get(var, "").strip()
        if value:
            return _expand(value, e)
    return openclaw_state_dir(e) / "agents" / DEFAULT_AGENT_ID / "agent"


def openclaw_config_file(env: Mapping[str, str] | None = None) -> Path:
    """``$OPENCLAW_CONFIG_PATH``, else ``openclaw.json`` (or a legacy name) in the state dir."""
    e = _env(env)
    override = e.get("OPENCLAW_CONFIG_PATH", "").strip()
    if override:
        return _expand(override, e)
    state = openclaw_state_dir(e)
    for name in ("openclaw.json", "clawdbot.json", "moldbot.json"):
        if (state / name).exists():
            return state / name
    return state / "openclaw.json"


def discover_openclaw_stores(env: Mapping[str, str] | None = None) -> list[Path]:
    """Every agent's ``auth-profiles.json`` that exists now, plus the main agent's override.

    Agents that do not exist yet are found by the watcher on ``<state>/agents`` and the sweep.
    """
    e = _env(env)
    agents = str(openclaw_state_dir(e) / "agents")
    # Strings until a store is found: every sweep lists every agent, and at 1,000 agents the
    # pathlib spelling (a sorted list of Paths, two joins each, a linear ``in``) was a third
    # of a sweep's CPU. Sorting names sorts the Paths the same way (same parent).
    try:
        with os.scandir(agents) as listing:
            names = sorted(entry.name for entry in listing)
    except OSError:
        names = []
    found: list[Path] = []
    seen: set[str] = set()
    prefix, suffix = os.path.join(agents, ""), f"/agent/{AUTH_STORE_NAME}"
    for name in names:
        candidate = prefix + name + suffix  # os.path.join's result: a name holds no "/"
        try:
            os.lstat(candidate)  # os.path.lexists, without its frame
        except (OSError, ValueError):
            continue
        found.append(Path(candidate))
        seen.add(candidate)
    main = main_agent_dir(e) / AUTH_STORE_NAME
    if str(main) not in seen and os.path.lexists(main):
        found.append(main)
    return found


def unique_files(candidates: Iterable[Path]) -> list[Path]:
    """``candidates`` made absolute, each store once, under the first spelling given.

    One store can be reached by several names: a symlinked OpenClaw state dir plus a
    ``--store`` or an ``agentDir`` spelling the real path, a bind-mounted directory, ``..``
    in a path. Managed twice, it becomes two stores sharing one lock file, and a refresh that
    takes that lock for each of them waits on itself until its lock timeout, on every run:
    the profile is never refreshed.

    So two paths are one store when they name the same directory entry: the same file name
    in the same real directory, the directory known by ``(st_dev, st_ino)`` (``stat``
    follows every symlink, and bind mounts share the inode), or, for a directory that does
    not exist yet, by its ``realpath``. That is exactly the lock's identity (OpenClaw locks
    ``realpath(dir)/<name>.lock``) and the entry our rename replaces. A store file that is
    itself a symlink to another store is NOT merged with it: OpenClaw locks it under its own
    name, and if it leaves its directory the store check refuses it with an error; merging by
    the target could let such a refused spelling shadow the usable one. The first spelling
    wins, so an explicit ``--store`` keeps the name the user gave.

    THE rule for "same store": the daemon (``discovery.store_paths``), ``login`` and
    ``status`` all call it, so they agree on what is managed. Stdlib only; one ``stat`` per
    path (measured: about 9 ms per 1,000 stores; ``realpath`` alone costs 48 ms).
    """
    seen: set[object] = set()
    out: list[Path] = []
    for candidate in candidates:
        path = candidate.absolute()
        # text, no Path built: an absolute Path's text has one "/" before its name
        directory, _, name = os.fspath(path).rpartition("/")
        try:
            # follows every symlink: one identity for every spelling
            st = os.stat(directory or "/")
            key: object = (st.st_dev, st.st_ino, name)
        except (OSError, ValueError):
            key = (os.path.realpath(path.parent), path.name)  # only when there is no dir
        if key in seen:
            continue
        seen.add(key)
        out.append(path)
    return out


def qwen_home(env: Mapping[str, str] | None = None) -> Path:
    """Qwen Code's dir: ``$QWEN_HOME`` else ``~/.qwen``."""
    e = _env(env)
    value = e.get("QWEN_HOME", "").strip()
    if value:
        return Path(value).expanduser().absolute()
    home = e.get("HOME", "").strip()
    return (Path(home) if home else Path.home()) / ".qwen"


def qwen_code_creds(env: Mapping[str, str] | None = None) -> Path:
    return qwen_home(env) / QWEN_CREDS_NAME


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/qwen-refresher`` (``~/.local/state/qwen-refresher``).

    Worked out as text by ``settings_core`` (status resolves it without ``pathlib``)."""
    from .settings_core import default_state_dir_text

    return Path(default_state_dir_text(_env(env)))


def default_config_file(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/qwen-refresher/config.toml`` (text: ``settings_core``)."""
    from .settings_core import default_config_file_text

    return Path(default_config_file_text(_env(env)))


def shorten_home(path: Path | str, env: Mapping[str, str] | None = None) -> str:
    """Show a path with the home dir as ``~``: shorter rows in ``status``, same meaning
    (``report.shorten_home``, its one home: status renders without ``pathlib``)."""
    from .report import shorten_home as shorten

    return shorten(path, env)


def anchor_dirs(env: Mapping[str, str] | None = None) -> tuple[Path, Path]:
    """The directories a store's path can be trusted from (``store_anchor``): OpenClaw's
    state dir and Qwen Code's home, looked up once for a discovery's many stores."""
    e = _env(env)
    return openclaw_state_dir(e), qwen_home(e)


def store_anchor(store: Path, env: Mapping[str, str] | None = None, *,
                 bases: Iterable[Path] | None = None) -> Path | None:
    """The directory a store's path is trusted from: OpenClaw's state dir or Qwen Code's home.

    Every directory between the anchor and the store must be ours and not a symlink leading
    elsewhere (``fileio.check_parents``): a symlinked ``agents/<id>/agent`` would otherwise
    make us manage a file outside OpenClaw's tree. None for a store anywhere else (only its
    own directory is checked then). ``bases``: ``anchor_dirs(env)`` when the caller has it
    already (one discovery, a thousand stores: each lookup is an ``exists()`` or two).
    """
    inner = store.parts[:-1]  # the parent's parts, without building the parent
    for base in anchor_dirs(env) if bases is None else bases:
        # ``store.parent == base or base in store.parents``, by parts: pathlib's spelling
        # builds a Path per ancestor, once per store at start-up (1,000 stores: measurable).
        if inner[:len(base.parts)] == base.parts:
            return base
    return None
