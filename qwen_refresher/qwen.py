"""The Qwen OAuth client: refresh tokens and device-code login, and what each answer means.

The one decision that matters here is the split between "try again later" and "this refresh
token is dead". Getting it wrong in one direction loops on a revoked token forever; in the other
it throws away working credentials because a gateway hiccuped. So only an explicit rejection of
the token (400/401 naming it) raises ``RefreshTokenRejected``; everything we do not understand,
including a 200 we cannot parse, is ``TransientOAuthError``.

Tokens never leave this module inside a message: reasons are built from status codes and the
server's error text, with anything we sent redacted from it. Protocol facts are in
``shared/reference/qwen-oauth.md``.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC
from types import TracebackType
from typing import Any, Self

import httpx

from . import __version__, errors, models

__all__ = [
    "DEFAULT_DEVICE_CODE_URL",
    "DEFAULT_TOKEN_URL",
    "DEVICE_GRANT_TYPE",
    "QWEN_CLIENT_ID",
    "SCOPE",
    "DeviceAuthorization",
    "QwenOAuthClient",
    "SlowDown",
    "TokenGrant",
    "parse_retry_after",
]

DEFAULT_TOKEN_URL = "https://chat.qwen.ai/api/v1/oauth2/token"
DEFAULT_DEVICE_CODE_URL = "https://chat.qwen.ai/api/v1/oauth2/device/code"
QWEN_CLIENT_ID = "f0304373b74a44d2b584a3fb70ca9e56"  # public client, no secret
SCOPE = "openid profile email model.completion"
DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"

#: OAuth error codes that mean the refresh token itself was refused.
REJECTION_ERRORS = frozenset(
    {"invalid_grant", "invalid_request", "invalid_token", "unauthorized_client"})
DEFAULT_POLL_INTERVAL = 2.0
MAX_POLL_INTERVAL = 10.0
MAX_DESCRIPTION = 200
REDACTED = "[redacted]"

log = logging.getLogger(__name__)
# httpx logs every request line at INFO; our own log says what matters, once.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)


class SlowDown(errors.TransientOAuthError):
    """``poll_device_token`` raises this for ``slow_down``: poll 1.5x less often.

    A subclass of TransientOAuthError so that a caller who only knows "retry later" still
    behaves; ``wait_for_device_token`` handles it for you.
    """

    def __init__(self) -> None:
        super().__init__("token endpoint asked us to poll more slowly (slow_down)")


@dataclass(frozen=True)
class TokenGrant:
    """A successful token answer. ``refresh_token`` is None when the server sent none."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: float
    token_type: str = "Bearer"
    resource_url: str | None = None

    def to_credentials(self, now_ms: int, previous_refresh: str) -> models.Credentials:
        """Credentials to store; a missing refresh token means the old one stays valid."""
        return models.Credentials(
            access=self.access_token,
            refresh=self.refresh_token or previous_refresh,
            expires_ms=int(now_ms + self.expires_in * 1000),
            resource_url=self.resource_url,
            token_type=self.token_type,
        )


@dataclass(frozen=True)
class DeviceAuthorization:
    """A started device-code login: show ``user_code``/URIs to the user, keep the rest secret.

    ``started_at`` is ``time.monotonic()`` when the server answered, so expiry survives clock
    jumps.
    """

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    code_verifier: str = field(repr=False)
    interval: float = DEFAULT_POLL_INTERVAL
    started_at: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        """The monotonic time after which the device code is dead."""
        return self.started_at + self.expires_in


# --------------------------------------------------------------------------- helpers


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date).

    Garbage gives None rather than an error: a broken header must not turn a transient failure
    into a crash. Dates in the past give 0.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _clean(text: str, secrets_sent: Iterable[str], limit: int = MAX_DESCRIPTION) -> str:
    """Server text made safe to log: our secrets redacted, one line, clipped.

    Redaction happens before clipping so that a token cut by the clip cannot leak half of itself.
    """
    for secret in secrets_sent:
        if secret:
            text = text.replace(secret, REDACTED)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = json.loads(response.content)
    except (ValueError, RecursionError):  # ValueError covers UnicodeDecodeError too
        return None
    return body if isinstance(body, dict) else None


def _oauth_error(response: httpx.Response, secrets_sent: Iterable[str]) -> tuple[str, str]:
    """(error code, description) from an OAuth error body, both cleaned; empty when absent."""
    body = _json_object(response) or {}
    sent = list(secrets_sent)
    error = body.get("error")
    description = body.get("error_description")
    return (_clean(error, sent, 64) if isinstance(error, str) else "",
            _clean(description, sent) if isinstance(description, str) else "")


def _positive_number(value: Any) -> float | None:
    """A finite number > 0, accepting numeric strings: a typed field is not worth a login."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def _non_empty(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _grant_from(response: httpx.Response, what: str) -> TokenGrant:
    body = _json_object(response)
    if body is None:
        kind = "an empty" if not response.content.strip() else "a non-JSON"
        raise errors.TransientOAuthError(f"{what} answered HTTP 200 with {kind} body")
    access = _non_empty(body.get("access_token"))
    expires_in = _positive_number(body.get("expires_in"))
    if access is None:
        raise errors.TransientOAuthError(f"{what} answered HTTP 200 without an access_token")
    if expires_in is None:
        raise errors.TransientOAuthError(f"{what} answered HTTP 200 without a valid expires_in")
    return TokenGrant(
        access_token=access,
        refresh_token=_non_empty(body.get("refresh_token")),
        expires_in=expires_in,
        token_type=_non_empty(body.get("token_type")) or "Bearer",
        resource_url=_non_empty(body.get("resource_url")),
    )


def _transport_reason(exc: httpx.TransportError, what: str) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"{what} timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {what}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"{what} closed the connection without a valid answer"
    return f"network error talking to {what} ({type(exc).__name__})"


def _mentions_refresh_token(*texts: str) -> bool:
    return any("refresh token" in t.lower().replace("_", " ") for t in texts)


def _default_sleep(stop: threading.Event | None) -> Callable[[float], object]:
    """Waiting on ``stop`` rather than sleeping makes cancellation immediate."""
    return stop.wait if stop is not None else time.sleep


# --------------------------------------------------------------------------- the client


class QwenOAuthClient:
    """One shared ``httpx.Client`` for every refresh and login; safe to use from many threads."""

    def __init__(self, token_url: str, device_code_url: str, client_id: str,
                 timeout: float = 15.0,
                 user_agent: str = f"qwen-refresher/{__version__}") -> None:
        if not user_agent:
            raise ValueError("user_agent must not be empty: Qwen misbehaves without one")
        self.token_url = token_url
        self.device_code_url = device_code_url
        self.client_id = client_id
        self.timeout = timeout
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": user_agent, "Accept": "application/json"},
            follow_redirects=False,  # never re-send a refresh token somewhere we did not choose
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _post(self, url: str, form: dict[str, str], what: str) -> httpx.Response:
        started = time.monotonic()
        try:
            response = self._http.post(url, data=form)
        except httpx.TransportError as exc:
            # ``from None``: httpx exceptions carry the request, and the request carries tokens.
            raise errors.TransientOAuthError(_transport_reason(exc, what)) from None
        log.debug("%s answered HTTP %d in %.2fs", what, response.status_code,
                  time.monotonic() - started)
        return response

    # ---- refresh

    def refresh(self, refresh_token: str) -> TokenGrant:
        """Trades a refresh token for new tokens, or says precisely why not.

        Raises RefreshTokenRejected only when retrying the same token cannot help, and
        TransientOAuthError (with ``retry_after`` when the server gave one) otherwise.
        """
        what = "token endpoint"
        response = self._post(self.token_url, {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": self.client_id,
        }, what)
        status = response.status_code
        if status == 200:
            return _grant_from(response, what)
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            label = " (rate limited)" if status == 429 else ""
            raise errors.TransientOAuthError(f"HTTP {status} from {what}{label}",
                                             retry_after=retry_after)
        error, description = _oauth_error(response, (refresh_token,))
        detail = ": ".join(p for p in (error, description) if p)
        if status in (400, 401) and (
                error in REJECTION_ERRORS or _mentions_refresh_token(error, description)):
            raise errors.RefreshTokenRejected(
                f"server rejected the refresh token: {detail}", status=status)
        # A 4xx we do not understand (403 from a WAF, 404 from a moved endpoint...) says nothing
        # about the token, so the credentials are kept and the caller retries later.
        raise errors.TransientOAuthError(
            f"unexpected HTTP {status} from {what}" + (f": {detail}" if detail else ""))

    # ---- device-code login

    def start_device_flow(self) -> DeviceAuthorization:
        """Asks for a device code, with a fresh PKCE pair bound to it."""
        verifier = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
        challenge = base64.urlsafe_b64encode(
            hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        what = "device authorization endpoint"
        response = self._post(self.device_code_url, {
            "client_id": self.client_id,
            "scope": SCOPE,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }, what)
        status = response.status_code
        if status == 429 or status >= 500:
            raise errors.TransientOAuthError(
                f"HTTP {status} from {what}",
                retry_after=parse_retry_after(response.headers.get("Retry-After")))
        if status != 200:
            error, description = _oauth_error(response, ())
            detail = ": ".join(p for p in (error, description) if p) or f"HTTP {status}"
            raise errors.DeviceFlowError(f"{what} refused to start a login: {detail}")
        body = _json_object(response) or {}
        device_code = _non_empty(body.get("device_code"))
        user_code = _non_empty(body.get("user_code"))
        verification_uri = _non_empty(body.get("verification_uri"))
        if device_code is None or user_code is None or verification_uri is None:
            raise errors.DeviceFlowError(f"{what} answered without a usable device code")
        return DeviceAuthorization(
            device_code=device_code,
            user_code=user_code,
            verification_uri=verification_uri,
            verification_uri_complete=_non_empty(body.get("verification_uri_complete")),
            expires_in=_positive_number(body.get("expires_in")) or 300.0,
            code_verifier=verifier,
            interval=_positive_number(body.get("interval")) or DEFAULT_POLL_INTERVAL,
        )

    def poll_device_token(self, auth: DeviceAuthorization) -> TokenGrant | None:
        """One poll: a TokenGrant once approved, None while ``authorization_pending``.

        Raises SlowDown for ``slow_down`` (also a bare 429), TransientOAuthError for network
        trouble and 5xx, and DeviceFlowError when the login is over without tokens.
        """
        what = "token endpoint"
        response = self._post(self.token_url, {
            "grant_type": DEVICE_GRANT_TYPE,
            "client_id": self.client_id,
            "device_code": auth.device_code,
            "code_verifier": auth.code_verifier,
        }, what)
        status = response.status_code
        if status == 200:
            return _grant_from(response, what)
        error, description = _oauth_error(response, (auth.device_code, auth.code_verifier))
        if error == "authorization_pending":
            return None
        if error == "slow_down" or (status == 429 and not error):
            raise SlowDown()
        if status >= 500 or status == 429:
            raise errors.TransientOAuthError(
                f"HTTP {status} from {what}",
                retry_after=parse_retry_after(response.headers.get("Retry-After")))
        if error == "access_denied":
            raise errors.DeviceFlowError("the login was denied in the browser")
        if error == "expired_token":
            raise errors.DeviceFlowError("the login code expired before it was approved")
        detail = ": ".join(p for p in (error, description) if p) or f"HTTP {status}"
        raise errors.DeviceFlowError(f"{what} refused the device code: {detail}")

    def wait_for_device_token(self, auth: DeviceAuthorization, *,
                              stop: threading.Event | None = None,
                              sleep: Callable[[float], object] | None = None) -> TokenGrant:
        """Polls until the user approves, the code expires, or ``stop`` is set.

        Sleeps ``auth.interval`` before each poll, 1.5x longer after each ``slow_down`` (capped
        at 10 s, or the server's own interval if that is longer). Transient failures are retried
        at the current interval until the code expires. ``sleep`` replaces ``stop.wait`` /
        ``time.sleep``, for tests.
        """
        pause: Callable[[float], object] = sleep or _default_sleep(stop)
        interval = auth.interval if auth.interval > 0 else DEFAULT_POLL_INTERVAL
        cap = max(MAX_POLL_INTERVAL, interval)
        while True:
            remaining = auth.deadline - time.monotonic()
            if remaining <= 0:
                raise errors.DeviceFlowError("the login code expired before it was approved")
            pause(min(interval, remaining))
            if stop is not None and stop.is_set():
                raise errors.DeviceFlowError("cancelled")
            try:
                grant = self.poll_device_token(auth)
            except SlowDown:
                interval = min(interval * 1.5, cap)
                continue
            except errors.TransientOAuthError as exc:
                log.debug("device poll failed, will retry: %s", exc.reason)
                continue
            if grant is not None:
                return grant
