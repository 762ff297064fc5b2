"""The Qwen OAuth client, and what each answer of Qwen's token endpoint means.

A package of four rooms, one job each:

- ``constants``: Qwen's URLs, client id, scope, grant type: their one home (stdlib, no imports).
- ``answers``: an answer -> tokens or a failure kind (``errors.py``), validated at the boundary.
- ``transport``: bounded requests: an overall deadline per request, a size cap per body, no
  proxy for loopback.
- ``client``: ``QwenOAuthClient``: refresh and device-code login.

``from qwen_refresher.qwen import X`` keeps working for every name it always offered. The
client's names are loaded on first use (PEP 562): importing the constants (the fake server,
the settings) must not import httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import SlowDown
from .constants import (
    CLIENT_ID,
    DEFAULT_DEVICE_CODE_URL,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_TOKEN_URL,
    DEVICE_CODE_URL,
    DEVICE_GRANT_TYPE,
    MAX_POLL_INTERVAL,
    MAX_REQUEST_SECONDS,
    QWEN_CLIENT_ID,
    REJECTION_ERRORS,
    SCOPE,
    TOKEN_URL,
)

if TYPE_CHECKING:
    from .answers import DeviceAuthorization, TokenGrant, parse_retry_after
    from .client import QwenOAuthClient
    from .transport import MAX_BODY, STOP_GRACE, proxy_for

__all__ = [
    "CLIENT_ID",
    "DEFAULT_DEVICE_CODE_URL",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_TOKEN_URL",
    "DEVICE_CODE_URL",
    "DEVICE_GRANT_TYPE",
    "MAX_BODY",
    "MAX_POLL_INTERVAL",
    "MAX_REQUEST_SECONDS",
    "QWEN_CLIENT_ID",
    "REJECTION_ERRORS",
    "SCOPE",
    "STOP_GRACE",
    "TOKEN_URL",
    "DeviceAuthorization",
    "QwenOAuthClient",
    "SlowDown",
    "TokenGrant",
    "parse_retry_after",
    "proxy_for",
]

#: name -> the submodule that defines it, imported when the name is first asked for.
_LAZY = {
    "DeviceAuthorization": "answers",
    "TokenGrant": "answers",
    "parse_retry_after": "answers",
    "QwenOAuthClient": "client",
    "MAX_BODY": "transport",
    "STOP_GRACE": "transport",
    "proxy_for": "transport",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
