"""Which store files the daemon manages, and which directories it watches for new ones.

The resolution itself is ``settings_core``'s (one copy, shared with ``status`` and
``install-service``): explicit stores (``--store`` / ``stores = [...]``) are always managed,
even before they exist; OpenClaw's agents are discovered the way OpenClaw lays them out,
including agent dirs set in ``openclaw.json``; Qwen Code's file is managed whenever it exists.
This module adds what only the daemon needs: a broken ``openclaw.json`` named once in the log
(not on every rescan), the store adapters, and the directories to watch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from . import paths, settings_core
from .errors import ConfigUnusable
from .fileio import report
from .settings_core import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    json5_depth,
    load_openclaw_config,
)
from .stores import STORE_KINDS, Store

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "ConfigUnusable",
    "configured_agent_dirs",
    "json5_depth",
    "load_openclaw_config",
    "open_store",
    "reset_reports",
    "store_paths",
    "watch_dirs",
]

#: file -> the problem last reported for it, so a broken config is named once, not per rescan.
_reported: dict[Path, str] = {}
_reported_lock = threading.Lock()


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


def _settle(problems: list[tuple[Path, str]], env: Mapping[str, str] | None,
            discover: bool) -> None:
    """Log each ``openclaw.json`` problem once; forget it once the file is usable again."""
    if not discover:
        return
    if problems:
        for config, problem in problems:
            _report_once(config, problem)
    else:
        _report_once(paths.openclaw_config_file(env), None)


def store_paths(
    *,
    explicit: Iterable[Path],
    discover: bool,
    qwen_code: bool,
    env: Mapping[str, str] | None = None,
) -> list[tuple[Path, str]]:
    """(path, kind) of every store to manage now: ``settings_core.store_paths``, with a
    broken ``openclaw.json`` named once in the log."""
    problems: list[tuple[Path, str]] = []
    found = settings_core.store_paths(explicit=explicit, discover=discover,
                                      qwen_code=qwen_code, env=env, problems=problems)
    _settle(problems, env, discover)
    return found


def configured_agent_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    """Agent dirs set in ``openclaw.json`` (``settings_core.configured_agent_dirs``); a config
    we cannot use adds nothing, and is named once in an ``openclaw_config_unusable`` warning."""
    problems: list[tuple[Path, str]] = []
    found = settings_core.configured_agent_dirs(env, problems)
    _settle(problems, env, True)
    return found


def open_store(path: Path, kind: str, *, anchors: Iterable[Path] | None = None) -> Store:
    """The adapter for the store at ``path``; ``anchors``: ``paths.anchor_dirs()`` when
    opening many at once (looked up once, not per store)."""
    return STORE_KINDS[kind](path, anchors=anchors)


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
    wanted: dict[str, bool] = {}
    if discover:
        state = paths.openclaw_state_dir(env)
        agents = state / "agents"
        if agents.is_dir():
            wanted[str(agents)] = True
        else:
            wanted[str(state)] = False
        wanted.setdefault(str(paths.main_agent_dir(env)), False)
        for agent_dir in configured_agent_dirs(env):
            wanted.setdefault(str(agent_dir), False)
    for store in stores:
        # Text, not ``Path(store).parent``: this runs on every sweep, once per store (P
        # measured pathlib here at a third of a sweep over 1,000 stores).
        wanted.setdefault(os.path.dirname(store), False)
    if qwen_code:
        wanted.setdefault(str(paths.qwen_home(env)), False)
    result: dict[str, bool] = {}
    roots: list[str] = []  # recursive watches, as "dir/": what lies under one is covered
    for directory, recursive in wanted.items():
        if any(directory.startswith(root) for root in roots):
            continue  # already inside a recursive watch (so is its nearest existing ancestor)
        existing = directory
        while not os.path.isdir(existing) and existing != os.path.dirname(existing):
            existing = os.path.dirname(existing)
            recursive = False
        if existing != directory and any((existing + "/").startswith(root) for root in roots):
            continue
        result[existing] = result.get(existing, False) or recursive
        if recursive:
            roots.append(existing.rstrip("/") + "/")
    return {Path(directory): recursive for directory, recursive in result.items()}
