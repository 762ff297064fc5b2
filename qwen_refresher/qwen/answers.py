"""What each answer of the token endpoint means, decided at the boundary.

The one decision that matters here is the split between "try again later" and "this refresh
token is dead". Getting it wrong in one direction loops on a revoked token forever; in the other
it throws away working credentials because a gateway hiccuped. So only an explicit rejection of
the token (400/401 naming it) is ``RefreshTokenRejected``; everything we do not understand,
including a 200 we cannot parse, is a ``TransientOAuthError`` of the kind that says why
(``errors.py``). Tokens in an answer are held to the rules a store value is held to before
anything else looks at them.

Tokens never leave this module inside a message: reasons are built from status codes and the
server's error text, with anything we sent redacted from it.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC
from typing import TYPE_CHECKING, Any

from .. import errors, models
from ..logsetup import secret_forms
from ..stores.base import check_expires_in, check_token
from .constants import DEFAULT_POLL_INTERVAL

if TYPE_CHECKING:
    import httpx

MAX_DESCRIPTION = 200
REDACTED = "[redacted]"

log = logging.getLogger("qwen_refresher.qwen")


@dataclass(frozen=True)
class Answer:
    """A response read whole, within the body cap: what the parsers below look at."""

    status_code: int
    headers: httpx.Headers
    content: bytes


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


def json_object(response: Answer) -> dict[str, Any] | None:
    try:
        body = json.loads(response.content, parse_int=_lenient_int)
    except (ValueError, RecursionError):  # ValueError covers UnicodeDecodeError too
        return None
    return body if isinstance(body, dict) else None


def oauth_error(response: Answer, secrets_sent: Iterable[str]) -> tuple[str, str]:
    """(error code, description) from an OAuth error body, both cleaned; empty when absent."""
    body = json_object(response) or {}
    sent = list(secrets_sent)
    error = body.get("error")
    description = body.get("error_description")
    return (_clean(error, sent, 64) if isinstance(error, str) else "",
            _clean(description, sent) if isinstance(description, str) else "")


def positive_number(value: Any) -> float | None:
    """A finite number > 0, accepting numeric strings: a typed field is not worth a login."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def non_empty(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _plain_text(value: Any, limit: int) -> str | None:
    """A short string without whitespace or control characters, else None."""
    if isinstance(value, str) and 0 < len(value) <= limit and check_token(value, "") is None:
        return value
    return None


def grant_from(response: Answer, what: str) -> TokenGrant:
    """The answer's tokens, held to the rules a store value is held to, *before* anything
    else looks at them.

    Tokens that fail those rules are never written (our own store would then be "invalid"
    for good): ``UnusableAnswer``. An unusable ``expires_in`` next to valid tokens is the
    opposite case: the server has rotated, the old token is spent, so the tokens are kept and
    the lifetime clamped (``check_expires_in``), with a warning.
    """
    body = json_object(response)
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


def status_kind(status: int | None) -> type[errors.TransientOAuthError]:
    """The transient kind an HTTP status that is not an answer stands for."""
    if status == 429:
        return errors.RateLimited
    if status is not None and status >= 500:
        return errors.ServerError
    return errors.UnexpectedStatus


def retry_later(status: int, what: str, response: Answer, detail: str = "",
                 ) -> errors.TransientOAuthError:
    """The error for a 429, a 5xx or a 4xx we do not understand, with ``Retry-After``."""
    kind = status_kind(status)
    label = " (rate limited)" if status == 429 else ""
    prefix = "unexpected " if kind is errors.UnexpectedStatus else ""
    return kind(f"{prefix}HTTP {status} from {what}{label}" + (f": {detail}" if detail else ""),
                retry_after=parse_retry_after(response.headers.get("Retry-After")))


def mentions_refresh_token(*texts: str) -> bool:
    return any("refresh token" in t.lower().replace("_", " ") for t in texts)
