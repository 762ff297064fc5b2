"""Which store files to manage, and which directories to watch for new ones.

Explicit stores (``--store`` / ``stores = [...]``) are always managed, even before they exist;
OpenClaw's agents are discovered the way OpenClaw lays them out; Qwen Code's file is managed
whenever it exists. Stdlib only, so ``status`` and ``login`` can share it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from . import paths
from .stores import OpenClawStore, QwenCodeStore, Store


def store_paths(
    *,
    explicit: Iterable[Path],
    discover: bool,
    qwen_code: bool,
    env: Mapping[str, str] | None = None,
) -> list[tuple[Path, str]]:
    """(path, kind) of every store to manage now, explicit ones first, without duplicates."""
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
    return list(out.items())


def configured_agent_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    """Agent dirs set in ``openclaw.json`` (``agents.list[].agentDir``), which may live anywhere.

    OpenClaw's config is JSON5, hence the json5 parser. A config we cannot read adds nothing:
    the layout under ``<state>/agents`` still covers every agent without an override.
    """
    config = paths.openclaw_config_file(env)
    try:
        text = config.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    import json5

    try:
        doc = json5.loads(text)
    except ValueError:
        return []
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
