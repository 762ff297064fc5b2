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
    if qwen_code:
        creds = paths.qwen_code_creds(env)
        if os.path.lexists(creds):
            out.setdefault(creds.absolute(), QwenCodeStore.kind)
    return list(out.items())


def open_store(path: Path, kind: str) -> Store:
    from .stores import STORE_KINDS

    return STORE_KINDS[kind](path)


def watch_dirs(
    stores: Iterable[Path],
    *,
    discover: bool,
    qwen_code: bool,
    env: Mapping[str, str] | None = None,
) -> list[Path]:
    """Directories whose changes can add, replace or remove a store.

    Files are never watched directly: OpenClaw, editors and we ourselves replace them, and a
    watch on a replaced inode goes silent. The nearest existing ancestor stands in for a
    directory that does not exist yet, so a first login is noticed without waiting for a sweep.
    """
    wanted: list[Path] = [Path(p).parent for p in stores]
    if discover:
        state = paths.openclaw_state_dir(env)
        agents = state / "agents"
        wanted += [state, agents]
        try:
            wanted += [entry / "agent" for entry in agents.iterdir() if entry.is_dir()]
            wanted += [entry for entry in agents.iterdir() if entry.is_dir()]
        except OSError:
            pass
        wanted.append(paths.main_agent_dir(env))
    if qwen_code:
        wanted.append(paths.qwen_home(env))
    result: list[Path] = []
    for directory in wanted:
        existing = directory
        while not existing.is_dir() and existing != existing.parent:
            existing = existing.parent
        if existing not in result:
            result.append(existing)
    return result
