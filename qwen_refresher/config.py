"""Settings: command-line flags > ``QWEN_REFRESHER_*`` environment > TOML file > defaults.

Built on pydantic-settings so that every value is validated once, at start-up, and a bad value
stops the daemon with exit 78 and one line naming the setting, instead of surfacing hours later
in the middle of a refresh.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from . import paths, settings_core
from .durations import parse_duration
from .errors import ConfigError
from .qwen import constants as qwen_constants
from .settings_core import ENV_PREFIX, config_file_in_use

__all__ = [
    "ENV_PREFIX",
    "QWEN_CLIENT_ID",
    "QWEN_DEVICE_CODE_URL",
    "QWEN_TOKEN_URL",
    "Settings",
    "config_file_in_use",
    "is_loopback_host",
    "load_settings",
    "parse_listen",
]

# Qwen's endpoints and client id have one home, ``qwen.constants``; these are the defaults.
QWEN_TOKEN_URL = qwen_constants.TOKEN_URL
QWEN_DEVICE_CODE_URL = qwen_constants.DEVICE_CODE_URL
QWEN_CLIENT_ID = qwen_constants.CLIENT_ID

Seconds = Annotated[float, BeforeValidator(parse_duration)]


def _hook(value: object) -> str | None:
    """``""`` and ``"none"`` switch a hook off; anything else is a shell command line."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("expected a command line (string)")
    text = value.strip()
    return None if text.lower() in ("", "none", "off", "false") else text


Hook = Annotated[str | None, BeforeValidator(_hook)]


def _runner(value: object) -> str:
    """``hook_runner``: a ``systemd-run`` command line, or ``""`` (also ``none``) for none."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError("expected a command line (string)")
    text = value.strip()
    if text.lower() in ("", "none", "off", "false"):
        return ""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"cannot be split into words: {exc}") from None
    if Path(words[0]).name != "systemd-run":
        raise ValueError("must be a systemd-run command line, e.g. systemd-run --user "
                         "(hooks get --wait, --pipe, --unit, --setenv ... appended)")
    if "--scope" in words:
        raise ValueError("--scope would run hooks inside our own sandbox; use a service")
    return text


HookRunner = Annotated[str, BeforeValidator(_runner)]


def is_loopback_host(host: str) -> bool:
    """True only for a *literal* loopback address: 127.0.0.0/8 or ::1 (bracketed or not).

    Names are refused, ``localhost`` included: a name is only as loopback as the resolver
    says (``evil.localhost`` and a missing ``/etc/hosts`` entry both go to DNS), and a refresh
    token sent in clear text to wherever it resolves is a stolen login.
    """
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_listen(value: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) or empty for no HTTP server."""
    text = value.strip()
    if not text:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:9464; empty disables)")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return host.strip("[]"), port


class Settings(BaseSettings):
    """Everything the daemon can be told. Field names are the TOML keys."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    token_url: str = QWEN_TOKEN_URL
    device_code_url: str = QWEN_DEVICE_CODE_URL
    client_id: str = QWEN_CLIENT_ID
    margin: Seconds = 900.0
    jitter: Seconds = 60.0
    sweep_interval: Seconds = 300.0
    retry_max: Seconds = 300.0
    http_timeout: Seconds = 15.0
    lock_timeout: Seconds = 40.0
    hook_timeout: Seconds = 30.0
    hook_runner: HookRunner = ""
    debounce: Seconds = 0.05
    state_dir: Path = Field(default_factory=paths.default_state_dir)
    stores: list[Path] = Field(default_factory=list)
    discover: bool = True
    qwen_code: bool = True
    on_rotate: Hook = "auto"
    on_needs_login: Hook = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    listen: str = "127.0.0.1:9464"
    poll: bool = False
    max_concurrent_refreshes: int = Field(default=4, ge=1, le=64)
    #: refresh requests per second toward the token server, at most (``ratelimit.py``)
    max_refresh_rate: float = Field(default=10.0, gt=0, le=1000, allow_inf_nan=False)
    notify_urls: list[str] = Field(default_factory=list)
    notify_desktop: bool = True
    remind_interval: Seconds = 6 * 3600.0
    auto_login: bool = False
    # -- fleet (issue 17, docs/fleet.md): one family on many hosts, coordinated through etcd --
    #: etcd v3 client URLs, comma-separated (tried in order: failover); empty: no fleet
    fleet: str = ""
    fleet_namespace: str = "qwen-refresher"
    #: the same secret file on every host (``qwen-refresher fleet init`` writes one, 0600)
    fleet_secret_file: Path | None = None
    fleet_ca: Path | None = None
    fleet_cert: Path | None = None
    fleet_key: Path | None = None
    fleet_user: str | None = None
    #: a file holding the etcd password (a password never travels in argv or env)
    fleet_password_file: Path | None = None
    #: this host's name in the fleet (status: "follower of HOST"); default: the host name
    fleet_host_id: str = ""
    fleet_timeout: Seconds = 3.0
    fleet_lease_ttl: Seconds = 10.0
    fleet_inflight_grace: Seconds = 30.0
    fleet_probe_interval: Seconds = 15.0

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("token_url", "device_code_url")
    @classmethod
    def _https_or_loopback(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL")
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise ValueError(
                f"{value!r} sends tokens in clear text; https is required except for a "
                "literal loopback address (http://127.0.0.1:PORT or http://[::1]:PORT)"
            )
        return value

    @field_validator("client_id")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value.strip()

    @field_validator("stores", mode="before")
    @classmethod
    def _stores(cls, value: object) -> object:
        if isinstance(value, str | Path):
            return [value]
        return value

    @field_validator("stores")
    @classmethod
    def _absolute(cls, value: list[Path]) -> list[Path]:
        return [p.expanduser().absolute() for p in value]

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("fleet")
    @classmethod
    def _fleet_urls(cls, value: str) -> str:
        """etcd client URLs: https, or http on a literal loopback address (as token_url):
        a man in the middle of plain http could fake a lock or a quorum."""
        urls = [u.strip() for u in value.split(",") if u.strip()]
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http(s) URL")
            if parts.scheme == "http" and not is_loopback_host(parts.hostname):
                raise ValueError(f"{url!r}: https is required except for a literal loopback "
                                 "address")
        return ",".join(urls)

    @field_validator("fleet_secret_file", "fleet_ca", "fleet_cert", "fleet_key",
                     "fleet_password_file")
    @classmethod
    def _fleet_path(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().absolute()

    @model_validator(mode="after")
    def _sane_timing(self) -> Settings:
        if self.sweep_interval < 1:
            raise ValueError("sweep_interval: must be at least 1 second")
        if self.http_timeout <= 0:
            raise ValueError("http_timeout: must be greater than 0")
        if self.retry_max < 1:
            raise ValueError("retry_max: must be at least 1 second")
        if self.fleet and self.fleet_secret_file is None:
            raise ValueError("fleet_secret_file: needed with fleet (the same file on every "
                             "host; 'qwen-refresher fleet init FILE' writes one)")
        if self.fleet and not self.fleet_namespace.strip("/"):
            raise ValueError("fleet_namespace: must not be empty")
        if not 1 <= self.fleet_lease_ttl <= 3600 or self.fleet_timeout <= 0 \
                or self.fleet_inflight_grace < self.fleet_lease_ttl \
                or self.fleet_probe_interval < 0.1:
            raise ValueError("fleet_lease_ttl (1 s - 1 h), fleet_timeout (> 0), "
                             "fleet_inflight_grace (>= fleet_lease_ttl) and "
                             "fleet_probe_interval (>= 0.1 s) are out of range")
        return self

    @property
    def fleet_urls(self) -> list[str]:
        return [u for u in self.fleet.split(",") if u]

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen)

    @property
    def hook_runner_argv(self) -> tuple[str, ...]:
        """``hook_runner`` split into words; empty: hooks run as our children."""
        return tuple(shlex.split(self.hook_runner))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        doc = _CONFIG_FILE.get("doc")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if doc is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=dict(doc)))
        return tuple(sources)


# pydantic-settings builds sources per class; the file's content is chosen per load_settings
# call (read once, by ``settings_core.read_config_file``, the reader status uses too).
_CONFIG_FILE: dict[str, Mapping[str, Any] | None] = {"doc": None}


def read_toml(path: Path) -> dict[str, Any]:
    """The config file through ``settings_core.read_config_file`` (the one reader: a FIFO or
    a device there cannot hang start-up or reload, 1 MiB cap, a symlink followed as dotfile
    managers need), every key checked against the settings; ``ConfigError`` naming the file
    and the problem (or the unknown key) otherwise."""
    try:
        doc = settings_core.read_config_file(path)
    except settings_core.SettingsError as exc:
        raise ConfigError(exc.setting, exc.problem) from None
    unknown = sorted(set(doc) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(unknown[0], f"{path}: unknown setting (known: "
                                      f"{', '.join(sorted(Settings.model_fields))})")
    return doc


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Validate everything at once; any problem becomes one ``ConfigError`` (exit 78).

    ``config_file`` None means the default path, used only if it exists; an explicitly named
    file must exist.
    """
    from .discovery import reset_reports

    reset_reports()  # a (re)load names a still-broken openclaw.json again, once
    environ = os.environ if env is None else env
    path = config_file_in_use(config_file, environ)
    _CONFIG_FILE["doc"] = read_toml(path) if path is not None else None
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    saved_env = None
    if env is not None:
        saved_env = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise _config_error(exc) from None
    except SettingsError as exc:
        raise _settings_source_error(exc) from None
    finally:
        if saved_env is not None:
            os.environ.clear()
            os.environ.update(saved_env)
        _CONFIG_FILE["doc"] = None


def _config_error(exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first.get("loc", ()) if part != "__root__")
    message = str(first.get("msg", "invalid"))
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if not loc and ":" in message:
        loc, _, message = message.partition(":")
        message = message.strip()
    setting = (loc or "settings").split(".")[0]
    env_name = ENV_PREFIX + setting.upper()
    return ConfigError(f"{setting} ({env_name})", message)


def _settings_source_error(exc: SettingsError) -> ConfigError:
    """pydantic-settings fails before validation when an env list is not JSON."""
    import re

    match = re.search(r'field "([a-z_]+)"', str(exc))
    setting = match.group(1) if match else "settings"
    return ConfigError(f"{setting} ({ENV_PREFIX}{setting.upper()})",
                       "list settings in the environment must be JSON lists, e.g. "
                       '[\"/path/one.json\", \"/path/two.json\"]')
