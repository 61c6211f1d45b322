"""A rate limit, "at most N per duration" (BullMQ's `limiter: {max, duration}`), that slows
consumption instead of failing messages.

A sliding window of the last N handling times, rather than a token bucket: a bucket of N tokens
refilled at N per duration lets up to 2N through in one window (a full bucket, then the refill),
which is exactly what an SMTP provider's "N per minute" forbids. The window gives the exact
promise: in *any* interval of `per_seconds`, at most `max_events`.

The consumer loop asks `available()` before it polls and polls at most that many messages (so a
batch never has to wait inside itself, and the loop keeps polling to keep its group membership);
when nothing is available it pauses its partitions until `wait_s()`. It records a batch with
`record(n)` once the batch has been handled, so the window counts completed handlings: a batch
whose handlers ran late cannot overlap with the next one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    max_events: int
    per_seconds: float

    def __post_init__(self):
        if self.max_events < 1 or self.per_seconds <= 0:
            raise ValueError("a rate limit needs max_events >= 1 and per_seconds > 0")

    def __str__(self) -> str:
        return f"{self.max_events} per {self.per_seconds:g} s"


class RateLimiter:
    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.clock = clock
        self._times: deque[float] = deque()  # handling times inside the window, oldest first

    def _expire(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.limit.per_seconds:
            self._times.popleft()

    def available(self) -> int:
        """How many messages may be handled now without breaking the limit."""
        self._expire(self.clock())
        return self.limit.max_events - len(self._times)

    def wait_s(self) -> float:
        """Seconds until at least one more message may be handled (0 if one may now)."""
        now = self.clock()
        self._expire(now)
        if len(self._times) < self.limit.max_events:
            return 0.0
        return max(0.0, self._times[0] + self.limit.per_seconds - now)

    def record(self, n: int) -> None:
        """`n` messages were handled, now."""
        now = self.clock()
        self._times.extend([now] * n)
