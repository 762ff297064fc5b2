"""OpenClaw's own path rules, reproduced: state dir, agent dirs, config-file agent dirs."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher import discovery, paths


def make(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_state_dir_order(tmp_path: Path) -> None:
    home = make(tmp_path / "h")
    env = {"HOME": str(home)}
    assert paths.openclaw_state_dir(env) == home / ".openclaw"  # nothing exists yet
    make(home / ".moltbot")
    assert paths.openclaw_state_dir(env) == home / ".moltbot"
    make(home / ".clawdbot")
    assert paths.openclaw_state_dir(env) == home / ".clawdbot"
    make(home / ".openclaw")
    assert paths.openclaw_state_dir(env) == home / ".openclaw"
    env["CLAWDBOT_STATE_DIR"] = str(tmp_path / "c")
    assert paths.openclaw_state_dir(env) == tmp_path / "c"
    env["OPENCLAW_STATE_DIR"] = "~/elsewhere"
    assert paths.openclaw_state_dir(env) == home / "elsewhere"


def test_openclaw_home_replaces_home(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "h"), "OPENCLAW_HOME": str(tmp_path / "oc")}
    assert paths.openclaw_state_dir(env) == tmp_path / "oc" / ".openclaw"


def test_agent_dir_override(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "OPENCLAW_AGENT_DIR": str(tmp_path / "ag")}
    assert paths.main_agent_dir(env) == tmp_path / "ag"
    env = {"HOME": str(tmp_path), "PI_CODING_AGENT_DIR": str(tmp_path / "pi")}
    assert paths.main_agent_dir(env) == tmp_path / "pi"


def test_every_agent_is_discovered(tmp_path: Path) -> None:
    state = tmp_path / ".openclaw"
    for agent in ("main", "work", "empty"):
        make(state / "agents" / agent / "agent")
    (state / "agents/main/agent/auth-profiles.json").write_text("{}")
    (state / "agents/work/agent/auth-profiles.json").write_text("{}")
    found = paths.discover_openclaw_stores({"HOME": str(tmp_path)})
    assert [p.parts[-3] for p in found] == ["main", "work"]


def test_agent_dirs_from_openclaw_json5(tmp_path: Path) -> None:
    state = make(tmp_path / ".openclaw")
    (state / "openclaw.json").write_text(
        "{\n  // JSON5, as OpenClaw writes and reads it\n"
        "  agents: { list: [ { id: 'x', agentDir: '~/custom/x', }, { id: 'y' } ] },\n}\n")
    store = make(tmp_path / "custom" / "x") / "auth-profiles.json"
    env = {"HOME": str(tmp_path)}
    assert discovery.configured_agent_dirs(env) == [tmp_path / "custom" / "x"]
    assert discovery.store_paths(explicit=[], discover=True, qwen_code=False, env=env) == []
    store.write_text("{}")
    assert discovery.store_paths(explicit=[], discover=True, qwen_code=False, env=env) == [
        (store, "openclaw")]


def test_a_broken_openclaw_json_adds_nothing(tmp_path: Path) -> None:
    (make(tmp_path / ".openclaw") / "openclaw.json").write_text("{ agents: [ ")
    assert discovery.configured_agent_dirs({"HOME": str(tmp_path)}) == []


def test_qwen_code_file_is_managed_only_when_present(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    assert discovery.store_paths(explicit=[], discover=False, qwen_code=True, env=env) == []
    creds = make(tmp_path / ".qwen") / "oauth_creds.json"
    creds.write_text("{}")
    assert discovery.store_paths(explicit=[], discover=False, qwen_code=True, env=env) == [
        (creds, "qwen-code")]
    assert discovery.store_paths(explicit=[], discover=False, qwen_code=False, env=env) == []
    env["QWEN_HOME"] = str(tmp_path / "q2")
    assert discovery.store_paths(explicit=[], discover=False, qwen_code=True, env=env) == []


# -- sibling_name: short-lived names that pathlib never interns ------------------------------


def _interned(name: str) -> bool:
    """True if an equal string is already in the interpreter's table of interned strings (a
    fresh copy of ``name`` is not the object ``sys.intern`` hands back)."""
    copy = "".join(list(name))
    return sys.intern(copy) is not copy


def test_sibling_name_is_a_fresh_plain_string_beside_the_file(tmp_path: Path) -> None:
    store = tmp_path / "agents" / "auth-profiles.json"
    first, second = paths.sibling_name(store, "tmp"), paths.sibling_name(store, "tmp")
    assert type(first) is str and first != second
    assert re.fullmatch(re.escape(str(store.parent)) + r"/\.auth-profiles\.json\.[0-9a-f]{12}\.tmp",
                        first)
    assert not _interned(os.path.basename(first))
    # What it replaced: pathlib interns every part it parses, so each name stayed in the
    # interpreter's table until its Path died, churning it once per refresh (issue 16).
    assert _interned((store.parent / f".x.{os.urandom(6).hex()}.tmp").name)


def test_atomic_writes_and_lock_takes_intern_none_of_their_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_refresher.fileio import atomic_write
    from qwen_refresher.lockfile import OPENCLAW, FileLock

    opened: list[object] = []
    real_open = os.open

    def recording_open(path: Any, *args: Any, **kw: Any) -> int:
        opened.append(path)
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "open", recording_open)
    store = tmp_path / "auth-profiles.json"
    for n in range(3):
        atomic_write(store, b"{}" * n)
        lock = FileLock(tmp_path / "auth-profiles.json.lock", OPENCLAW, timeout=5)
        lock.acquire()
        lock.release()
    temps = [p for p in opened if str(p).endswith(".tmp")]
    assert len(temps) == 6, opened  # 3 writes, 3 lock files (made whole, then linked)
    for path in temps:
        assert type(path) is str and not _interned(os.path.basename(path)), path
    assert sorted(os.listdir(tmp_path)) == ["auth-profiles.json"]
