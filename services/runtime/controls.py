"""A consumer service's worker controls: retry policy, concurrency, rate limit, alerts, breaker.

A service's `build()` sets its defaults (`Service(..., controls=WorkerControls(concurrency=8))`);
the process then applies what the environment says for that service
(`ORDERPIPE_WORKERS__<SERVICE>__<FIELD>`, see `settings.WorkerSettings`) with `with_settings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from services.runtime.circuit import BreakerConfig
from services.runtime.ratelimit import RateLimit
from services.runtime.retry_policy import RetryPolicy
from services.runtime.settings import WorkerSettings


@dataclass(frozen=True)
class WorkerControls:
    retry: RetryPolicy | None = None            # None: fixed, the group's declared delays (topology.py)
    concurrency: int = 1                        # 1: one transaction per batch, handlers one by one
    rate_limit: RateLimit | None = None
    alert_after_attempts: int = 3               # alert when the n-th attempt (or a later one) fails
    breaker: BreakerConfig | None = field(default_factory=BreakerConfig)  # None: no circuit breaker
    # While an event of a key is in the retry chain, the key's later events wait (held.py)
    ordered_retries: bool = True
    held_dead_letter_policy: str = "hold"        # its head dead-lettered: hold the key, or release it

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.alert_after_attempts < 1:
            raise ValueError("alert_after_attempts must be >= 1")
        if self.held_dead_letter_policy not in ("hold", "release"):
            raise ValueError("held_dead_letter_policy must be hold or release")

    def retry_policy(self, declared_delays_s: tuple[float, ...]) -> RetryPolicy:
        return self.retry or RetryPolicy.fixed(*declared_delays_s)

    def with_settings(self, s: WorkerSettings | None, declared_delays_s: tuple[float, ...]) -> WorkerControls:
        """These controls with whatever `s` sets; fields it leaves unset keep their value."""
        if s is None:
            return self
        out = self
        retry_fields = {
            "backoff": s.retry_backoff, "delays_s": tuple(s.retry_delays_s) if s.retry_delays_s else None,
            "initial_delay_s": s.retry_initial_delay_s, "multiplier": s.retry_multiplier,
            "max_delay_s": s.retry_max_delay_s, "jitter": s.retry_jitter, "max_attempts": s.retry_max_attempts,
        }
        if any(v is not None for v in retry_fields.values()):
            base = self.retry_policy(declared_delays_s)
            out = replace(out, retry=replace(base, **{k: v for k, v in retry_fields.items() if v is not None}))
        if s.concurrency is not None:
            out = replace(out, concurrency=s.concurrency)
        if s.rate_limit_max is not None and s.rate_limit_max <= 0:
            out = replace(out, rate_limit=None)
        elif s.rate_limit_max is not None or s.rate_limit_duration_s is not None:
            base = self.rate_limit
            max_events = s.rate_limit_max if s.rate_limit_max is not None else (base.max_events if base else None)
            if max_events is None:
                raise ValueError("rate_limit_duration_s is set but rate_limit_max is not")
            per = s.rate_limit_duration_s if s.rate_limit_duration_s is not None else (base.per_seconds if base else 1)
            out = replace(out, rate_limit=RateLimit(max_events, per))
        if s.alert_after_attempts is not None:
            out = replace(out, alert_after_attempts=s.alert_after_attempts)
        if s.ordered_retries is not None:
            out = replace(out, ordered_retries=s.ordered_retries)
        if s.held_dead_letter_policy is not None:
            out = replace(out, held_dead_letter_policy=s.held_dead_letter_policy)
        if s.breaker_enabled is False:
            out = replace(out, breaker=None)
        elif s.breaker_enabled or any(v is not None for v in (s.breaker_window, s.breaker_failure_ratio,
                                                                s.breaker_cooldown_s)):
            base = self.breaker or BreakerConfig()
            out = replace(out, breaker=BreakerConfig(
                window=s.breaker_window if s.breaker_window is not None else base.window,
                failure_ratio=s.breaker_failure_ratio if s.breaker_failure_ratio is not None else base.failure_ratio,
                cooldown_s=s.breaker_cooldown_s if s.breaker_cooldown_s is not None else base.cooldown_s))
        return out
