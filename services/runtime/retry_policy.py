"""How long a failed message waits before its next attempt, and how many attempts it gets.

The retry *topics* come from the topology (`ConsumerGroup.retry_delays_s` declares one tier per
delay); the policy only decides the due time written into `x-due-at` and when the chain ends.
Retry n goes to tier n; retries beyond the declared tiers reuse the last tier (Spring Kafka's
"reuse the last topic for the maximum interval"): the due time, not the topic, says when a
message may run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from services.runtime.topology import DEFAULT_RETRY_DELAYS_S

Backoff = Literal["fixed", "exponential"]


@dataclass(frozen=True)
class RetryPolicy:
    """`fixed`: retry n waits `delays_s[n-1]` (the last delay repeats).
    `exponential`: retry n waits `initial_delay_s * multiplier**(n-1)`, spread by +-`jitter`
    (a fraction) so a burst of failures does not come back as a burst, capped at `max_delay_s`."""

    backoff: Backoff = "fixed"
    delays_s: tuple[float, ...] = DEFAULT_RETRY_DELAYS_S
    initial_delay_s: float = 1.0
    multiplier: float = 2.0
    max_delay_s: float = 60.0
    jitter: float = 0.1
    max_attempts: int | None = None  # the first attempt included; default: one per delay, plus the first

    def __post_init__(self):
        if self.backoff not in ("fixed", "exponential"):
            raise ValueError(f"retry backoff must be 'fixed' or 'exponential', not {self.backoff!r}")
        if any(d < 0 for d in self.delays_s) or self.initial_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("retry delays must be >= 0")
        if self.backoff == "fixed" and not self.delays_s and (self.max_attempts or 1) > 1:
            raise ValueError("a fixed retry policy with retries needs at least one delay")
        if not 0 <= self.jitter < 1:
            raise ValueError("retry jitter is a fraction in [0, 1)")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    @classmethod
    def fixed(cls, *delays_s: float, max_attempts: int | None = None) -> RetryPolicy:
        return cls("fixed", tuple(delays_s), max_attempts=max_attempts)

    @classmethod
    def exponential(cls, initial_delay_s: float = 1.0, multiplier: float = 2.0, max_delay_s: float = 60.0,
                    jitter: float = 0.1, max_attempts: int = 4) -> RetryPolicy:
        return cls("exponential", (), initial_delay_s, multiplier, max_delay_s, jitter, max_attempts)

    @property
    def attempts(self) -> int:
        """How many times a message is tried before it goes to the dead-letter topic."""
        return self.max_attempts if self.max_attempts is not None else len(self.delays_s) + 1

    def delay_s(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """The wait before retry `retry` (1 = the first retry). `rand` returns [0, 1)."""
        if retry < 1:
            raise ValueError("retries count from 1")
        if self.backoff == "fixed":
            return self.delays_s[min(retry, len(self.delays_s)) - 1]
        base = min(self.max_delay_s, self.initial_delay_s * self.multiplier ** min(retry - 1, 64))
        spread = base * self.jitter * (2 * rand() - 1)
        return max(0.0, min(self.max_delay_s, base + spread))
