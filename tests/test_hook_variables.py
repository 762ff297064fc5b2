"""One home for what ``on_rotate`` learns: ``hooks.on_rotate_variables``.

The daemon and ``qwen-refresher login`` used to pick the "first" store each their own way (by
store kind, and by file name): a Qwen Code store configured under another name was the gateway's
store for a login and not for a rotation. These tests run a real hook (``/bin/sh``) and read
what it saw.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from qwen_refresher import hooks, login
from qwen_refresher.config import load_settings
from qwen_refresher.models import Credentials, ProfileKey
from qwen_refresher.stores import OpenClawStore, QwenCodeStore

CREDS = Credentials(access="acc-SECRET-abc", refresh="ref-SECRET-xyz", expires_ms=1_900_000_000_000)


def stores(tmp_path: Path) -> tuple[QwenCodeStore, OpenClawStore]:
    # A Qwen Code file that is NOT named oauth_creds.json (an explicit ``stores`` entry).
    qwen_code = QwenCodeStore(tmp_path / "qwen" / "creds-copy.json")
    openclaw = OpenClawStore(tmp_path / "agents" / "main" / "agent" / "auth-profiles.json")
    return qwen_code, openclaw


def test_the_gateways_store_is_the_first_openclaw_one_whatever_its_position(
        tmp_path: Path) -> None:
    qwen_code, openclaw = stores(tmp_path)
    variables = hooks.on_rotate_variables(
        "rotated", [(qwen_code, "qwen-code:default"), (openclaw, "qwen-portal:default")], CREDS)
    assert variables["STORE"] == str(openclaw.path)
    assert variables["PROFILE"] == "qwen-portal:default"
    assert variables["EVENT"] == "rotated"
    assert variables["EXPIRES_MS"] == str(CREDS.expires_ms)
    assert variables["EXPIRES_AT"] == "2030-03-17T17:46:40Z"
    assert variables["PROFILES"].split("\n") == [
        f"{qwen_code.path}#qwen-code:default", f"{openclaw.path}#qwen-portal:default"]
    assert CREDS.refresh not in json.dumps(variables)
    assert CREDS.access not in json.dumps(variables)


def test_without_an_openclaw_store_the_first_written_is_named(tmp_path: Path) -> None:
    qwen_code, _ = stores(tmp_path)
    variables = hooks.on_rotate_variables("synced", [(qwen_code, "qwen-code:default")], CREDS)
    assert variables["STORE"] == str(qwen_code.path)
    with pytest.raises(ValueError):
        hooks.on_rotate_variables("rotated", [], CREDS)


def test_a_login_hook_sees_the_same_variables_as_the_daemons(tmp_path: Path) -> None:
    """``login.run_on_rotate`` runs a real hook; what it saw is the daemon's rule, with
    EVENT=login, and only the stores that were written."""
    qwen_code, openclaw = stores(tmp_path)
    seen = tmp_path / "seen.json"
    dump = (f"{shlex.quote(sys.executable)} -c 'import json, os, sys; "
            f"json.dump({{k: v for k, v in os.environ.items() "
            f"if k.startswith(\"QWEN_REFRESHER_\")}}, open(sys.argv[1], \"w\"))' "
            f"{shlex.quote(str(seen))}")
    settings = load_settings({"on_rotate": dump, "hook_runner": "",
                              "state_dir": tmp_path / "state"}, env={})
    targets = [(qwen_code, "qwen-code:default"), (openclaw, "qwen-portal:default"),
               (OpenClawStore(tmp_path / "agents" / "work" / "agent" / "auth-profiles.json"),
                "qwen-portal:default")]
    written = [ProfileKey(qwen_code.path, "qwen-code:default"),
               ProfileKey(openclaw.path, "qwen-portal:default")]  # the third one failed
    result = login.run_on_rotate(settings, targets, written, CREDS)
    assert result is not None and result.ok, result
    env = json.loads(seen.read_text())
    expected = hooks.on_rotate_variables(
        "login", [(qwen_code, "qwen-code:default"), (openclaw, "qwen-portal:default")], CREDS)
    for name, value in expected.items():
        assert env[f"QWEN_REFRESHER_{name}"] == value, name
    assert env["QWEN_REFRESHER_STORE"] == str(openclaw.path)  # not the Qwen Code file
    assert all(CREDS.refresh not in v and CREDS.access not in v for v in env.values())
    assert os.stat(seen).st_size > 0
