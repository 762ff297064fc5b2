from __future__ import annotations

import random

import pytest
from tenacity import RetryCallState, Retrying
from tenacity.wait import wait_exponential_jitter

from qwen_refresher.planner import (
    MIN_INTERVAL,
    Timing,
    backoff_delay,
    exponential_jitter,
    refresh_at,
)

T = Timing(margin=900, jitter=60, retry_max=300)
NOW = 1_800_000_000.0


def test_a_six_hour_token_is_refreshed_margin_plus_jitter_before_expiry() -> None:
    rng = random.Random(1)
    at = refresh_at(now=NOW, expires_at=NOW + 6 * 3600, issued_at=NOW, timing=T, rng=rng)
    assert NOW + 6 * 3600 - 900 - 60 <= at <= NOW + 6 * 3600 - 900


def test_jitter_spreads_profiles_issued_together() -> None:
    rng = random.Random(7)
    times = {refresh_at(now=NOW, expires_at=NOW + 21600, issued_at=NOW, timing=T, rng=rng)
             for _ in range(50)}
    assert max(times) - min(times) > 30


def test_a_token_inside_its_margin_is_refreshed_at_once() -> None:
    assert refresh_at(now=NOW, expires_at=NOW + 300, issued_at=None, timing=T) == NOW


def test_an_expired_token_is_refreshed_at_once() -> None:
    assert refresh_at(now=NOW, expires_at=NOW - 50, issued_at=None, timing=T) == NOW


@pytest.mark.parametrize("lifetime", [1.0, 20.0, 600.0, 1200.0])
def test_a_short_lived_token_is_refreshed_at_half_its_lifetime_never_in_a_loop(
        lifetime: float) -> None:
    at = refresh_at(now=NOW, expires_at=NOW + lifetime, issued_at=NOW,
                    timing=Timing(900, 0, 300))
    assert at == pytest.approx(NOW + lifetime / 2)


def test_even_a_zero_lifetime_waits_the_minimum_interval() -> None:
    at = refresh_at(now=NOW, expires_at=NOW, issued_at=NOW, timing=T)
    assert at >= NOW + MIN_INTERVAL


def test_backoff_grows_exponentially_and_is_capped() -> None:
    delays = [backoff_delay(n, cap=300) for n in range(1, 15)]
    assert delays[0] < 3
    assert delays[4] > delays[1] * 4
    assert max(delays) <= 300
    assert delays[-1] == 300


def test_retry_after_is_a_floor() -> None:
    assert backoff_delay(1, cap=300, retry_after=42) == 42
    assert backoff_delay(12, cap=300, retry_after=5) == 300


@pytest.mark.parametrize("retry_after", [86400.0, 10.0**9, 1e308])
def test_retry_after_never_passes_retry_max(retry_after: float) -> None:
    assert backoff_delay(1, cap=300, retry_after=retry_after) == 300


@pytest.mark.parametrize(("retry_after", "expires_in", "expected"), [
    (86400.0, 10.0, 10.0),     # the token expires first: retry while it still works
    (86400.0, 1000.0, 300.0),  # retry_max is the nearer bound
    (42.0, 100.0, 42.0),       # a reasonable Retry-After is honoured
    (86400.0, 0.2, 1.0),       # never a tight loop just before expiry
    (86400.0, -50.0, 300.0),   # already expired: time to expiry bounds nothing any more
])
def test_retry_after_never_pushes_past_the_expiry(
        retry_after: float, expires_in: float, expected: float) -> None:
    assert backoff_delay(1, cap=300, retry_after=retry_after,
                         expires_in=expires_in) == expected


def test_exponential_backoff_also_stops_at_the_expiry() -> None:
    assert backoff_delay(12, cap=300, expires_in=20.0) == 20.0
    assert backoff_delay(1, cap=300, expires_in=20.0) < 3


# -- the back-off is tenacity's formula, computed without a hand-built RetryCallState ----------


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 9, 12, 40])
def test_exponential_jitter_is_tenacitys_wait_draw_for_draw(attempt: int) -> None:
    """Same formula, same random draw: tenacity's strategy (asked the way tenacity asks it,
    inside a retry loop's state) and ours agree to the last bit."""
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = attempt
    random.seed(attempt)
    theirs = wait_exponential_jitter(max=300, jitter=1)(state)
    ours = exponential_jitter(attempt, cap=300, rng=random.Random(attempt))
    assert ours == theirs


@pytest.mark.parametrize("attempt", [1, 2, 4, 6])
def test_backoff_n_lies_between_two_to_the_n_minus_one_and_one_second_more(
        attempt: int) -> None:
    low = 2.0 ** (attempt - 1)
    for seed in range(20):
        delay = backoff_delay(attempt, cap=300, rng=random.Random(seed))
        assert low <= delay < low + 1


def test_a_seeded_backoff_is_reproducible() -> None:
    a = [backoff_delay(n, cap=300, rng=random.Random(3)) for n in range(1, 8)]
    b = [backoff_delay(n, cap=300, rng=random.Random(3)) for n in range(1, 8)]
    assert a == b


def test_huge_attempt_counts_and_odd_retry_after_values_stay_bounded() -> None:
    assert exponential_jitter(5000, cap=300) == 300  # 2**4999 overflows a float
    assert backoff_delay(5000, cap=300, retry_after=float("nan")) == 300
    assert backoff_delay(1, cap=300, retry_after=-5.0) < 3
    assert backoff_delay(0, cap=300) < 3  # attempt 0 counts as the first


def test_the_planner_no_longer_builds_tenacity_state_by_hand() -> None:
    import inspect

    from qwen_refresher import planner

    source = inspect.getsource(planner)
    assert "RetryCallState(" not in source and "# type: ignore" not in source
