"""The fake's settings (``FakeQwenConfig``), its fixed paths and fault kinds, and the argument
checks shared by the in-process API, the HTTP control API and the command line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from qwen_refresher.qwen.constants import CLIENT_ID

#: The client id the real server expects, from its one home (stdlib: no httpx is imported).
QWEN_CLIENT_ID = CLIENT_ID
DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
TOKEN_PATH = "/api/v1/oauth2/token"
DEVICE_CODE_PATH = "/api/v1/oauth2/device/code"


class Endpoints:
    """The fake's URLs, derived from ``base_url``: one home for its paths, shared by the
    in-process fake, its subprocess handle and its remote control (they serve the same
    endpoints; each says where its ``base_url`` comes from)."""

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    @property
    def device_code_url(self) -> str:
        return self.base_url + DEVICE_CODE_PATH

    @property
    def api_base(self) -> str:
        return self.base_url + "/v1"

    @property
    def chat_url(self) -> str:
        return self.api_base + "/chat/completions"
CHAT_PATHS = frozenset({"/v1/chat/completions", "/api/v1/chat/completions"})
AUTHORIZE_PATH = "/authorize"
CONTROL_PREFIX = "/_fake/"

FAULT_KINDS = frozenset(
    {"500", "502", "503", "429", "timeout", "delay", "drop", "lost", "empty200", "html200",
     "reject", "slow_down"}
)
FAULT_TARGETS = frozenset({"refresh", "device_token", "device_code", "chat", "any"})
#: Kinds a random failure rate draws from unless told otherwise: none of them stalls a benchmark.
DEFAULT_RANDOM_KINDS = ("500", "502", "503", "429", "drop", "empty200", "html200")

REJECT_DESCRIPTION = "Invalid refresh token or client_id"
_TIMEOUT_DEFAULT_DELAY = 30.0
_DELAY_DEFAULT = 1.0
_MAX_BODY = 1 << 20
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels: no accidental words, no 0/O 1/I mixups
_HTML_200 = (
    b"<!DOCTYPE html><html><head><title>Qwen</title></head>"
    b"<body><h1>Service temporarily unavailable</h1></body></html>"
)



# --------------------------------------------------------------------------- configuration


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _as_number(name: str, value: Any, *, minimum: float | None = None,
               exclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"{name} must be a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite")
    if minimum is not None and (number <= minimum if exclusive else number < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}")
    return number


def _as_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, not {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be between {minimum} and {maximum}")
    return number


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "1", "yes", "false", "0", "no"}:
        return value.lower() in {"true", "1", "yes"}
    raise ValueError(f"{name} must be a boolean")


def _optional(convert: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def convert_optional(name: str, value: Any) -> Any:
        return None if value is None else convert(name, value)

    return convert_optional


def _one_of(*choices: str) -> Callable[[str, Any], str]:
    def convert(name: str, value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}")
        return str(value)

    return convert


@dataclass(frozen=True)
class FakeQwenConfig:
    """Behaviour knobs; all can change while serving (``configure``, ``POST /_fake/config``).

    ``lifetime`` may be zero or negative on purpose: that seeds stores with already-expired
    tokens, and makes the server send an ``expires_in`` a careful client must refuse.
    ``refresh_in_response``: ``token`` (normal), ``omit`` or ``empty`` (the server keeps the old
    refresh token valid, and the client must keep it). ``auto_approve_after``: a device code is
    approved once it has been answered ``authorization_pending`` that many times (0 = at once).
    """

    client_id: str = QWEN_CLIENT_ID
    lifetime: float = 21600.0
    rotate: bool = True
    refresh_lifetime: float | None = None
    refresh_in_response: str = "token"
    resource_url: str | None = None  # None: "127.0.0.1:PORT", the fake itself
    reject_status: int = 400
    reject_error: str = "invalid_request"
    reject_description: str = REJECT_DESCRIPTION
    device_interval: float = 2.0
    device_code_lifetime: float = 300.0
    auto_approve_after: int | None = None
    verification_uri: str | None = None  # None: the fake's own /authorize page


_CONFIG_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "client_id": _as_str,
    "lifetime": _as_number,
    "rotate": _as_bool,
    "refresh_lifetime": _optional(lambda n, v: _as_number(n, v, minimum=0, exclusive=True)),
    "refresh_in_response": _one_of("token", "omit", "empty"),
    "resource_url": _optional(_as_str),
    "reject_status": lambda n, v: _as_int(n, v, minimum=400, maximum=499),
    "reject_error": _as_str,
    "reject_description": _as_str,
    "device_interval": lambda n, v: _as_number(n, v, minimum=0, exclusive=True),
    "device_code_lifetime": lambda n, v: _as_number(n, v, minimum=0, exclusive=True),
    "auto_approve_after": _optional(lambda n, v: _as_int(n, v, minimum=0)),
    "verification_uri": _optional(_as_str),
}
assert set(_CONFIG_FIELDS) == {f.name for f in fields(FakeQwenConfig)}


def _validated_changes(changes: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(changes) - set(_CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
    return {name: _CONFIG_FIELDS[name](name, value) for name, value in changes.items()}


