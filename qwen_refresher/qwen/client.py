"""The Qwen OAuth client: refresh tokens and device-code login.

One shared ``httpx.Client`` for every refresh and login, safe to use from many threads. What an
answer means is ``answers``' business; how long a request may take and how much of a body we
read is ``transport``'s. Once ``stop`` is set no request is started, and one already sent is
given at most ``STOP_GRACE`` more seconds (its answer may hold the only live refresh token).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Self

from .. import __version__, errors
from ..errors import SlowDown
from ..protocols import StopSignal
from .answers import (
    Answer,
    DeviceAuthorization,
    TokenGrant,
    grant_from,
    json_object,
    mentions_refresh_token,
    non_empty,
    oauth_error,
    positive_number,
    retry_later,
    status_kind,
)
from .constants import (
    DEFAULT_POLL_INTERVAL,
    DEVICE_GRANT_TYPE,
    MAX_POLL_INTERVAL,
    MAX_REQUEST_SECONDS,
    REJECTION_ERRORS,
    SCOPE,
)

if TYPE_CHECKING:
    import httpx

# httpx (and ``transport``, built on it) is imported where a request is first made, not
# here: ~80 ms of a daemon's start-up that nothing before its first request needs.

log = logging.getLogger("qwen_refresher.qwen")


def _default_sleep(stop: StopSignal | None) -> Callable[[float], object]:
    """Waiting on ``stop`` rather than sleeping makes cancellation immediate."""
    return stop.wait if stop is not None else time.sleep


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
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._closed = False
        self._user_agent = user_agent

    @property
    def _http(self) -> httpx.Client:
        """The ``httpx.Client``, built on first use: its TLS context (the CA bundle parsed)
        is ~50 ms and ~1.7 MB, which a daemon need not pay before it is ready — it builds
        it just after (``warm``) or at its first request, whichever comes first."""
        client = self._client
        if client is None:
            with self._lock:
                if self._closed:  # as httpx says of a closed client
                    raise RuntimeError("the HTTP client has been closed")
                if self._client is None:
                    self._client = self._build()
                client = self._client
        return client

    def _build(self) -> httpx.Client:
        import httpx

        from .transport import deadline_transport, proxy_for

        return httpx.Client(
            timeout=httpx.Timeout(self.timeout),
            headers={"User-Agent": self._user_agent, "Accept": "application/json",
                     "Accept-Encoding": "gzip, deflate"},
            follow_redirects=False,  # never re-send a refresh token somewhere we did not choose
            # The environment's proxy is looked up once, here, by ``proxy_for``; httpx's own
            # lookup would send a loopback request (and its token) to HTTP_PROXY.
            trust_env=False,
            transport=deadline_transport(proxy_for(self.token_url, self.device_code_url)),
        )

    def warm(self) -> None:
        """Build the HTTP client now (off the start-up path), so a refresh does not; nothing
        once closed (a reload may retire this client before its warm-up job runs)."""
        if not self._closed:
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                self._http  # noqa: B018 -- the property builds it

    def close(self) -> None:
        with self._lock:
            client, self._client, self._closed = self._client, None, True
        if client is not None:
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _post(self, url: str, form: dict[str, str], what: str,
              stop: StopSignal | None = None) -> Answer:
        """POST ``form`` and read the answer within ``self.deadline`` and ``MAX_BODY``.

        A 200 whose body cannot be read whole (too big, too slow, broken) is UnusableAnswer:
        the server may have rotated already. Anything else that fails is transient.
        """
        if stop is not None and stop.is_set():
            # Stopping: a request never sent spends nothing, one sent now might be cut.
            raise errors.NotSent(f"not sent to {what}: the daemon is stopping")
        import httpx

        from .transport import BUDGET, Budget, read_body, transport_failure

        started = time.monotonic()
        BUDGET.current = Budget(self.deadline, stop)
        status: int | None = None
        try:
            with self._http.stream("POST", url, data=form) as response:
                status = response.status_code
                body = read_body(response)
                headers = response.headers
        except httpx.TransportError as exc:
            # ``from None``: httpx exceptions carry the request, and the request carries tokens.
            kind, reason = transport_failure(exc, what)
            if status == 200:
                raise errors.UnusableAnswer(f"{what} answered HTTP 200 but {reason}") from None
            raise kind(reason) from None
        except ValueError as exc:  # from read_body: too big, bad encoding
            if status == 200:
                raise errors.UnusableAnswer(f"{what} answered HTTP 200 with {exc}") from None
            raise status_kind(status)(f"{what} answered HTTP {status} with {exc}") from None
        finally:
            BUDGET.current = None
        log.debug("%s answered HTTP %d in %.2fs", what, status, time.monotonic() - started)
        return Answer(status, headers, body)

    # ---- refresh

    def refresh(self, refresh_token: str, *, stop: StopSignal | None = None) -> TokenGrant:
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
            return grant_from(response, what)
        if status == 429 or status >= 500:
            raise retry_later(status, what, response)
        error, description = oauth_error(response, (refresh_token,))
        detail = ": ".join(p for p in (error, description) if p)
        if status in (400, 401) and (
                error in REJECTION_ERRORS or mentions_refresh_token(error, description)):
            raise errors.RefreshTokenRejected(
                f"server rejected the refresh token: {detail}", status=status)
        # A 4xx we do not understand (403 from a WAF, 404 from a moved endpoint...) says nothing
        # about the token, so the credentials are kept and the caller retries later.
        raise retry_later(status, what, response, detail)

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
            raise retry_later(status, what, response)
        if status != 200:
            error, description = oauth_error(response, ())
            detail = ": ".join(p for p in (error, description) if p) or f"HTTP {status}"
            raise errors.DeviceFlowError(f"{what} refused to start a login: {detail}")
        body = json_object(response) or {}
        device_code = non_empty(body.get("device_code"))
        user_code = non_empty(body.get("user_code"))
        verification_uri = non_empty(body.get("verification_uri"))
        if device_code is None or user_code is None or verification_uri is None:
            raise errors.DeviceFlowError(f"{what} answered without a usable device code")
        return DeviceAuthorization(
            device_code=device_code,
            user_code=user_code,
            verification_uri=verification_uri,
            verification_uri_complete=non_empty(body.get("verification_uri_complete")),
            expires_in=positive_number(body.get("expires_in")) or 300.0,
            code_verifier=verifier,
            interval=positive_number(body.get("interval")) or DEFAULT_POLL_INTERVAL,
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
            return grant_from(response, what)
        error, description = oauth_error(response, (auth.device_code, auth.code_verifier))
        if error == "authorization_pending":
            return None
        if error == "slow_down" or (status == 429 and not error):
            raise SlowDown()
        if status >= 500 or status == 429:
            raise retry_later(status, what, response)
        if error == "access_denied":
            raise errors.DeviceFlowError("the login was denied in the browser")
        if error == "expired_token":
            raise errors.DeviceFlowError("the login code expired before it was approved")
        detail = ": ".join(p for p in (error, description) if p) or f"HTTP {status}"
        raise errors.DeviceFlowError(f"{what} refused the device code: {detail}")

    def wait_for_device_token(self, auth: DeviceAuthorization, *,
                              stop: StopSignal | None = None,
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
