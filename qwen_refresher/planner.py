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


def exponential_jitter(attempt: int, *, cap: float, initial: float = 1.0, jitter: float = 1.0,
                       rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1 = first): ``initial * 2**(attempt-1)`` plus a
    uniform jitter in ``[0, jitter)``, never more than ``cap``.

    This is tenacity's ``wait_exponential_jitter``, computed plainly rather than by asking
    tenacity. tenacity evaluates a wait strategy only inside its own retry loop, handing it a
    ``RetryCallState``; it has no public call for "the wait before attempt n", and our retries
    are not a loop (the wait becomes a job's next run time, so no thread or lock is held while
    we wait). The old way, building a ``RetryCallState`` by hand and smuggling ``Retry-After``
    into it, needed two ``type: ignore`` comments and leaned on tenacity internals. The formula is
    tenacity's documented one; ``tests/test_planner.py`` checks it against tenacity's own
    strategy, draw for draw. ``rng`` makes the jitter reproducible in tests.
    """
    draw = (rng or _RNG).uniform(0.0, jitter) if jitter > 0 else 0.0
    try:
        delay = initial * 2.0 ** (max(1, attempt) - 1) + draw
    except OverflowError:  # attempt in the thousands: the cap, as tenacity does
        delay = cap
    return max(0.0, min(delay, cap))


def retry_ceiling(cap: float, expires_in: float | None) -> float:
    """The latest a retry may be planned: ``retry_max``, or the token's expiry when that
    comes first (but never under ``MIN_RETRY``). A token already expired is bounded by
    ``retry_max`` alone: its expiry no longer tells us anything about when to try."""
    if expires_in is None or not expires_in > 0:  # None, expired, NaN
        return cap
    return min(cap, max(expires_in, MIN_RETRY))


def backoff_delay(attempt: int, *, cap: float, retry_after: float | None = None,
                  expires_in: float | None = None, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1 = first retry): the exponential back-off with
    jitter (``exponential_jitter``), never sooner than the server's ``Retry-After``, and never
    later than ``retry_ceiling(cap, expires_in)`` whatever ``Retry-After`` says.

    ``expires_in`` is the seconds left before the token the retry is for expires. The ceiling
    wins over the server: a ``Retry-After`` of a day must not leave a token to expire
    unrefreshed (the server's own rate limit is over long before the token is).
    """
    delay = exponential_jitter(attempt, cap=cap, rng=rng)
    if retry_after is not None and retry_after > delay:
        delay = float(retry_after)
    return min(delay, retry_ceiling(cap, expires_in))
