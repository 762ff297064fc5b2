"""What the fake records and answers with: requests seen, tokens issued, queued faults, and
the replies (JSON bodies, OAuth errors) every room builds.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .config import FakeQwenConfig

# --------------------------------------------------------------------------- records



def most_within(times: Iterable[float], window: float) -> int:
    """The most of ``times`` that fall within any ``window`` seconds (a count, not a rate):
    how the fake and the benchmarks show a burst never hit the token endpoint too hard."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best

@dataclass(frozen=True)
class RequestRecord:
    """One protocol request as the fake saw it. ``status`` is None when no answer was sent."""

    at: float  # time.time()
    monotonic: float
    endpoint: str  # "token", "device_code", "chat", "authorize"
    grant_type: str | None
    refresh_token: str | None
    outcome: str  # "ok", "rejected", "reused", "pending", "fault:503", ...
    status: int | None
    access_token: str | None = None  # the bearer token presented to chat completions
    fault: str | None = None
    user_agent: str | None = None
    accept: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class IssuedTokens:
    """One token set the fake handed out; ``replaced`` is the refresh token it was traded for."""

    access_token: str
    refresh_token: str
    expires_ms: int
    replaced: str | None
    via: str  # "seed" (issue_tokens), "refresh", "device"
    at: float


@dataclass(frozen=True)
class Fault:
    """One queued failure. ``body`` (JSON value or raw text) replaces the default error body."""

    kind: str
    retry_after: float | str | None = None
    delay: float | None = None
    target: str = "refresh"
    body: Any = None


@dataclass
class _RefreshState:
    issued_at: float
    used: bool = False


@dataclass
class _DeviceCode:
    device_code: str
    user_code: str
    challenge: str
    expires_at: float  # monotonic
    interval: float
    status: str = "pending"  # pending | approved | denied | consumed
    pending_polls: int = 0


@dataclass
class _Reply:
    status: int
    body: bytes
    outcome: str
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _json_reply(status: int, obj: Any, outcome: str,
                headers: dict[str, str] | None = None) -> _Reply:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _Reply(status, body, outcome, headers=dict(headers or {}))


def _oauth_error(status: int, error: str, description: str | None, outcome: str) -> _Reply:
    obj = {"error": error} if description is None else {
        "error": error, "error_description": description}
    return _json_reply(status, obj, outcome)


def _json_number(value: float) -> float | int:
    """Integral values go out as ints, as the real service sends them."""
    return int(value) if float(value).is_integer() else value


def pkce_challenge(verifier: str) -> str:
    """base64url(sha256(verifier)) without padding: the S256 method of RFC 7636."""
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _normalise_user_code(code: str) -> str:
    return "".join(ch for ch in code.upper() if ch.isalnum())


def _status_kind(kind: str) -> int | None:
    """A fault kind naming a status: "200" (with ``body``: a malformed success) or 400-599."""
    if kind.isdigit() and len(kind) == 3 and (kind == "200" or 400 <= int(kind) <= 599):
        return int(kind)
    return None


def _reject_reply(config: FakeQwenConfig, outcome: str) -> _Reply:
    """The server's answer to a refused refresh token, as configured."""
    return _oauth_error(config.reject_status, config.reject_error, config.reject_description,
                        outcome)
