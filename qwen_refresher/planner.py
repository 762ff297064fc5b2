"""When to refresh, and how long to back off: pure functions of time, so they can be tested
without clocks or threads.

The margin is the safety window before ``expires``. A token whose whole lifetime is shorter
than the margin would otherwise be "inside its margin" the moment it is issued and be refreshed
in a tight loop; it is refreshed at half its lifetime instead. Jitter spreads profiles that
were all issued at once (a gateway with many agents) so they do not hit the server together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tenacity import RetryCallState
from tenacity.wait import wait_base, wait_exponential_jitter

#: Never schedule two refreshes of one family closer than this, whatever the token says.
MIN_INTERVAL = 0.25
#: One generator for the process: seeding a new one per call costs a urandom read each.
_RNG = random.Random()
#: Never plan a retry sooner than this, even a moment before expiry: no tight loops.
MIN_RETRY = 1.0

@dataclass(frozen=True)
class Timing:
    margin: float
    jitter: float
    retry_max: float


def refresh_at(
    *,
    now: float,
    expires_at: float,
    issued_at: float | None,
    timing: Timing,
    rng: random.Random | None = None,
) -> float:
    """The POSIX time at which to refresh a token.

    ``issued_at`` is when the token was obtained, if known (our own rotation, or the file's
    mtime for a token someone else wrote); it bounds the lifetime used for short-lived tokens.
    """
    rng = rng or _RNG
    lifetime = expires_at - issued_at if issued_at is not None else None
    margin = timing.margin
    if lifetime is not None and 0 < lifetime < 2 * margin:
        # Short-lived token: refresh at half its lifetime, but never later than the margin
        # says and never in a loop.
        margin = min(margin, lifetime / 2)
    jitter = rng.uniform(0.0, min(timing.jitter, margin / 4)) if timing.jitter > 0 else 0.0
    target = expires_at - margin - jitter
    if issued_at is not None:
        target = max(target, issued_at + MIN_INTERVAL)
    return max(target, now)


class wait_retry_after(wait_base):
    """tenacity's exponential back-off with jitter, never sooner than ``Retry-After`` and
    never later than ``ceiling``.

    The ceiling wins over the server: a ``Retry-After`` of a day must not leave a token to
    expire unrefreshed (the server's own rate limit is over long before the token is).
    """

    def __init__(self, cap: float, initial: float = 1.0, ceiling: float | None = None) -> None:
        self._inner = wait_exponential_jitter(initial=initial, max=cap, jitter=initial)
        self._ceiling = cap if ceiling is None else min(cap, ceiling)

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = float(self._inner(retry_state))
        retry_after = getattr(retry_state, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after > delay:
            delay = float(retry_after)
        return min(delay, self._ceiling)


def retry_ceiling(cap: float, expires_in: float | None) -> float:
    """The latest a retry may be planned: ``retry_max``, or the token's expiry when that
    comes first (but never under ``MIN_RETRY``). A token already expired is bounded by
    ``retry_max`` alone: its expiry no longer tells us anything about when to try."""
    if expires_in is None or not expires_in > 0:  # None, expired, NaN
        return cap
    return min(cap, max(expires_in, MIN_RETRY))


def backoff_delay(attempt: int, *, cap: float, retry_after: float | None = None,
                  expires_in: float | None = None) -> float:
    """Delay before retry number ``attempt`` (1 = first retry), at most
    ``retry_ceiling(cap, expires_in)`` whatever ``Retry-After`` says.

    ``expires_in`` is the seconds left before the token the retry is for expires.
    Computed by tenacity's wait strategy rather than by sleeping inside tenacity, because the
    wait becomes the job's next run time: no thread and no lock is held while we wait.
    """
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    state.retry_after = retry_after  # type: ignore[attr-defined]
    return wait_retry_after(cap, ceiling=retry_ceiling(cap, expires_in))(state)
