"""OpenClaw's own path rules, reproduced: state dir, agent dirs, config-file agent dirs."""

from __future__ import annotations

from pathlib import Path

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
