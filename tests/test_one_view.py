"""``status`` and ``install-service`` see exactly the stores the daemon sees (issue 14).

Store discovery once lived in three places (the daemon's ``discovery.store_paths``,
``status.managed_stores``, ``service.resolve``) and they drifted: agent dirs configured in
``openclaw.json`` (``agents.list[].agentDir``) were found by the daemon only, so ``status``
without a daemon did not show them and ``install-service`` left them out of
``ReadWritePaths=`` (the sandboxed service could not write those stores). Now all three ask
``settings_core``; these tests hold them to the real daemon's published list.

Everything is real: the daemon runs as a subprocess against the loopback fake Qwen server,
``status`` and ``install-service --dry-run`` run as the real CLI in subprocesses with the same
environment, and the home holds every kind of store the daemon can find: an agent under
OpenClaw's state dir, an agent dir set in ``openclaw.json`` outside it, a store named in our
config file, and Qwen Code's file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import (
    ROOT,
    DaemonProcess,
    OpenClawHome,
    assert_no_secrets,
    qwen_profile,
    wait_for,
)

HOUR = 3600.0


class Home:
    """A home with one store of every kind the daemon discovers."""

    def __init__(self, root: Path, fake: FakeQwen) -> None:
        self.oc = OpenClawHome(root)
        self.fake = fake
        self.secrets: list[str] = []
        self.custom_dir = root / "elsewhere" / "work-agent"
        self.stores = {
            "main": self._store(self.oc.store_path("main")),
            "configured": self._store(self.custom_dir / "auth-profiles.json"),
            "explicit": self._store(root / "extra" / "auth-profiles.json"),
        }
        self.oc.state.mkdir(parents=True, exist_ok=True)
        (self.oc.state / "openclaw.json").write_text(json.dumps(
            {"agents": {"list": [{"id": "work", "agentDir": str(self.custom_dir)}]}}))
        config = root / "xdg-config" / "qwen-refresher" / "config.toml"
        config.parent.mkdir(parents=True)
        config.write_text(f'stores = ["{self.stores["explicit"]}"]\n')
        access, refresh, _ = fake.issue_tokens(lifetime=6 * HOUR)
        self.secrets += [access, refresh]
        qwen = self.oc.home / ".qwen" / "oauth_creds.json"
        qwen.parent.mkdir(parents=True, mode=0o700)
        qwen.write_text(json.dumps({"access_token": access, "refresh_token": refresh,
                                    "token_type": "Bearer",
                                    "expiry_date": int((time.time() + 6 * HOUR) * 1000)}))
        qwen.chmod(0o600)
        self.stores["qwen-code"] = qwen

    def _store(self, path: Path) -> Path:
        access, refresh, _ = self.fake.issue_tokens(lifetime=6 * HOUR)
        self.secrets += [access, refresh]
        return self.oc.write_store({"version": 1, "profiles": {"qwen-portal:default": qwen_profile(
            access, refresh, int((time.time() + 6 * HOUR) * 1000))}}, path=path)

    def env(self) -> dict[str, str]:
        env = self.oc.env()
        env.pop("QWEN_REFRESHER_LOG_FORMAT", None)
        return env

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "qwen_refresher", *args], cwd=ROOT,
                              env=self.env(), capture_output=True, text=True, timeout=60)
        assert_no_secrets([proc.stdout, proc.stderr], self.secrets)
        return proc

    def status(self) -> dict[str, Any]:
        proc = self.cli("status", "--json")
        assert proc.stderr == "", proc.stderr
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc

    def published_stores(self) -> set[str]:
        doc = json.loads((self.oc.our_state / "state.json").read_text())
        return {s["path"] for s in doc["stores"]}


def _store_set(doc: dict[str, Any]) -> set[str]:
    return {s["store"] for s in doc["stores"]}


def _read_write_paths(unit: str) -> list[Path]:
    out = []
    for line in unit.splitlines():
        if line.startswith("ReadWritePaths="):
            out.append(Path(line.removeprefix("ReadWritePaths=").strip('"').removeprefix("-")))
    return out


def test_status_and_install_service_see_exactly_the_daemons_stores(
        tmp_path: Path, fake: FakeQwen) -> None:
    home = Home(tmp_path, fake)
    expected = {str(p) for p in home.stores.values()}

    # 1. No daemon has ever run: status finds the stores itself.
    before = home.status()
    assert before["source"] == "stores" and not before["daemon"]["running"]
    assert _store_set(before) == expected
    assert {p["store"] for p in before["profiles"]} == expected

    # 2. The daemon's own list: what it publishes is what it manages.
    with DaemonProcess(home.oc, fake, env=home.oc.env(), margin="900") as daemon:
        wait_for(lambda: (home.oc.our_state / "state.json").exists()
                 and len(home.published_stores()) >= len(expected), 20,
                 "a published state with every store", daemon)
        daemons = home.published_stores()
        assert daemons == expected, daemon.output[-3000:]
        running = home.status()
        assert running["source"] == "daemon" and running["daemon"]["running"]
        assert _store_set(running) == daemons
        assert daemon.stop() == 0

    # 3. install-service: every store the daemon writes lies under a ReadWritePaths= entry
    #    (its own dir, where OpenClaw's lock and our temporary file go), and no entry is
    #    needed beyond our state dir and the dirs the stores and agents live in.
    proc = home.cli("install-service", "--dry-run", "--sandbox", "full")
    assert proc.returncode == 0, proc.stderr
    writable = _read_write_paths(proc.stdout)
    for store in daemons:
        parent = Path(store).parent
        assert any(parent.is_relative_to(w) for w in writable), (store, writable)
    assert home.custom_dir in writable  # outside OpenClaw's state dir: listed by itself


def test_status_without_a_daemon_shows_configured_agent_dirs(
        tmp_path: Path, fake: FakeQwen) -> None:
    """The regression in issue 14, alone: an ``agentDir`` from ``openclaw.json`` is shown by
    ``status`` with no daemon running, in the table as in ``--json``."""
    home = Home(tmp_path, fake)
    doc = home.status()
    configured = str(home.stores["configured"])
    assert configured in {p["store"] for p in doc["profiles"]}
    text = home.cli("status").stdout
    assert "elsewhere/work-agent" in text


def test_store_kinds_are_the_adapters_kinds() -> None:
    from qwen_refresher import settings_core
    from qwen_refresher.stores import OpenClawStore, QwenCodeStore

    assert settings_core.KIND_OPENCLAW == OpenClawStore.kind
    assert settings_core.KIND_QWEN_CODE == QwenCodeStore.kind


@pytest.mark.parametrize("case", [
    {},
    {"file": 'state_dir = "~/s1"\nstores = ["/a/x.json"]\ndiscover = false\nmargin = "2h"\n'},
    {"file": 'state_dir = "/f"\nqwen_code = false\n', "env": {"QWEN_REFRESHER_STATE_DIR": "/e",
                                                           "QWEN_REFRESHER_QWEN_CODE": "yes"}},
    {"env": {"QWEN_REFRESHER_STORES": '["/p/q.json", "~/r.json"]', "QWEN_REFRESHER_DISCOVER": "0",
             "QWEN_REFRESHER_MARGIN": "90s"}},
    {"file": 'stores = "/one/oauth_creds.json"\n', "flags": {"state_dir": "/flag",
                                                            "stores": ["/flag/a.json"]}},
    {"env": {"XDG_STATE_HOME": "/xdg"}, "file": "margin = 30\n"},
])
def test_settings_core_resolves_what_load_settings_resolves(
        tmp_path: Path, case: dict[str, Any]) -> None:
    """``status`` and ``install-service`` resolve state_dir, stores, discover, qwen_code and
    margin with ``settings_core`` (stdlib, fast); the daemon with pydantic on top. Both read
    the same file through the same reader; this holds the layering to one answer."""
    from qwen_refresher import settings_core
    from qwen_refresher.config import load_settings

    env = {"HOME": str(tmp_path), **case.get("env", {})}
    config = None
    if "file" in case:
        config = tmp_path / "config.toml"
        config.write_text(case["file"])
        env["QWEN_REFRESHER_CONFIG"] = str(config)
    flags = case.get("flags", {})
    daemon = load_settings(flags, env=env)
    core = settings_core.resolve(env, state_dir=flags.get("state_dir"),
                                 stores=flags.get("stores"))
    assert core.config_file == config
    assert (core.state_dir, list(core.stores), core.discover, core.qwen_code, core.margin) == (
        daemon.state_dir, daemon.stores, daemon.discover, daemon.qwen_code, daemon.margin)


def test_watch_dirs_cover_every_store_dir_once(tmp_path: Path) -> None:
    """``discovery.watch_dirs`` in text (it runs every sweep): the agents dir recursively, a
    configured agent dir and an explicit store's dir outside it on their own, a missing dir by
    its nearest existing ancestor, nothing inside a recursive watch twice."""
    from qwen_refresher import discovery

    home = tmp_path / "home"
    state = home / ".openclaw"
    stores = []
    for agent in ("a", "b"):
        (state / "agents" / agent / "agent").mkdir(parents=True)
        stores.append(state / "agents" / agent / "agent" / "auth-profiles.json")
    custom = tmp_path / "custom" / "agent"
    custom.mkdir(parents=True)
    (state / "openclaw.json").write_text(json.dumps({"agents": {"list": [
        {"agentDir": str(custom)}, {"agentDir": str(tmp_path / "not-yet" / "x")}]}}))
    explicit = tmp_path / "explicit" / "deep" / "s.json"  # its dir does not exist yet
    (tmp_path / "explicit").mkdir()
    env = {"HOME": str(home)}
    got = discovery.watch_dirs([*stores, explicit], discover=True, qwen_code=True, env=env)
    assert got == {state / "agents": True, custom: False, tmp_path: False,
                   tmp_path / "explicit": False, home: False}


def test_an_unusable_openclaw_json_is_named_by_status_and_install_service(
        tmp_path: Path, fake: FakeQwen) -> None:
    """A FIFO at ``openclaw.json`` (no writer: a blocking open would hang a health check):
    ``status`` without a daemon names it as a problem and answers at once; ``install-service``
    warns that its agent dirs are neither managed nor writable. The stores under the state dir
    are still found by both."""
    import os

    home = Home(tmp_path, fake)
    config = home.oc.state / "openclaw.json"
    config.unlink()
    os.mkfifo(config)
    doc = home.status()
    assert [p["path"] for p in doc["problems"]] == [str(config)]
    assert "fifo" in doc["problems"][0]["problem"]
    assert str(home.stores["main"]) in _store_set(doc)
    assert str(home.stores["configured"]) not in _store_set(doc)
    proc = home.cli("install-service", "--dry-run", "--sandbox", "full")
    assert proc.returncode == 0
    assert "openclaw.json" in proc.stderr and "neither managed nor writable" in proc.stderr
