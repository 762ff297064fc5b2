"""The planner's bounds, swept over many seeded cases with a fixed clock (``now`` is an
argument): whatever the token, the margin and the jitter, a refresh is never planned before
now, never sooner than ``MIN_INTERVAL`` after issue, never after the expiry minus what the
margin guarantees; a back-off never exceeds its ceiling nor undercuts ``Retry-After``.

``tests/test_planner.py`` has the worked examples; this file has the invariants.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from qwen_refresher.planner import (
    MIN_INTERVAL,
    MIN_RETRY,
    Timing,
    backoff_delay,
    refresh_at,
    retry_ceiling,
)

NOW = 1_800_000_000.0


def cases(n: int = 2000, seed: int = 14) -> list[tuple[float, float | None, Timing]]:
    """(expires_at, issued_at, timing) spread over expired, short-lived and long tokens."""
    rng = random.Random(seed)
    out: list[tuple[float, float | None, Timing]] = []
    for _ in range(n):
        lifetime = rng.choice([0.0, 0.5, 5.0, 60.0, 900.0, 3600.0, 21600.0])
        age = rng.uniform(0, lifetime * 1.5) if lifetime else rng.uniform(0, 10)
        issued = NOW - age
        known = rng.random() < 0.7
        timing = Timing(margin=rng.choice([1.0, 60.0, 900.0]),
                        jitter=rng.choice([0.0, 5.0, 60.0]), retry_max=300.0)
        out.append((issued + lifetime, issued if known else None, timing))
    return out


def test_a_plan_is_never_in_the_past_and_never_sooner_than_min_interval_after_issue() -> None:
    rng = random.Random(1)
    for expires_at, issued_at, timing in cases():
        at = refresh_at(now=NOW, expires_at=expires_at, issued_at=issued_at, timing=timing,
                        rng=rng)
        assert at >= NOW
        if issued_at is not None:
            assert at >= issued_at + MIN_INTERVAL


def test_a_plan_never_eats_into_the_margin_it_promises() -> None:
    """Refreshed at least ``margin`` before expiry (half the lifetime for a short-lived
    token), unless that moment is already past, when it is now."""
    rng = random.Random(2)
    for expires_at, issued_at, timing in cases():
        at = refresh_at(now=NOW, expires_at=expires_at, issued_at=issued_at, timing=timing,
                        rng=rng)
        margin = timing.margin
        if issued_at is not None and 0 < expires_at - issued_at < 2 * margin:
            margin = (expires_at - issued_at) / 2
        latest = expires_at - margin
        floor = NOW if issued_at is None else max(NOW, issued_at + MIN_INTERVAL)
        assert at <= max(latest, floor) + 1e-6, (expires_at, issued_at, timing)


def test_jitter_only_moves_a_plan_earlier_and_by_at_most_a_quarter_margin() -> None:
    timing = Timing(margin=900, jitter=600, retry_max=300)
    exact = refresh_at(now=NOW, expires_at=NOW + 21600, issued_at=NOW,
                       timing=Timing(margin=900, jitter=0, retry_max=300))
    assert exact == NOW + 21600 - 900
    rng = random.Random(3)
    plans = [refresh_at(now=NOW, expires_at=NOW + 21600, issued_at=NOW, timing=timing, rng=rng)
             for _ in range(500)]
    assert all(exact - 900 / 4 <= p <= exact for p in plans)
    assert max(plans) - min(plans) > 100  # it does spread


def test_the_same_seed_gives_the_same_plan() -> None:
    timing = Timing(margin=900, jitter=60, retry_max=300)

    def plan(seed: int) -> float:
        return refresh_at(now=NOW, expires_at=NOW + 3600, issued_at=None, timing=timing,
                          rng=random.Random(seed))

    assert plan(7) == plan(7)
    assert plan(7) != plan(8)


@pytest.mark.parametrize(("cap", "expires_in", "expected"), [
    (300.0, None, 300.0),
    (300.0, 1000.0, 300.0),
    (300.0, 20.0, 20.0),
    (300.0, 0.1, MIN_RETRY),
    (300.0, 0.0, 300.0),
    (300.0, -5.0, 300.0),
    (300.0, math.nan, 300.0),
    (0.5, 20.0, 0.5),
])
def test_retry_ceiling(cap: float, expires_in: float | None, expected: float) -> None:
    assert retry_ceiling(cap, expires_in) == expected


def test_backoff_stays_between_its_floor_and_its_ceiling() -> None:
    rng = random.Random(4)
    for _ in range(2000):
        attempt = rng.randint(0, 30)
        cap = rng.choice([1.0, 30.0, 300.0, 3600.0])
        retry_after = rng.choice([None, 0.0, 3.0, 120.0, 1e9])
        expires_in = rng.choice([None, -1.0, 0.3, 10.0, 1e6])
        delay = backoff_delay(attempt, cap=cap, retry_after=retry_after, expires_in=expires_in)
        ceiling = retry_ceiling(cap, expires_in)
        assert 0 < delay <= ceiling, (attempt, cap, retry_after, expires_in, delay)
        if retry_after is not None:
            assert delay >= min(retry_after, ceiling)


def test_backoff_roughly_doubles_until_the_cap() -> None:
    """Medians over many draws (the jitter is random): each attempt waits about twice the
    one before, until the cap holds it."""
    def median(attempt: int) -> float:
        draws = sorted(backoff_delay(attempt, cap=3600) for _ in range(201))
        return draws[100]

    medians = [median(n) for n in range(1, 9)]
    for before, after in itertools.pairwise(medians):
        assert 1.5 < after / before < 2.6, medians
    assert median(20) == 3600
