from __future__ import annotations

from pathlib import Path

import pytest

from qwen_refresher.config import load_settings
from qwen_refresher.errors import ConfigError


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), **extra}


def test_defaults(tmp_path: Path) -> None:
    s = load_settings(env=env(tmp_path))
    assert s.margin == 900 and s.jitter == 60 and s.sweep_interval == 300
    assert s.token_url == "https://chat.qwen.ai/api/v1/oauth2/token"
    assert s.state_dir == tmp_path / ".local/state/qwen-refresher"
    assert s.listen_address == ("127.0.0.1", 9464)
    assert s.on_rotate == "auto" and s.on_needs_login is None


def test_precedence_flags_over_env_over_toml(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('margin = "20m"\njitter = 5\nsweep_interval = "1h"\n')
    e = env(tmp_path, QWEN_REFRESHER_JITTER="90s", QWEN_REFRESHER_MARGIN="10m")
    s = load_settings({"margin": "30s"}, config_file=config, env=e)
    assert (s.margin, s.jitter, s.sweep_interval) == (30, 90, 3600)


def test_default_config_file_is_read_when_present(tmp_path: Path) -> None:
    (tmp_path / "cfg" / "qwen-refresher").mkdir(parents=True)
    (tmp_path / "cfg" / "qwen-refresher" / "config.toml").write_text('stores = ["/x/a.json"]\n')
    assert load_settings(env=env(tmp_path)).stores == [Path("/x/a.json")]


def test_env_lists_are_json(tmp_path: Path) -> None:
    s = load_settings(env=env(tmp_path, QWEN_REFRESHER_STORES='["/a/b.json", "/c/d.json"]'))
    assert s.stores == [Path("/a/b.json"), Path("/c/d.json")]


@pytest.mark.parametrize("value", ["", "none", "None", "off"])
def test_hooks_can_be_disabled(tmp_path: Path, value: str) -> None:
    assert load_settings({"on_rotate": value}, env=env(tmp_path)).on_rotate is None


@pytest.mark.parametrize(("overrides", "envs", "needle"), [
    ({"margin": "soon"}, {}, "margin (QWEN_REFRESHER_MARGIN)"),
    ({"jitter": "-5"}, {}, "jitter"),
    ({"token_url": "http://chat.qwen.ai/x"}, {}, "clear text"),
    ({"token_url": "ftp://x/y"}, {}, "not an http(s) URL"),
    ({"device_code_url": "not a url"}, {}, "device_code_url"),
    ({"listen": "nohost"}, {}, "listen"),
    ({"listen": "127.0.0.1:99999"}, {}, "out of range"),
    ({}, {"QWEN_REFRESHER_STORES": "/not/json"}, "JSON lists"),
    ({}, {"QWEN_REFRESHER_LOG_LEVEL": "loud"}, "log_level"),
    ({}, {"QWEN_REFRESHER_MAX_CONCURRENT_REFRESHES": "0"}, "max_concurrent_refreshes"),
])
def test_bad_settings_name_the_setting(tmp_path: Path, overrides: dict[str, str],
                                       envs: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides, env=env(tmp_path, **envs))
    assert needle in str(info.value)
    assert info.value.exit_code == 78
    assert "\n" not in str(info.value)


def test_loopback_http_is_allowed(tmp_path: Path) -> None:
    for url in ("http://127.0.0.1:8080/t", "http://127.0.0.2/t", "http://[::1]:9/t"):
        assert load_settings({"token_url": url}, env=env(tmp_path)).token_url == url


def test_clear_text_to_a_name_is_refused_even_localhost(tmp_path: Path) -> None:
    # A name is only as loopback as the resolver says; the literal address is required.
    for url in ("http://localhost/t", "http://evil.localhost/t", "http://127.0.0.1.nip.io/t"):
        with pytest.raises(ConfigError, match="clear text"):
            load_settings({"token_url": url}, env=env(tmp_path))


@pytest.mark.parametrize(("text", "needle"), [
    ("margin = [\n", "not valid TOML"),
    ("colour = 'blue'\n", "unknown setting"),
    ('margin = "forever"\n', "margin"),
])
def test_bad_toml(tmp_path: Path, text: str, needle: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=config, env=env(tmp_path))
    assert needle in str(info.value)


def test_an_explicit_missing_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(config_file=tmp_path / "nope.toml", env=env(tmp_path))
