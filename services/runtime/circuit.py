"""A circuit breaker per consumer group: when nearly every attempt fails with a retryable error
(the SMTP server is down), stop consuming instead of pushing every message down the retry chain
into the dead-letter topic.

closed --(>= failure_ratio of the last `window` attempts failed retryably)--> open
open --(cooldown_s passed)--> half-open: exactly one message (the probe) is let through
half-open --probe succeeds--> closed;  --probe fails retryably--> open again

Only retryable failures count against the dependency; permanent failures and duplicates say
nothing about it (a probe that ends that way frees the slot for another probe). Thread-safe:
the lanes of a concurrent consumer report outcomes at the same time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    window: int = 20            # the last N attempts that count
    failure_ratio: float = 0.9  # open when at least this share of them failed with retryable errors
    cooldown_s: float = 30.0    # open this long, then probe

    def __post_init__(self):
        if self.window < 1 or not 0 < self.failure_ratio <= 1 or self.cooldown_s < 0:
            raise ValueError("breaker needs window >= 1, 0 < failure_ratio <= 1, cooldown_s >= 0")


Transition = Callable[[str, str, str], None]  # (old state, new state, why)


class CircuitBreaker:
    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic,
                 on_transition: Transition | None = None):
        self.config = config
        self.clock = clock
        self.on_transition = on_transition
        self._lock = threading.Lock()
        self._state = CLOSED
        self._outcomes: deque[bool] = deque(maxlen=config.window)  # True = failed retryably
        self._opened_at = 0.0
        self._probe_out = False

    # -- asking -------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        changes: list[tuple[str, str, str]] = []
        with self._lock:
            state = self._current(changes)
        self._notify(changes)
        return state

    def remaining_s(self) -> float:
        """While open: seconds until the probe may go; 0 otherwise."""
        changes: list[tuple[str, str, str]] = []
        with self._lock:
            open_ = self._current(changes) == OPEN
            remaining = self._opened_at + self.config.cooldown_s - self.clock()
        self._notify(changes)
        return max(0.0, remaining) if open_ else 0.0

    def allow(self) -> bool:
        """May the next message run? In half-open, only one message (the probe) at a time."""
        changes: list[tuple[str, str, str]] = []
        with self._lock:
            state = self._current(changes)
            if state == CLOSED:
                allowed = True
            elif state == HALF_OPEN and not self._probe_out:
                self._probe_out = allowed = True
            else:
                allowed = False
        self._notify(changes)
        return allowed

    # -- reporting ----------------------------------------------------------------------------

    def record_success(self) -> None:
        self._record(failed=False)

    def record_failure(self) -> None:
        """A retryable failure: the kind a dependency outage causes."""
        self._record(failed=True)

    def record_neutral(self) -> None:
        """An outcome that says nothing about the dependency (permanent error, duplicate, not run)."""
        with self._lock:
            if self._state == HALF_OPEN:
                self._probe_out = False

    def _record(self, failed: bool) -> None:
        changes: list[tuple[str, str, str]] = []
        with self._lock:
            state = self._current(changes)
            if state == HALF_OPEN:
                self._probe_out = False
                if failed:
                    self._open(changes, "the probe failed")
                else:
                    self._set(CLOSED, changes, "the probe succeeded")
                    self._outcomes.clear()
            elif state == CLOSED:
                self._outcomes.append(failed)
                n, failures = len(self._outcomes), sum(self._outcomes)
                if n == self.config.window and failures >= self.config.failure_ratio * n:
                    self._open(changes, f"{failures} of the last {n} attempts failed with retryable errors")
            # OPEN: a message that was already running when the breaker opened; nothing to learn
        self._notify(changes)

    # -- internals (lock held) ----------------------------------------------------------------

    def _current(self, changes: list) -> str:
        if self._state == OPEN and self.clock() >= self._opened_at + self.config.cooldown_s:
            self._set(HALF_OPEN, changes, "cool-down over, probing")
            self._probe_out = False
        return self._state

    def _open(self, changes: list, why: str) -> None:
        self._opened_at = self.clock()
        self._outcomes.clear()
        self._set(OPEN, changes, why)

    def _set(self, state: str, changes: list, why: str) -> None:
        if state != self._state:
            changes.append((self._state, state, why))
            self._state = state

    def _notify(self, changes: list[tuple[str, str, str]]) -> None:
        if self.on_transition:
            for old, new, why in changes:
                self.on_transition(old, new, why)
