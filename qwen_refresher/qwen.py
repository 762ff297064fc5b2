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
import ssl
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import httpcore
import httpx

from . import __version__, errors, models
from .config import is_loopback_host
from .logsetup import secret_forms
from .stores.base import check_expires_in, check_token

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
#: Largest answer body we read, counted after decompression. A real answer is under 2 KiB.
MAX_BODY = 64 * 1024
#: Whole-request ceiling (connect, send, headers, body), whatever ``http_timeout`` says: a
#: refresh runs under the store lock and OpenClaw breaks a lock older than 30 s.
MAX_REQUEST_SECONDS = 20.0
#: Once shutdown is asked for, a request whose bytes have started to leave gets this long
#: (never more than its own deadline) to bring its answer back: the server may have rotated
#: already, and the answer then carries the only live refresh token. Under the 10 s a service
#: manager gives a stopping daemon. A request not started yet is never sent once stop is set.
STOP_GRACE = 8.0
#: How often a blocked read looks at the stop event.
_STOP_POLL = 0.25

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

    An error body that echoes our request shows the token the way the request carried it
    (URL-encoded), or JSON-escaped, or base64: every form ``secret_forms`` knows is redacted,
    longest first. Redaction happens before clipping so that a token cut by the clip cannot
    leak half of itself.
    """
    forms = {form for secret in secrets_sent for form in secret_forms(secret)}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, REDACTED)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _lenient_int(text: str) -> int | float:
    """An integer literal too long for ``int()`` (Python's digit limit) is a float, not a
    reason to throw away the whole answer and the new tokens in it."""
    return int(text) if len(text) < 64 else float(text)


def _json_object(response: _Answer) -> dict[str, Any] | None:
    try:
        body = json.loads(response.content, parse_int=_lenient_int)
    except (ValueError, RecursionError):  # ValueError covers UnicodeDecodeError too
        return None
    return body if isinstance(body, dict) else None


def _oauth_error(response: _Answer, secrets_sent: Iterable[str]) -> tuple[str, str]:
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


def _plain_text(value: Any, limit: int) -> str | None:
    """A short string without whitespace or control characters, else None."""
    if isinstance(value, str) and 0 < len(value) <= limit and check_token(value, "") is None:
        return value
    return None


def _grant_from(response: _Answer, what: str) -> TokenGrant:
    """The answer's tokens, held to the rules a store value is held to, *before* anything
    else looks at them.

    Tokens that fail those rules are never written (our own store would then be "invalid"
    for good): ``UnusableAnswer``. An unusable ``expires_in`` next to valid tokens is the
    opposite case: the server has rotated, the old token is spent, so the tokens are kept and
    the lifetime clamped (``check_expires_in``), with a warning.
    """
    body = _json_object(response)
    if body is None:
        if not response.content.strip():
            kind = "an empty body"
        elif response.content.lstrip()[:1] == b"[":
            kind = "a JSON body that is not an object"
        else:
            kind = "a non-JSON body"
        raise errors.UnusableAnswer(f"{what} answered HTTP 200 with {kind}")
    access = body.get("access_token")
    new_refresh = body.get("refresh_token")
    rotated = new_refresh not in (None, "")
    refresh_problem = check_token(new_refresh, "refresh_token") if rotated else None
    if refresh_problem is not None:
        raise errors.UnusableAnswer(f"{what} answered HTTP 200 but {refresh_problem}")
    problem = check_token(access, "access_token")
    if problem is not None:
        if rotated:
            # The rotation happened and this is the only live refresh token: keep it.
            log.warning("%s answered HTTP 200 with a valid new refresh token but %s; the "
                        "refresh token is kept and spent again at once for a usable access "
                        "token (unusable answer)", what, problem)
            raise errors.RotatedUnusableAccess(f"{what} answered HTTP 200 but {problem}",
                                               refresh_token=str(new_refresh))
        raise errors.UnusableAnswer(f"{what} answered HTTP 200 but {problem}")
    expires_in, clamp = check_expires_in(body.get("expires_in"))
    if clamp is not None:
        log.warning("%s answered HTTP 200 with valid tokens but %s; keeping the tokens and "
                    "assuming they expire in %gs", what, clamp, expires_in)
    resource_url = body.get("resource_url")
    if resource_url not in (None, "") and _plain_text(resource_url, 255) is None:
        log.warning("%s answered an unusable resource_url; leaving it out", what)
    refresh = body.get("refresh_token")
    return TokenGrant(
        access_token=str(access),
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        expires_in=expires_in,
        token_type=_plain_text(body.get("token_type"), 32) or "Bearer",
        resource_url=_plain_text(resource_url, 255),
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


# --------------------------------------------------------------------------- bounded requests


@dataclass(frozen=True)
class _Answer:
    """A response read whole, within the body cap: what the parsers above look at."""

    status_code: int
    headers: httpx.Headers
    content: bytes


class _Budget:
    """The deadline of the request running on this thread, shortened when ``stop`` is set.

    Before a byte of the request is written, stop ends it at once (nothing was spent).
    After, the server may already have consumed the refresh token and its answer is the only
    copy of the new one: the request keeps up to ``STOP_GRACE`` from the moment stop was
    first seen, within its own deadline.
    """

    def __init__(self, seconds: float, stop: threading.Event | None) -> None:
        self.deadline = time.monotonic() + seconds
        self.stop = stop
        #: Set by the first write of the request: from then on the server may act on it.
        self.sent = False
        self._stop_seen: float | None = None

    def remaining(self) -> float:
        now = time.monotonic()
        if self.stop is not None and self.stop.is_set():
            if self._stop_seen is None:
                self._stop_seen = now
            grace = STOP_GRACE if self.sent else 0.0
            self.deadline = min(self.deadline, self._stop_seen + grace)
        return self.deadline - now


#: The budget of the request the current thread is making (the client is shared by threads,
#: and httpcore does a request's I/O on the thread that made it).
_BUDGET = threading.local()


def _budget() -> _Budget | None:
    budget: _Budget | None = getattr(_BUDGET, "current", None)
    return budget


def _bounded(timeout: float | None, exc: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of the request's budget; raises when nothing is."""
    budget = _budget()
    if budget is None:
        return timeout
    left = budget.remaining()
    if left <= 0:
        raise exc("the request's overall deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose every operation is bounded by the request's overall deadline.

    httpx's timeouts are per operation: a server that drips one byte every 2 s never trips
    a 15 s read timeout and can hold the request (and the store lock) open for ever. Each
    read here may wait only for what is left of the budget, and looks at the stop event
    every ``_STOP_POLL`` so that shutdown is not held up by a server that never answers.
    """

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        started = time.monotonic()
        while True:
            per_read = None if timeout is None else timeout - (time.monotonic() - started)
            if per_read is not None and per_read <= 0:
                raise httpcore.ReadTimeout("timed out")
            left = _bounded(per_read, httpcore.ReadTimeout)
            budget = _budget()
            if budget is None or budget.stop is None or (left is not None
                                                         and left <= _STOP_POLL):
                return self._inner.read(max_bytes, left)
            try:
                # A timed-out recv consumes nothing, so polling in slices is safe.
                return self._inner.read(max_bytes, _STOP_POLL)
            except httpcore.ReadTimeout:
                continue

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        bounded = _bounded(timeout, httpcore.WriteTimeout)  # raises if stopped before sending
        budget = _budget()
        if budget is not None:
            budget.sent = True
        self._inner.write(buffer, bounded)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(
            ssl_context, server_hostname, _bounded(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(
            host, port, _bounded(timeout, httpcore.ConnectTimeout), local_address,
            socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None,
                            ) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(
            path, _bounded(timeout, httpcore.ConnectTimeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _proxy_for(*urls: str) -> str | None:
    """The proxy the environment asks for, or None. Never one for a loopback URL: a proxy
    would receive the refresh token of a request meant never to leave this machine (and in
    clear text, since loopback is where http:// is allowed)."""
    hosts = [urlsplit(u).hostname or "" for u in urls]
    if any(is_loopback_host(h) for h in hosts):
        return None
    proxies = urllib.request.getproxies()
    scheme = urlsplit(urls[0]).scheme
    if any(urllib.request.proxy_bypass(h) for h in hosts):
        return None
    return proxies.get(scheme) or proxies.get("all") or None


def _transport(proxy: str | None) -> httpx.HTTPTransport:
    """httpx's transport with every socket bounded by the request's overall deadline."""
    transport = httpx.HTTPTransport(proxy=proxy)  # trust_env: SSL_CERT_FILE still counts
    pool = transport._pool
    # httpcore takes a network backend only in the pool's constructor, which httpx does not
    # expose; the attribute is httpcore's documented extension point behind it.
    pool._network_backend = _DeadlineBackend(pool._network_backend)
    return transport


def _decoder(encoding: str) -> Any:
    """A zlib stream for the body's Content-Encoding, or None for identity."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return None
    if name in ("gzip", "x-gzip"):
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if name == "deflate":
        return zlib.decompressobj()
    raise ValueError("an unsupported Content-Encoding")


def _read_body(response: httpx.Response, cap: int = MAX_BODY) -> bytes:
    """The decoded body, refused (ValueError naming why) beyond ``cap`` bytes.

    Decompression is ours, not httpx's, so that output is bounded *while inflating*: httpx
    inflates a whole network chunk at once, and 64 KiB of gzip is 64 MiB of zeros. Raw bytes
    are capped as well (a compressed stream that inflates to nothing can still be endless).
    """
    decoder = _decoder(response.headers.get("Content-Encoding", ""))
    out = bytearray()
    raw = 0
    for chunk in response.iter_raw():
        raw += len(chunk)
        if raw > cap:
            raise ValueError(f"a body larger than {cap // 1024} KiB")
        if decoder is None:
            out += chunk
        else:
            pending = chunk
            while pending and len(out) <= cap:
                try:
                    out += decoder.decompress(pending, cap + 1 - len(out))
                except zlib.error:
                    raise ValueError("a body that does not decompress") from None
                pending = decoder.unconsumed_tail
        if len(out) > cap:
            raise ValueError(f"a body larger than {cap // 1024} KiB once decompressed")
    return bytes(out)


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
        #: The whole request, answer included, never takes longer than this.
        self.deadline = min(timeout, MAX_REQUEST_SECONDS)
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": user_agent, "Accept": "application/json",
                     "Accept-Encoding": "gzip, deflate"},
            follow_redirects=False,  # never re-send a refresh token somewhere we did not choose
            # The environment's proxy is looked up once, here, by ``_proxy_for``; httpx's own
            # lookup would send a loopback request (and its token) to HTTP_PROXY.
            trust_env=False,
            transport=_transport(_proxy_for(token_url, device_code_url)),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _post(self, url: str, form: dict[str, str], what: str,
              stop: threading.Event | None = None) -> _Answer:
        """POST ``form`` and read the answer within ``self.deadline`` and ``MAX_BODY``.

        A 200 whose body cannot be read whole (too big, too slow, broken) is UnusableAnswer:
        the server may have rotated already. Anything else that fails is transient.
        """
        if stop is not None and stop.is_set():
            # Stopping: a request never sent spends nothing, one sent now might be cut.
            raise errors.TransientOAuthError(f"not sent to {what}: the daemon is stopping")
        started = time.monotonic()
        _BUDGET.current = _Budget(self.deadline, stop)
        status: int | None = None
        try:
            with self._http.stream("POST", url, data=form) as response:
                status = response.status_code
                body = _read_body(response)
                headers = response.headers
        except httpx.TransportError as exc:
            # ``from None``: httpx exceptions carry the request, and the request carries tokens.
            reason = _transport_reason(exc, what)
            if status == 200:
                raise errors.UnusableAnswer(f"{what} answered HTTP 200 but {reason}") from None
            raise errors.TransientOAuthError(reason) from None
        except ValueError as exc:  # from _read_body: too big, bad encoding
            if status == 200:
                raise errors.UnusableAnswer(f"{what} answered HTTP 200 with {exc}") from None
            raise errors.TransientOAuthError(f"{what} answered HTTP {status} with {exc}"
                                             ) from None
        finally:
            _BUDGET.current = None
        log.debug("%s answered HTTP %d in %.2fs", what, status, time.monotonic() - started)
        return _Answer(status, headers, body)

    # ---- refresh

    def refresh(self, refresh_token: str, *, stop: threading.Event | None = None) -> TokenGrant:
        """Trades a refresh token for new tokens, or says precisely why not.

        Raises RefreshTokenRejected only when retrying the same token cannot help,
        UnusableAnswer for a 200 that cannot be used, and TransientOAuthError (with
        ``retry_after`` when the server gave one) otherwise. Once ``stop`` is set, no request
        is started, and one already sent is given at most ``STOP_GRACE`` more seconds.
        """
        what = "token endpoint"
        response = self._post(self.token_url, {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": self.client_id,
        }, what, stop)
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
