"""Which store files to manage, and which directories to watch for new ones.

Explicit stores (``--store`` / ``stores = [...]``) are always managed, even before they exist;
OpenClaw's agents are discovered the way OpenClaw lays them out; Qwen Code's file is managed
whenever it exists. Stdlib only, so ``status`` and ``login`` can share it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from . import paths
from .errors import FileMissing, StoreError
from .fileio import read_regular_file, report
from .stores import OpenClawStore, QwenCodeStore, Store


def store_paths(
    *,
    explicit: Iterable[Path],
    discover: bool,
    qwen_code: bool,
    env: Mapping[str, str] | None = None,
) -> list[tuple[Path, str]]:
    """(path, kind) of every store to manage now, explicit ones first, without duplicates.

    A duplicate is the same file under another name (``paths.unique_files``: a symlinked
    state dir, a bind mount); the first spelling is kept, so one lock is never taken twice.
    """
    out: dict[Path, str] = {}
    for path in explicit:
        kind = QwenCodeStore.kind if path.name == paths.QWEN_CREDS_NAME else OpenClawStore.kind
        out.setdefault(Path(path).absolute(), kind)
    if discover:
        for path in paths.discover_openclaw_stores(env):
            out.setdefault(path.absolute(), OpenClawStore.kind)
        for agent_dir in configured_agent_dirs(env):
            store = agent_dir / paths.AUTH_STORE_NAME
            if os.path.lexists(store):
                out.setdefault(store.absolute(), OpenClawStore.kind)
    if qwen_code:
        creds = paths.qwen_code_creds(env)
        if os.path.lexists(creds):
            out.setdefault(creds.absolute(), QwenCodeStore.kind)
    return [(path, out[path]) for path in paths.unique_files(out)]


#: OpenClaw configs are a few KiB; the JSON5 parser takes seconds per 100 KiB, so a file past
#: this is refused from its size rather than parsed for minutes on every rescan.
MAX_CONFIG_BYTES = 256 * 1024
#: Real configs nest about eight levels; the JSON5 parser recurses and dies near fifty.
MAX_CONFIG_DEPTH = 32

#: file -> the problem last reported for it, so a broken config is named once, not per rescan.
_reported: dict[Path, str] = {}
_reported_lock = threading.Lock()


class ConfigUnusable(ValueError):
    """``openclaw.json`` cannot be used; the message names the problem (not the file)."""


def reset_reports() -> None:
    """Forget which config problems were reported: a reload names them again, once."""
    with _reported_lock:
        _reported.clear()


def _report_once(config: Path, problem: str | None) -> None:
    with _reported_lock:
        if problem is None:
            _reported.pop(config, None)
            return
        if _reported.get(config) == problem:
            return
        _reported[config] = problem
    report("openclaw_config_unusable", file=str(config), error=problem,
           message="agent directories set in it (agents.list[].agentDir) are not managed "
                   "until it is fixed; the agents under the state dir still are")


def json5_depth(text: str) -> int:
    """How deep ``[``/``{`` nest in a JSON5 text, skipping strings and comments.

    Counted before parsing, because the JSON5 parser recurses per level and a 60-deep file
    raises ``RecursionError`` inside it.
    """
    depth = best = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'":
            quote = ch
            i += 1
            while i < n and text[i] != quote:
                i += 2 if text[i] == "\\" else 1
        elif ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif ch == "/" and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 1
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
        i += 1
    return best


def load_openclaw_config(config: Path) -> object:
    """Parse ``openclaw.json`` (JSON5) safely: ``ConfigUnusable`` for a file we must not use.

    A symlink is followed, as OpenClaw follows it: dotfile managers (GNU stow, chezmoi, Nix
    home-manager) link ``openclaw.json`` into place, and refusing it would silently leave
    every agent with its own ``agentDir`` unmanaged. The config holds no secret and we never
    write it, so following a link cannot leak or clobber anything; what is at the end of the
    link gets the full treatment of ``fileio.read_regular_file`` (as ``config._check_toml``
    reads our own config): a FIFO cannot hang us, a directory or device is refused, the size
    is capped. Then depth-checked before parsing, and parsed as plain JSON first, which is
    what OpenClaw writes and costs microseconds; JSON5 only when that fails.
    """
    try:
        real = config.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        raise ConfigUnusable("is a symlink that cannot be resolved (a loop?)") from None
    try:
        data = read_regular_file(real, MAX_CONFIG_BYTES, shown=config).data
    except FileMissing:
        return None
    except StoreError as exc:
        raise ConfigUnusable(exc.problem) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigUnusable(f"is not valid UTF-8 (byte {exc.start})") from None
    if json5_depth(text) > MAX_CONFIG_DEPTH:
        raise ConfigUnusable(f"nests deeper than {MAX_CONFIG_DEPTH} levels")
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigUnusable("nests too deeply to parse") from None
    except ValueError:
        pass
    import json5

    try:
        return json5.loads(text)
    except RecursionError:
        raise ConfigUnusable("nests too deeply to parse") from None
    except ValueError as exc:
        raise ConfigUnusable(f"is not valid JSON5: {str(exc)[:200]}") from None


def configured_agent_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    """Agent dirs set in ``openclaw.json`` (``agents.list[].agentDir``), which may live anywhere.

    A config we cannot use adds nothing, and is named once in an ``openclaw_config_unusable``
    warning: the layout under ``<state>/agents`` still covers every agent without an override.
    """
    config = paths.openclaw_config_file(env)
    try:
        doc = load_openclaw_config(config)
    except ConfigUnusable as exc:
        _report_once(config, str(exc))
        return []
    _report_once(config, None)
    agents = doc.get("agents") if isinstance(doc, dict) else None
    entries = agents.get("list") if isinstance(agents, dict) else None
    found: list[Path] = []
    for entry in entries if isinstance(entries, list) else []:
        raw = entry.get("agentDir") if isinstance(entry, dict) else None
        if isinstance(raw, str) and raw.strip():
            found.append(paths.expand_user_path(raw, env))
    return found


def open_store(path: Path, kind: str) -> Store:
    from .stores import STORE_KINDS

    return STORE_KINDS[kind](path)


def watch_dirs(
    stores: Iterable[Path],
    *,
    discover: bool,
    qwen_code: bool,
    env: Mapping[str, str] | None = None,
) -> dict[Path, bool]:
    """Directories whose changes can add, replace or remove a store -> watch recursively?

    Files are never watched directly: OpenClaw, editors and we ourselves replace them, and a
    watch on a replaced inode goes silent. OpenClaw's ``agents/`` dir is watched recursively,
    one watch for any number of agents (a watch per agent costs a thread each in watchdog).
    The nearest existing ancestor stands in for a directory that does not exist yet, so a
    first login is noticed without waiting for a sweep.
    """
    wanted: dict[Path, bool] = {}
    if discover:
        state = paths.openclaw_state_dir(env)
        agents = state / "agents"
        if agents.is_dir():
            wanted[agents] = True
        else:
            wanted[state] = False
        wanted.setdefault(paths.main_agent_dir(env), False)
        for agent_dir in configured_agent_dirs(env):
            wanted.setdefault(agent_dir, False)
    for store in stores:
        wanted.setdefault(Path(store).parent, False)
    if qwen_code:
        wanted.setdefault(paths.qwen_home(env), False)
    result: dict[Path, bool] = {}
    for directory, recursive in wanted.items():
        existing = directory
        while not existing.is_dir() and existing != existing.parent:
            existing = existing.parent
            recursive = False
        if any(r and existing.is_relative_to(d) for d, r in result.items()):
            continue  # already inside a recursive watch
        result[existing] = result.get(existing, False) or recursive
    return result
