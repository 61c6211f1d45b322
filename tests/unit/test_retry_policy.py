"""Retry classification and the retry policy, as an operator configures and relies on them.

Promises pinned here:
- `is_retryable`: a service's own `permanent` list beats the defaults and its own `retryable`
  list (a `TimeoutError` it declares permanent is dead-lettered at once), and its `retryable`
  list beats the default permanent types (a `ValueError` it declares retryable is retried).
- `RetryPolicy` validation: exactly which settings are accepted (zero delays, zero jitter, a
  zero cap, a single attempt, a fixed policy without delays and without retries) and which are
  refused, each with the message the operator sees.
- `RetryPolicy.delay_s`: the wait is never negative-clamped to more than zero, jitter moves the
  wait both ways around the base, huge retry numbers with steep multipliers neither overflow
  nor exceed the cap, and `RetryPolicy.exponential()` defaults to 1 s doubling, four attempts.
"""

from __future__ import annotations

import pytest

from services.runtime.errors import PermanentError, RetryableError, is_retryable
from services.runtime.retry_policy import RetryPolicy

# -- is_retryable -----------------------------------------------------------------------------


def test_a_service_permanent_list_beats_the_default_retryable_types():
    assert is_retryable(TimeoutError("slow")) is True
    assert is_retryable(TimeoutError("slow"), permanent=(TimeoutError,)) is False
    assert is_retryable(RetryableError("x"), retryable=(RetryableError,), permanent=(RetryableError,)) is False


def test_a_service_retryable_list_beats_the_default_permanent_types():
    assert is_retryable(ValueError("bad")) is False
    assert is_retryable(ValueError("bad"), retryable=(ValueError,)) is True
    assert is_retryable(PermanentError("rule"), retryable=(PermanentError,)) is True


def test_unknown_errors_are_retried_and_listed_types_only_match_their_own_kind():
    class Weird(Exception):
        pass

    assert is_retryable(Weird()) is True
    assert is_retryable(Weird(), permanent=(KeyError,)) is True
    assert is_retryable(KeyError("k"), retryable=(Weird,)) is False


# -- RetryPolicy validation -------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(backoff="fixed", delays_s=(0.0, 5.0)),                    # an immediate first retry
    dict(backoff="exponential", delays_s=(), initial_delay_s=0.0, max_attempts=3),
    dict(backoff="exponential", delays_s=(), max_delay_s=0.0, max_attempts=3),  # always immediate
    dict(backoff="exponential", delays_s=(), jitter=0.0, max_attempts=3),       # no spread
    dict(backoff="fixed", delays_s=(), max_attempts=None),         # no delays, no retries
    dict(backoff="fixed", delays_s=(), max_attempts=1),            # one attempt, no retries
    dict(backoff="fixed", delays_s=(1.0,), max_attempts=1),        # one attempt is a valid limit
])
def test_settings_at_the_edges_of_the_valid_range_are_accepted(kwargs):
    RetryPolicy(**kwargs)


def test_a_fixed_policy_without_delays_gets_one_attempt_only():
    assert RetryPolicy.fixed().attempts == 1
    assert RetryPolicy.fixed(max_attempts=1).attempts == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(backoff="linear"), "retry backoff must be 'fixed' or 'exponential', not 'linear'"),
    (dict(delays_s=(1.0, -1.0)), "retry delays must be >= 0"),
    (dict(backoff="exponential", delays_s=(), initial_delay_s=-1.0, max_attempts=3), "retry delays must be >= 0"),
    (dict(backoff="exponential", delays_s=(), max_delay_s=-1.0, max_attempts=3), "retry delays must be >= 0"),
    (dict(backoff="fixed", delays_s=(), max_attempts=2), "a fixed retry policy with retries needs at least one delay"),
    (dict(backoff="fixed", delays_s=(), max_attempts=3), "a fixed retry policy with retries needs at least one delay"),
    (dict(jitter=1.0), r"retry jitter is a fraction in \[0, 1\)"),
    (dict(jitter=-0.1), r"retry jitter is a fraction in \[0, 1\)"),
    (dict(max_attempts=0), "max_attempts must be >= 1"),
])
def test_invalid_settings_are_refused_with_a_message_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        RetryPolicy(**kwargs)


def test_retry_numbers_count_from_one():
    with pytest.raises(ValueError, match="^retries count from 1$"):
        RetryPolicy.fixed(1.0).delay_s(0)


# -- delay_s ----------------------------------------------------------------------------------


def test_exponential_defaults_are_one_second_doubling_with_four_attempts():
    policy = RetryPolicy.exponential()
    middle = lambda: 0.5  # noqa: E731 - no jitter either way
    assert [policy.delay_s(n, rand=middle) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert policy.attempts == 4
    assert policy.max_delay_s == 60.0
    assert policy.jitter == 0.1


def test_sub_second_waits_are_kept_not_rounded_up():
    policy = RetryPolicy.exponential(initial_delay_s=0.25, jitter=0.0)
    assert policy.delay_s(1) == 0.25
    assert RetryPolicy.exponential(initial_delay_s=0.0).delay_s(3, rand=lambda: 0.99) == 0.0


def test_jitter_spreads_the_wait_both_ways_around_the_base():
    policy = RetryPolicy.exponential(initial_delay_s=10, multiplier=2, max_delay_s=60, jitter=0.2)
    assert policy.delay_s(1, rand=lambda: 0.75) == pytest.approx(11.0)  # +10% of 10 s
    assert policy.delay_s(1, rand=lambda: 0.25) == pytest.approx(9.0)   # -10% of 10 s
    assert policy.delay_s(2, rand=lambda: 1.0) == pytest.approx(24.0)   # the +20% edge


def test_a_steep_multiplier_with_a_huge_retry_number_neither_overflows_nor_exceeds_the_cap():
    # 60000**64 is still a float; 60000**65 would overflow: the exponent is capped at 64.
    policy = RetryPolicy.exponential(initial_delay_s=1.0, multiplier=60_000.0, max_delay_s=300.0, jitter=0.0,
                                     max_attempts=10)
    assert policy.delay_s(1_000) == 300
    assert policy.delay_s(66) == 300
