"""Token book-keeping: the OAuth protocol the fake serves (refresh grant with rotation and
reuse rejection, device flow with PKCE, chat completions gated on the access token) over the
tokens and device codes it has handed out (``_TokenBook``, mixed into ``FakeQwen``).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any
from urllib.parse import urlencode

from .config import (
    _USER_CODE_ALPHABET,
    AUTHORIZE_PATH,
    FakeQwenConfig,
    _as_number,
)
from .records import (
    IssuedTokens,
    _DeviceCode,
    _json_number,
    _json_reply,
    _normalise_user_code,
    _oauth_error,
    _RefreshState,
    _reject_reply,
    _Reply,
    pkce_challenge,
)


class _TokenBook:
    """Token book-keeping of a ``FakeQwen`` (a mixin): access and refresh tokens issued,
    rotated, reused or rejected, and device codes from issue to approval. The state lives on
    the fake, behind its one lock, and is reset by ``_reset_tokens``."""

    _lock: threading.RLock
    _config: FakeQwenConfig

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    @property
    def resource_url(self) -> str:
        raise NotImplementedError

    def _reset_tokens(self) -> None:
        self._access: dict[str, float] = {}  # access token -> expiry (time.time())
        self._refresh: dict[str, _RefreshState] = {}
        self._rejected: set[str] = set()
        self._issued: list[IssuedTokens] = []
        self._devices: dict[str, _DeviceCode] = {}
        self._user_codes: dict[str, str] = {}  # normalised user code -> device code
        self._reuse_count = 0

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

    @property
    def issued(self) -> list[IssuedTokens]:
        with self._lock:
            return list(self._issued)

    @property
    def reuse_count(self) -> int:
        """Requests that presented an already-rotated refresh token: each one is a lost race."""
        with self._lock:
            return self._reuse_count

    def pending_device_codes(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [
                {"user_code": d.user_code, "device_code": d.device_code, "status": d.status,
                 "expires_in": round(d.expires_at - now, 3), "polls": d.pending_polls}
                for d in self._devices.values()
                if d.status in ("pending", "approved") and d.expires_at > now
            ]

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

    def _refresh_grant(self, form: dict[str, str]) -> _Reply:
        token = form.get("refresh_token", "")
        with self._lock:
            cfg = self._config
            if form.get("client_id") != cfg.client_id:
                return _reject_reply(cfg, "bad_client_id")
            state = self._refresh.get(token)
            if token in self._rejected:
                return _reject_reply(cfg, "rejected")
            if state is None:
                return _reject_reply(cfg, "unknown")
            if state.used:
                self._reuse_count += 1
                return _reject_reply(cfg, "reused")
            if cfg.refresh_lifetime is not None and (
                    time.time() - state.issued_at >= cfg.refresh_lifetime):
                return _reject_reply(cfg, "expired")
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

