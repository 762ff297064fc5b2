"""Store adapters: what they accept, what they refuse (and how they say it), what they write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qwen_refresher.errors import StoreError, StoreMalformed
from qwen_refresher.models import Credentials
from qwen_refresher.stores import OpenClawStore, QwenCodeStore
from tests.harness import openclaw_json, qwen_profile

GOOD = qwen_profile("acc-1234567", "ref-1234567", 1_900_000_000_000)


def write(tmp_path: Path, data: bytes | dict[str, object],
          name: str = "auth-profiles.json") -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else openclaw_json(data))
    return path


@pytest.mark.parametrize(("data", "needle"), [
    (b"", "is empty"),
    (b'{"version": 1, "profiles": {', "not valid JSON"),
    (b"\xef\xbb\xbf{}", "byte-order mark"),
    (b'{"a": "\x00"}', "NUL bytes"),
    (b'{"a": "\xff\xfe"}', "not valid UTF-8"),
    (b"[]", "not an object"),
    (b'{"profiles": []}', '"profiles" is a list'),
    (b'{"profiles": {}, "profiles": {}}', "twice"),
    (b"[" * 100 + b"]" * 100, "nests deeper"),
])
def test_malformed_files_get_one_clear_error_naming_the_file(
        tmp_path: Path, data: bytes, needle: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(StoreMalformed) as info:
        OpenClawStore(path).read()
    assert needle in str(info.value)
    assert str(path) in str(info.value)
    assert path.read_bytes() == data


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("expires", 1_772_812_345, "looks like seconds"),
    ("expires", -5, "negative"),
    ("expires", "1772812345678", "is a str"),
    ("expires", None, "is missing"),
    ("expires", True, "is a bool"),
    ("refresh", None, "refresh is missing"),
    ("refresh", "", "refresh is empty"),
    ("refresh", 42, "refresh is a int"),
    ("access", ["x"], "access is a list"),
])
def test_a_bad_profile_is_reported_and_its_neighbours_still_served(
        tmp_path: Path, field: str, value: object, needle: str) -> None:
    bad = dict(GOOD)
    if value is None:
        bad.pop(field)
    else:
        bad[field] = value
    path = write(tmp_path, {"profiles": {"qwen-portal:bad": bad, "qwen-portal:good": GOOD}})
    records = OpenClawStore(path).read().records
    assert records["qwen-portal:bad"].creds is None
    assert needle in (records["qwen-portal:bad"].problem or "")
    good = records["qwen-portal:good"].creds
    assert good is not None and good.expires_ms == GOOD["expires"]


def test_only_qwen_portal_oauth_profiles_are_ours(tmp_path: Path) -> None:
    path = write(tmp_path, {"profiles": {
        "qwen-portal:default": GOOD,
        "anthropic:default": {"type": "api_key", "provider": "anthropic", "key": "k"},
        "qwen-portal:key": {"type": "api_key", "provider": "qwen-portal", "key": "k"},
        "openai:x": {**GOOD, "provider": "openai"},
    }})
    assert list(OpenClawStore(path).read().records) == ["qwen-portal:default"]


def test_render_changes_three_fields_and_nothing_else(tmp_path: Path) -> None:
    doc = {"version": 1, "profiles": {
        "z-first": {"type": "api_key", "provider": "x", "key": "k", "extra": [1.5, {"ü": None}]},
        "qwen-portal:default": {**GOOD, "email": "me@example.com"},
    }, "order": {"qwen-portal": ["qwen-portal:default"]}, "unknownKey": {"nested": True}}
    path = write(tmp_path, doc)
    store = OpenClawStore(path)
    snap = store.read()
    new = Credentials("acc-new-000000", "ref-new-000000", 1_900_000_123_456)
    store.write(snap, {"qwen-portal:default": new})
    expected = json.loads(json.dumps(doc))
    expected["profiles"]["qwen-portal:default"].update(
        access="acc-new-000000", refresh="ref-new-000000", expires=1_900_000_123_456)
    assert path.read_bytes() == openclaw_json(expected)


def test_login_creates_a_missing_store_0600_in_a_0700_dir(tmp_path: Path) -> None:
    path = tmp_path / "agents" / "main" / "agent" / "auth-profiles.json"
    store = OpenClawStore(path)
    snap = store.read(allow_missing=True)
    store.write(snap, {"qwen-portal:default": Credentials("a-000000", "r-000000",
                                                          1_900_000_000_000)})
    doc = json.loads(path.read_text())
    assert doc == {"version": 1, "profiles": {"qwen-portal:default": {
        "type": "oauth", "provider": "qwen-portal", "access": "a-000000", "refresh": "r-000000",
        "expires": 1_900_000_000_000}}}
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_agent_and_login_command_from_the_layout(tmp_path: Path) -> None:
    main = OpenClawStore(tmp_path / "agents" / "main" / "agent" / "auth-profiles.json")
    work = OpenClawStore(tmp_path / "agents" / "work" / "agent" / "auth-profiles.json")
    assert main.agent == "main"
    assert main.login_command("x") == "openclaw models auth login --provider qwen-portal"
    assert "--agent work" in work.login_command("x")


QWEN = {"access_token": "qacc-000000", "token_type": "Bearer", "refresh_token": "qref-000000",
        "resource_url": "portal.qwen.ai", "expiry_date": 1_900_000_000_000,
        "someFutureKey": "kept"}


def test_qwen_code_file_is_read_and_written_with_all_required_fields(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(QWEN, indent=2).encode(), "oauth_creds.json")
    store = QwenCodeStore(path)
    snap = store.read()
    creds = snap.records["qwen-code"].creds
    assert creds is not None and creds.refresh == "qref-000000"
    store.write(snap, {"qwen-code": Credentials("n-acc-0000", "n-ref-0000", 1_900_000_000_999)})
    doc = json.loads(path.read_text())
    assert doc == {**QWEN, "access_token": "n-acc-0000", "refresh_token": "n-ref-0000",
                   "expiry_date": 1_900_000_000_999}
    assert store.lock_path() == tmp_path / "oauth_creds.lock"


@pytest.mark.parametrize(("change", "needle"), [
    ({"refresh_token": None}, "refresh_token is missing"),
    ({"token_type": None}, "token_type is missing"),
    ({"expiry_date": "1900000000000"}, "expiry_date is a str"),
    ({"expiry_date": 1_900_000_000}, "looks like seconds"),
])
def test_bad_qwen_code_files_are_reported_not_written(
        tmp_path: Path, change: dict[str, object], needle: str) -> None:
    doc = {k: v for k, v in {**QWEN, **change}.items() if v is not None}
    data = json.dumps(doc).encode()
    path = write(tmp_path, data, "oauth_creds.json")
    record = QwenCodeStore(path).read().records["qwen-code"]
    assert record.creds is None and needle in (record.problem or "")
    assert path.read_bytes() == data


def test_errors_never_contain_tokens(tmp_path: Path) -> None:
    secret = "ref-SECRET-abcdef123456"
    profile = {"type": "oauth", "provider": "qwen-portal", "refresh": secret, "expires": "soon"}
    path = write(tmp_path, json.dumps({"profiles": {"qwen-portal:x": profile}}).encode())
    record = OpenClawStore(path).read().records["qwen-portal:x"]
    assert secret not in (record.problem or "")
    path.write_text('{"refresh": "' + secret + '", }')
    with pytest.raises(StoreError) as info:
        OpenClawStore(path).read()
    assert secret not in str(info.value)


def test_a_store_found_wider_than_0600_is_written_0600(tmp_path: Path) -> None:
    import stat as stat_mod

    path = tmp_path / "agents" / "main" / "agent" / "auth-profiles.json"
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_text(json.dumps({"version": 1, "profiles": {}}))
    os.chmod(path, 0o644)
    store = OpenClawStore(path)
    snap = store.read()
    creds = Credentials(access="a" * 20, refresh="r" * 20, expires_ms=1_900_000_000_000)
    store.write(snap, {"qwen-portal:default": creds})
    assert stat_mod.S_IMODE(path.stat().st_mode) == 0o600
