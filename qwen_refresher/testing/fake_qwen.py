"""A fake Qwen OAuth server speaking real HTTP on 127.0.0.1.

Why a real server and not mocks: the refresher's worst bugs live in the seams that mocks paper
over: a keep-alive connection that dies, a 200 whose body is not JSON, a rotated refresh token
whose answer never arrived. This server follows ``shared/reference/qwen-oauth.md`` (rotation,
reuse rejection, device flow with PKCE) and lets a test break it on purpose, deterministically
(a FIFO of one-shot faults) or statistically (a seeded failure rate).

Stdlib only, so that the demo, the benchmarks and a bare subprocess can run it without httpx.

In-process::

    with FakeQwen(lifetime=2) as fake:
        access, refresh, expires_ms = fake.issue_tokens()
        fake.inject("503", count=2)
        ...  # point the client at fake.token_url / fake.device_code_url

As a subprocess (prints exactly one line, ``READY http://127.0.0.1:PORT``, then serves until
SIGTERM/SIGINT)::

    python -m qwen_refresher.testing.fake_qwen --port 0 --lifetime 1.5 --no-rotate

    with FakeQwenProcess(lifetime=1.5) as proc:
        proc.control.inject("drop")
        proc.control.state()["reuse_count"]

Fault kinds for ``inject`` (they hit the refresh grant unless ``target`` says otherwise):

- ``"500"``, ``"502"``, ``"503"``, any status 400-599 as a string; ``"200"`` with a ``body``
  serves a malformed success. ``"429"`` sends ``Retry-After`` (1 s unless given).
- ``"timeout"``: sleeps ``delay`` (default 30 s), then hangs up; the token is untouched.
- ``"delay"``: sleeps ``delay`` (default 1 s), then answers normally.
- ``"drop"``: hangs up without answering; the token is untouched.
- ``"lost"``: processes the request (a refresh token IS rotated), then hangs up: the
  answer-lost-in-flight case that kills rotating token families.
- ``"empty200"``, ``"html200"``: a 200 with an empty or an HTML body.
- ``"reject"``: the rejection answer, without touching the token.
- ``"slow_down"``: 429 ``{"error":"slow_down"}``; aims at device polling by default.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import html
import json
import logging
import math
import os
import queue
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Self
from urllib.parse import parse_qs, urlencode, urlsplit

from qwen_refresher.qwen.constants import CLIENT_ID

__all__ = [
    "DEVICE_CODE_PATH",
    "DEVICE_GRANT_TYPE",
    "FAULT_KINDS",
    "FAULT_TARGETS",
    "QWEN_CLIENT_ID",
    "TOKEN_PATH",
    "FakeQwen",
    "FakeQwenConfig",
    "FakeQwenControl",
    "FakeQwenProcess",
    "Fault",
    "IssuedTokens",
    "RequestRecord",
    "main",
]

log = logging.getLogger(__name__)

#: The client id the real server expects, from its one home (stdlib: no httpx is imported).
QWEN_CLIENT_ID = CLIENT_ID
DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
TOKEN_PATH = "/api/v1/oauth2/token"
DEVICE_CODE_PATH = "/api/v1/oauth2/device/code"
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


# --------------------------------------------------------------------------- records


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


# --------------------------------------------------------------------------- the fake


class FakeQwen:
    """The fake service: protocol state, fault queue and request log behind one lock.

    All public methods are thread-safe; request handler threads and the test share this object.
    """

    def __init__(self, config: FakeQwenConfig | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, **overrides: Any) -> None:
        self._lock = threading.RLock()
        self._config = replace(config or FakeQwenConfig(), **_validated_changes(overrides))
        self._host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._generation = 0  # bumped by reset(): answers to older requests are not logged
        self._reset_state()

    def _reset_state(self) -> None:
        self._access: dict[str, float] = {}  # access token -> expiry (time.time())
        self._refresh: dict[str, _RefreshState] = {}
        self._rejected: set[str] = set()
        self._issued: list[IssuedTokens] = []
        self._log: list[RequestRecord] = []
        self._faults: deque[Fault] = deque()
        self._failure_p = 0.0
        self._failure_kinds: tuple[str, ...] = DEFAULT_RANDOM_KINDS
        self._rng = random.Random()
        self._devices: dict[str, _DeviceCode] = {}
        self._user_codes: dict[str, str] = {}  # normalised user code -> device code
        self._reuse_count = 0

    # ---- lifecycle

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("FakeQwen is already running")
        self._stopping.clear()
        server = _Server((self._host, self._requested_port), self)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"fake-qwen:{server.server_address[1]}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and cuts open connections, as a crashed server would."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in "timeout"/"delay" faults
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- addresses

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeQwen is not running")
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

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

    @property
    def resource_url(self) -> str:
        return self._config.resource_url or f"{self.host}:{self.port}"

    @property
    def control(self) -> FakeQwenControl:
        """The HTTP control client, so one test body can drive either mode."""
        return FakeQwenControl(self.base_url)

    # ---- control

    @property
    def config(self) -> FakeQwenConfig:
        return self._config

    def configure(self, **changes: Any) -> FakeQwenConfig:
        with self._lock:
            self._config = replace(self._config, **_validated_changes(changes))
            return self._config

    def inject(self, kind: str, count: int = 1, retry_after: float | str | None = None,
               delay: float | None = None, *, target: str | None = None,
               body: Any = None) -> None:
        """Queues ``count`` one-shot faults; each is used by the next matching request."""
        if kind not in FAULT_KINDS and _status_kind(kind) is None:
            raise ValueError(f"unknown fault kind {kind!r}")
        count = _as_int("count", count, minimum=1)
        if retry_after is not None and not isinstance(retry_after, str):
            retry_after = _as_number("retry_after", retry_after, minimum=0)
        if delay is not None:
            delay = _as_number("delay", delay, minimum=0)
        if target is None:
            target = "device_token" if kind == "slow_down" else "refresh"
        if target not in FAULT_TARGETS:
            raise ValueError(f"target must be one of {', '.join(sorted(FAULT_TARGETS))}")
        fault = Fault(kind, retry_after, delay, target, body)
        with self._lock:
            self._faults.extend([fault] * count)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._failure_p = 0.0

    def set_failure_rate(self, p: float, kinds: Sequence[str] | None = None,
                         seed: int | None = None) -> None:
        """Fails each refresh with probability ``p`` (when no queued fault applies)."""
        p = _as_number("p", p, minimum=0)
        if p > 1:
            raise ValueError("p must be <= 1")
        chosen = tuple(kinds) if kinds else DEFAULT_RANDOM_KINDS
        for kind in chosen:
            if kind not in FAULT_KINDS and _status_kind(kind) is None:
                raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._failure_p = p
            self._failure_kinds = chosen
            self._rng = random.Random(seed)

    def reject_token(self, refresh_token: str) -> None:
        """Makes one refresh token permanently rejected, as a server-side revocation would."""
        with self._lock:
            self._rejected.add(refresh_token)

    def issue_tokens(self, lifetime: float | None = None) -> tuple[str, str, int]:
        """A fresh token family for seeding stores: ``(access, refresh, expires_ms)``."""
        if lifetime is not None:
            lifetime = _as_number("lifetime", lifetime)
        with self._lock:
            issued = self._issue_locked(via="seed", replaced=None, lifetime=lifetime)
        return issued.access_token, issued.refresh_token, issued.expires_ms

    def approve(self, user_code: str) -> None:
        self._decide(user_code, "approved")

    def deny(self, user_code: str) -> None:
        self._decide(user_code, "denied")

    def _decide(self, user_code: str, status: str) -> None:
        with self._lock:
            device_code = self._user_codes.get(_normalise_user_code(user_code))
            if device_code is None:
                raise KeyError(f"unknown user code {user_code!r}")
            entry = self._devices[device_code]
            if entry.status != "pending":
                raise ValueError(f"user code {user_code!r} is already {entry.status}")
            entry.status = status

    def reset(self) -> None:
        """Forgets tokens, faults, device codes and the log; the configuration stays.

        Requests still in flight (a sleeping "timeout" fault) are left out of the new log, so a
        shared server can be reset between tests without one test's leftovers in the next.
        """
        with self._lock:
            self._reset_state()
            self._generation += 1

    # ---- observation

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    def refresh_requests(self) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self._log if r.grant_type == "refresh_token"]

    @property
    def issued(self) -> list[IssuedTokens]:
        with self._lock:
            return list(self._issued)

    @property
    def reuse_count(self) -> int:
        """Requests that presented an already-rotated refresh token: each one is a lost race."""
        with self._lock:
            return self._reuse_count

    @property
    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def max_rate(self, window_s: float) -> int:
        """The most refresh requests seen within any ``window_s`` seconds (a count, not a rate).

        Benchmarks use it to prove the daemon never hammers the endpoint, even while failing.
        """
        window_s = _as_number("window_s", window_s, minimum=0, exclusive=True)
        times = sorted(r.monotonic for r in self.refresh_requests())
        best = start = 0
        for end, t in enumerate(times):
            while t - times[start] >= window_s:
                start += 1
            best = max(best, end - start + 1)
        return best

    def pending_device_codes(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [
                {"user_code": d.user_code, "device_code": d.device_code, "status": d.status,
                 "expires_in": round(d.expires_at - now, 3), "polls": d.pending_polls}
                for d in self._devices.values()
                if d.status in ("pending", "approved") and d.expires_at > now
            ]

    def state(self) -> dict[str, Any]:
        """Everything observable, JSON-ready: what ``GET /_fake/state`` answers."""
        with self._lock:
            log_ = list(self._log)
            outcomes = Counter(r.outcome for r in log_)
            refreshes = [r for r in log_ if r.grant_type == "refresh_token"]
            return {
                "base_url": self.base_url if self._server is not None else None,
                "config": asdict(self._config),
                "counts": {
                    "requests": len(log_),
                    "refresh": len(refreshes),
                    "refresh_ok": sum(1 for r in refreshes if r.outcome == "ok"),
                    "device_codes": sum(1 for r in log_ if r.endpoint == "device_code"),
                    "device_polls": sum(1 for r in log_ if r.grant_type == DEVICE_GRANT_TYPE),
                    "chat": sum(1 for r in log_ if r.endpoint == "chat"),
                    "faults": sum(1 for r in log_ if r.fault is not None),
                    "issued": len(self._issued),
                    "outcomes": dict(outcomes),
                },
                "reuse_count": self._reuse_count,
                "requests": [asdict(r) for r in log_],
                "issued": [asdict(i) for i in self._issued],
                "pending_device_codes": self.pending_device_codes(),
                "pending_faults": [asdict(f) for f in self._faults],
                "failure_rate": {"p": self._failure_p, "kinds": list(self._failure_kinds)},
            }

    # ---- protocol (called from handler threads)

    def _issue_locked(self, *, via: str, replaced: str | None, lifetime: float | None = None,
                      keep_refresh: str | None = None) -> IssuedTokens:
        life = self._config.lifetime if lifetime is None else lifetime
        now = time.time()
        access = "fakeacc-" + secrets.token_urlsafe(32)
        refresh = keep_refresh or "fakeref-" + secrets.token_urlsafe(32)
        self._access[access] = now + life
        if keep_refresh is None:
            self._refresh[refresh] = _RefreshState(issued_at=now)
        issued = IssuedTokens(access, refresh, int((now + life) * 1000), replaced, via, now)
        self._issued.append(issued)
        return issued

    def _token_reply(self, issued: IssuedTokens) -> _Reply:
        cfg = self._config
        body: dict[str, Any] = {
            "access_token": issued.access_token,
            "token_type": "Bearer",
            "expires_in": _json_number(cfg.lifetime),
            "refresh_token": issued.refresh_token,
            "resource_url": self.resource_url,
        }
        if cfg.refresh_in_response == "omit":
            del body["refresh_token"]
        elif cfg.refresh_in_response == "empty":
            body["refresh_token"] = ""
        return _json_reply(200, body, "ok")

    def _reject(self, outcome: str) -> _Reply:
        cfg = self._config
        return _oauth_error(cfg.reject_status, cfg.reject_error, cfg.reject_description, outcome)

    def _refresh_grant(self, form: dict[str, str]) -> _Reply:
        token = form.get("refresh_token", "")
        with self._lock:
            cfg = self._config
            if form.get("client_id") != cfg.client_id:
                return self._reject("bad_client_id")
            state = self._refresh.get(token)
            if token in self._rejected:
                return self._reject("rejected")
            if state is None:
                return self._reject("unknown")
            if state.used:
                self._reuse_count += 1
                return self._reject("reused")
            if cfg.refresh_lifetime is not None and (
                    time.time() - state.issued_at >= cfg.refresh_lifetime):
                return self._reject("expired")
            keep = not cfg.rotate or cfg.refresh_in_response != "token"
            state.used = not keep
            issued = self._issue_locked(via="refresh", replaced=token,
                                        keep_refresh=token if keep else None)
            return self._token_reply(issued)

    def _device_authorize(self, form: dict[str, str]) -> _Reply:
        with self._lock:
            cfg = self._config
            if form.get("client_id") != cfg.client_id:
                return _oauth_error(400, "invalid_request", "Invalid client_id", "bad_client_id")
            challenge = form.get("code_challenge", "")
            if not challenge or form.get("code_challenge_method") != "S256":
                return _oauth_error(400, "invalid_request",
                                    "code_challenge with code_challenge_method=S256 is required",
                                    "no_pkce")
            device_code = "fakedev-" + secrets.token_urlsafe(32)
            while True:
                raw = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(8))
                if raw not in self._user_codes:
                    break
            user_code = f"{raw[:4]}-{raw[4:]}"
            self._user_codes[raw] = device_code
            self._devices[device_code] = _DeviceCode(
                device_code, user_code, challenge,
                time.monotonic() + cfg.device_code_lifetime, cfg.device_interval)
            uri = cfg.verification_uri or self.base_url + AUTHORIZE_PATH
            return _json_reply(200, {
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": uri,
                "verification_uri_complete": f"{uri}?{urlencode({'user_code': user_code})}",
                "expires_in": _json_number(cfg.device_code_lifetime),
                "interval": _json_number(cfg.device_interval),
            }, "ok")

    def _device_grant(self, form: dict[str, str]) -> _Reply:
        with self._lock:
            cfg = self._config
            if form.get("client_id") != cfg.client_id:
                return _oauth_error(400, "invalid_request", "Invalid client_id", "bad_client_id")
            entry = self._devices.get(form.get("device_code", ""))
            if entry is None:
                return _oauth_error(400, "invalid_grant", "Invalid device code",
                                    "unknown_device_code")
            if entry.status == "consumed":
                return _oauth_error(400, "invalid_grant", "Device code already used",
                                    "used_device_code")
            if time.monotonic() >= entry.expires_at:
                return _oauth_error(400, "expired_token", "Device code expired", "expired")
            if pkce_challenge(form.get("code_verifier", "")) != entry.challenge:
                return _oauth_error(400, "invalid_grant", "PKCE verification failed",
                                    "pkce_mismatch")
            if entry.status == "denied":
                return _oauth_error(400, "access_denied", "User denied the authorization",
                                    "denied")
            if (entry.status == "pending" and cfg.auto_approve_after is not None
                    and entry.pending_polls >= cfg.auto_approve_after):
                entry.status = "approved"
            if entry.status == "pending":
                entry.pending_polls += 1
                return _oauth_error(400, "authorization_pending", None, "pending")
            entry.status = "consumed"
            return self._token_reply(self._issue_locked(via="device", replaced=None))

    def _chat(self, access_token: str | None, body: bytes) -> _Reply:
        with self._lock:
            expiry = self._access.get(access_token) if access_token else None
        if expiry is None or time.time() >= expiry:
            outcome = "unknown_token" if expiry is None else "expired_token"
            return _json_reply(401, {"error": {
                "message": "Invalid or expired access token", "type": "invalid_request_error",
                "code": "invalid_api_key"}}, outcome)
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            return _json_reply(400, {"error": {"message": "body must be a JSON object",
                                               "type": "invalid_request_error"}}, "bad_body")
        model = request.get("model") if isinstance(request.get("model"), str) else "coder-model"
        text = "Hello from the fake Qwen server."
        created = int(time.time())
        reply_id = "chatcmpl-fake" + secrets.token_hex(8)
        if request.get("stream") is True:
            chunks = [
                {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": [{"index": 0, "delta": {
                     "role": "assistant", "content": text}, "finish_reason": None}]},
                {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            ]
            stream = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return _Reply(200, stream.encode(), "ok", content_type="text/event-stream")
        return _json_reply(200, {
            "id": reply_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 7, "total_tokens": 8},
        }, "ok")

    def _next_fault(self, target: str) -> Fault | None:
        with self._lock:
            for index, fault in enumerate(self._faults):
                if fault.target in (target, "any"):
                    del self._faults[index]
                    return fault
            if target == "refresh" and self._failure_p > 0 and (
                    self._rng.random() < self._failure_p):
                return Fault(self._rng.choice(self._failure_kinds))
            return None

    def _fault_reply(self, fault: Fault) -> _Reply | None:
        """The answer a fault sends instead of the real one; None means hang up."""
        kind, outcome = fault.kind, f"fault:{fault.kind}"
        if kind in ("drop", "timeout"):
            return None
        if kind == "empty200":
            return _Reply(200, b"", outcome)
        if kind == "html200":
            return _Reply(200, _HTML_200, outcome, content_type="text/html; charset=utf-8")
        if kind == "reject":
            reply = self._reject(outcome)
        elif kind == "slow_down":
            reply = _oauth_error(429, "slow_down", "Polling too fast", outcome)
        else:
            status = _status_kind(kind)
            assert status is not None
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = ""
            if status == 200:
                reply = _json_reply(200, {}, outcome)
            else:
                reply = _oauth_error(status, "server_error" if status >= 500 else
                                     phrase.lower().replace(" ", "_") or "error", phrase, outcome)
        if fault.body is not None:
            if isinstance(fault.body, str):
                reply.body, reply.content_type = fault.body.encode(), "text/plain; charset=utf-8"
            else:
                reply.body = json.dumps(fault.body).encode()
        retry_after = fault.retry_after
        if retry_after is None and kind == "429":
            retry_after = 1
        if retry_after is not None:
            reply.headers["Retry-After"] = (
                retry_after if isinstance(retry_after, str) else str(_json_number(retry_after)))
        return reply

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _record(self, record: RequestRecord, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._log.append(record)
        log.debug("fake qwen: %s %s -> %s (%s)", record.endpoint, record.grant_type,
                  record.status, record.outcome)

    def _control_call(self, name: str, args: dict[str, Any]) -> Any:
        """One ``POST /_fake/<name>``; KeyError becomes 404, ValueError/TypeError 400."""
        if name == "inject":
            self.inject(**args)
            return {"pending_faults": len(self.pending_faults)}
        if name == "failure_rate":
            self.set_failure_rate(**args)
            return {"ok": True}
        if name == "clear_faults":
            self.clear_faults()
            return {"ok": True}
        if name == "reject":
            self.reject_token(_as_str("refresh_token", args.get("refresh_token")))
            return {"ok": True}
        if name == "issue":
            access, refresh, expires_ms = self.issue_tokens(**args)
            return {"access_token": access, "refresh_token": refresh, "expires_ms": expires_ms}
        if name in ("approve", "deny"):
            code = _as_str("user_code", args.get("user_code"))
            (self.approve if name == "approve" else self.deny)(code)
            return {"ok": True}
        if name == "config":
            return asdict(self.configure(**args))
        if name == "reset":
            self.reset()
            return {"ok": True}
        raise KeyError(f"no control endpoint {name!r}")


# --------------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # benchmarks open many connections at once

    def __init__(self, address: tuple[str, int], fake: FakeQwen) -> None:
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket, alive: bool) -> None:
        with self._connections_lock:
            (self._connections.add if alive else self._connections.discard)(connection)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError) or self.fake._stopping.is_set():
            return  # clients hanging up on a slow or faulty answer is the point of this server
        log.exception("fake qwen: error while serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real service and httpx use it
    server_version = "FakeQwen/1.0"
    sys_version = ""
    timeout = 60  # an idle keep-alive connection must not pin a thread forever
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls

    @property
    def fake(self) -> FakeQwen:
        server = self.server
        assert isinstance(server, _Server)
        return server.fake

    def setup(self) -> None:
        super().setup()
        assert isinstance(self.server, _Server)
        self.server.track(self.connection, alive=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            assert isinstance(self.server, _Server)
            self.server.track(self.connection, alive=False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fake qwen: %s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ---- dispatch

    def _dispatch(self, method: str) -> None:
        try:
            body = self._read_body()
            if body is None:
                return
            url = urlsplit(self.path)  # also handles absolute-form targets; Host is ignored
            path = url.path.rstrip("/") or "/"
            if path.startswith(CONTROL_PREFIX):
                self._control(method, path.removeprefix(CONTROL_PREFIX), body)
            elif path == TOKEN_PATH:
                self._token(method, body)
            elif path == DEVICE_CODE_PATH:
                self._protocol(method, body, "device_code", "device_code",
                               self.fake._device_authorize)
            elif path in CHAT_PATHS:
                self._chat(method, body)
            elif path == AUTHORIZE_PATH:
                self._authorize(method, url.query, body)
            else:
                self._send(_json_reply(404, {"error": "not_found"}, "not_found"))
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("fake qwen: bug while handling %s %s", method, self.path)
            self._send(_json_reply(500, {"error": "fake_internal_error"}, "bug"))

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self._send(_json_reply(411, {"error": "length_required"}, "chunked"), close=True)
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self._send(_json_reply(400, {"error": "bad_content_length"}, "bad_length"),
                       close=True)
            return None
        return self.rfile.read(length) if length else b""

    def _form(self, body: bytes) -> dict[str, str] | None:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return None
        try:
            parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            return None
        return {key: values[0] for key, values in parsed.items()}

    def _base_record(self, endpoint: str, grant_type: str | None,
                     refresh_token: str | None) -> dict[str, Any]:
        return {
            "generation": self.fake._generation,
            "endpoint": endpoint, "grant_type": grant_type, "refresh_token": refresh_token,
            "user_agent": self.headers.get("User-Agent"), "accept": self.headers.get("Accept"),
            "content_type": self.headers.get("Content-Type"),
        }

    def _token(self, method: str, body: bytes) -> None:
        form = self._form(body) if method == "POST" else None
        if form is None:
            reply = (_oauth_error(400, "invalid_request",
                                  "Content-Type must be application/x-www-form-urlencoded",
                                  "not_form")
                     if method == "POST" else
                     _json_reply(405, {"error": "method_not_allowed"}, "bad_method"))
            self._finish(reply, self._base_record("token", None, None))
            return
        grant = form.get("grant_type")
        if grant == "refresh_token":
            self._protocol(method, body, "token", "refresh", self.fake._refresh_grant, form,
                           grant, form.get("refresh_token"))
        elif grant == DEVICE_GRANT_TYPE:
            self._protocol(method, body, "token", "device_token", self.fake._device_grant, form,
                           grant)
        else:
            reply = _oauth_error(400, "unsupported_grant_type", None, "unsupported_grant")
            self._finish(reply, self._base_record("token", grant, None))

    def _protocol(self, method: str, body: bytes, endpoint: str, target: str,
                  produce: Callable[[dict[str, str]], _Reply],
                  form: dict[str, str] | None = None, grant_type: str | None = None,
                  refresh_token: str | None = None) -> None:
        record = self._base_record(endpoint, grant_type, refresh_token)
        if form is None:
            form = self._form(body) if method == "POST" else None
            if form is None:
                self._finish(_oauth_error(400, "invalid_request",
                                          "expected a form-encoded POST", "not_form"), record)
                return
        self._with_faults(target, lambda: produce(form), record)

    def _with_faults(self, target: str, produce: Callable[[], _Reply],
                     record: dict[str, Any]) -> None:
        fake = self.fake
        fault = fake._next_fault(target)
        if fault is not None:
            record["fault"] = fault.kind
            if fault.kind == "delay":
                fake._sleep(_DELAY_DEFAULT if fault.delay is None else fault.delay)
            elif fault.kind == "timeout":
                fake._sleep(_TIMEOUT_DEFAULT_DELAY if fault.delay is None else fault.delay)
                self._finish(None, record, outcome="fault:timeout")
                return
            elif fault.kind != "lost":
                reply = fake._fault_reply(fault)
                self._finish(reply, record, outcome=f"fault:{fault.kind}")
                return
        reply = produce()
        if fault is not None and fault.kind == "lost":
            self._finish(None, record, outcome=reply.outcome)  # processed, answer never sent
            return
        if fake._stopping.is_set():
            self._finish(None, record, outcome=reply.outcome)
            return
        self._finish(reply, record)

    def _finish(self, reply: _Reply | None, record: dict[str, Any],
                outcome: str | None = None) -> None:
        now = time.time(), time.monotonic()
        fields_ = dict(record)
        generation = fields_.pop("generation")
        self.fake._record(RequestRecord(
            at=now[0], monotonic=now[1],
            outcome=outcome or (reply.outcome if reply is not None else "dropped"),
            status=reply.status if reply is not None else None, **fields_), generation)
        if reply is None:
            self.close_connection = True  # the socket is shut after this handler returns
            return
        self._send(reply)

    def _send(self, reply: _Reply, *, close: bool = False) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(reply.body)

    def _chat(self, method: str, body: bytes) -> None:
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        access = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        record = self._base_record("chat", None, None)
        record["access_token"] = access
        if method != "POST":
            self._finish(_json_reply(405, {"error": "method_not_allowed"}, "bad_method"), record)
            return
        self._with_faults("chat", lambda: self.fake._chat(access, body), record)

    def _authorize(self, method: str, query: str, body: bytes) -> None:
        """A one-button stand-in for Qwen's login page, for people running the demo by hand."""
        params = {k: v[0] for k, v in parse_qs(query).items()}
        message = ""
        if method == "POST":
            form = self._form(body) or {}
            params["user_code"] = form.get("user_code", "")
            try:
                if form.get("action") == "deny":
                    self.fake.deny(params["user_code"])
                    message = "Denied. You can close this page."
                else:
                    self.fake.approve(params["user_code"])
                    message = "Approved. You can close this page."
            except (KeyError, ValueError) as exc:
                message = str(exc.args[0])
        code = html.escape(params.get("user_code", ""))
        page = (
            "<!DOCTYPE html><html><head><title>Fake Qwen login</title></head><body>"
            f"<h1>Fake Qwen login</h1><p>{html.escape(message)}</p>"
            f'<form method="post" action="{AUTHORIZE_PATH}">'
            f'<label>User code <input name="user_code" value="{code}"></label> '
            '<button name="action" value="approve">Approve</button> '
            '<button name="action" value="deny">Deny</button></form></body></html>'
        )
        self._send(_Reply(200, page.encode(), "ok", content_type="text/html; charset=utf-8"))

    def _control(self, method: str, name: str, body: bytes) -> None:
        fake = self.fake
        if name == "state":
            self._send(_json_reply(200, fake.state(), "ok"))
            return
        if method != "POST":
            self._send(_json_reply(405, {"error": "use POST"}, "bad_method"))
            return
        try:
            args = json.loads(body) if body.strip() else {}
        except ValueError:
            args = None
        if not isinstance(args, dict):
            self._send(_json_reply(400, {"error": "body must be a JSON object"}, "bad_body"))
            return
        try:
            result = fake._control_call(name, args)
        except KeyError as exc:
            self._send(_json_reply(404, {"error": str(exc.args[0])}, "not_found"))
        except (ValueError, TypeError) as exc:
            self._send(_json_reply(400, {"error": str(exc)}, "bad_request"))
        else:
            self._send(_json_reply(200, result, "ok"))


# --------------------------------------------------------------------------- remote control


class FakeQwenControl:
    """Drives a fake over its HTTP control API (``/_fake/...``); stdlib only.

    Mirrors FakeQwen's control methods so a test reads the same in both modes. Errors map back:
    an unknown user code raises KeyError, a bad argument ValueError.
    """

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        if urlsplit(base_url).scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # A developer's HTTP(S)_PROXY must not swallow requests meant for 127.0.0.1.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    @property
    def device_code_url(self) -> str:
        return self.base_url + DEVICE_CODE_PATH

    @property
    def chat_url(self) -> str:
        return self.base_url + "/v1/chat/completions"

    def _call(self, name: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(  # noqa: S310 (scheme checked in __init__)
            self.base_url + CONTROL_PREFIX + name, data=data,
            method="GET" if payload is None else "POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                detail = ""
            if exc.code == 404:
                raise KeyError(detail or name) from None
            raise ValueError(f"/_fake/{name}: HTTP {exc.code}: {detail}") from None

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("state")
        return result

    def inject(self, kind: str, count: int = 1, retry_after: float | str | None = None,
               delay: float | None = None, *, target: str | None = None,
               body: Any = None) -> None:
        payload: dict[str, Any] = {"kind": kind, "count": count}
        for key, value in (("retry_after", retry_after), ("delay", delay), ("target", target),
                           ("body", body)):
            if value is not None:
                payload[key] = value
        self._call("inject", payload)

    def clear_faults(self) -> None:
        self._call("clear_faults", {})

    def set_failure_rate(self, p: float, kinds: Sequence[str] | None = None,
                         seed: int | None = None) -> None:
        self._call("failure_rate", {"p": p, "kinds": list(kinds) if kinds else None,
                                    "seed": seed})

    def reject_token(self, refresh_token: str) -> None:
        self._call("reject", {"refresh_token": refresh_token})

    def issue_tokens(self, lifetime: float | None = None) -> tuple[str, str, int]:
        result = self._call("issue", {} if lifetime is None else {"lifetime": lifetime})
        return result["access_token"], result["refresh_token"], int(result["expires_ms"])

    def approve(self, user_code: str) -> None:
        self._call("approve", {"user_code": user_code})

    def deny(self, user_code: str) -> None:
        self._call("deny", {"user_code": user_code})

    def configure(self, **changes: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("config", changes)
        return result

    def reset(self) -> None:
        self._call("reset", {})

    def refresh_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.state()["requests"] if r["grant_type"] == "refresh_token"]

    @property
    def issued(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.state()["issued"]
        return result

    @property
    def reuse_count(self) -> int:
        return int(self.state()["reuse_count"])

    def pending_device_codes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.state()["pending_device_codes"]
        return result


# --------------------------------------------------------------------------- subprocess mode


_READY = re.compile(r"^READY (http://[^\s]+)$")


class FakeQwenProcess:
    """Runs the fake as ``python -m qwen_refresher.testing.fake_qwen`` and controls it over HTTP.

    For tests that need the server in another process: killing it, or keeping its threads out of
    the process under test. ``args`` are extra command-line flags; keyword settings are applied
    through ``/_fake/config`` once it is up.
    """

    def __init__(self, args: Sequence[str] = (), *, startup_timeout: float = 10.0,
                 env: dict[str, str] | None = None, **config: Any) -> None:
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.env = env
        self.config = config
        self.process: subprocess.Popen[str] | None = None
        self.base_url = ""
        self._stderr: IO[bytes] | None = None

    def start(self) -> Self:
        if self.process is not None:
            raise RuntimeError("already started")
        env = dict(os.environ if self.env is None else self.env)
        # Importable even when the package is not installed: put its parent on the path.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        port_given = any(a == "--port" or a.startswith("--port=") for a in self.args)
        cmd = [sys.executable, "-m", "qwen_refresher.testing.fake_qwen",
               *([] if port_given else ["--port", "0"]), *self.args]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the process)
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=self._stderr, env=env, text=True)
        line = self._first_line(self.process)
        match = _READY.match(line.strip()) if line else None
        if match is None:
            self.stop(timeout=1)
            raise RuntimeError(f"fake qwen did not start (got {line!r}): {self.stderr_text()}")
        self.base_url = match.group(1)
        if self.config:
            self.control.configure(**self.config)
        return self

    def _first_line(self, process: subprocess.Popen[str]) -> str | None:
        lines: queue.Queue[str] = queue.Queue()
        stdout = process.stdout
        assert stdout is not None
        reader = threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True)
        reader.start()
        try:
            return lines.get(timeout=self.startup_timeout)
        except queue.Empty:
            return None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")[-4000:]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._stderr is not None:
            self._stderr.close()

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("not started")
        return self.process.pid

    @property
    def control(self) -> FakeQwenControl:
        return FakeQwenControl(self.base_url)

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    @property
    def device_code_url(self) -> str:
        return self.base_url + DEVICE_CODE_PATH

    @property
    def chat_url(self) -> str:
        return self.base_url + "/v1/chat/completions"


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwen_refresher.testing.fake_qwen",
        description="A fake Qwen OAuth server for tests, demos and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    for f in fields(FakeQwenConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "rotate":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help="rotate refresh tokens (default: on)")
        else:
            parser.add_argument(flag, default=None, metavar=f.name.upper(),
                                help=f"default: {f.default}")
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--failure-kinds", default=",".join(DEFAULT_RANDOM_KINDS))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(message)s",
                        level=logging.DEBUG if args.verbose else logging.WARNING)
    overrides = {f.name: getattr(args, f.name) for f in fields(FakeQwenConfig)
                 if getattr(args, f.name) is not None}
    try:
        fake = FakeQwen(host=args.host, port=args.port, **overrides)
        if args.failure_rate:
            fake.set_failure_rate(args.failure_rate, args.failure_kinds.split(","), args.seed)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        fake.start()
    except OSError as exc:
        print(f"fake qwen: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"READY {fake.base_url}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
