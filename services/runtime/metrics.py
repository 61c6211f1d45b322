"""Prometheus metrics of the consumer runtime, labelled by consumer group.

Defined once per process in prometheus-client's default registry (definitions are not clients:
nothing connects anywhere). Whoever serves `/metrics` exposes `prometheus_client.REGISTRY`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LATENESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

PROCESSED = Counter("orderpipe_messages_processed_total", "Messages whose effect was committed.", ["group"])
DUPLICATES = Counter("orderpipe_messages_duplicate_total", "Redeliveries found in the inbox (no-ops).", ["group"])
RETRIED = Counter("orderpipe_messages_retried_total", "Failed messages sent to a retry topic.", ["group"])
DEAD_LETTERED = Counter("orderpipe_messages_dead_lettered_total", "Messages sent to the dead-letter topic.",
                        ["group"])
HANDLER_SECONDS = Histogram("orderpipe_handler_seconds", "Time to handle one message (handlers and database).",
                            ["group"], buckets=_LATENCY_BUCKETS)
RETRY_LATENESS = Histogram("orderpipe_retry_lateness_seconds",
                           "How long after its due time a retried message ran (never before it).",
                           ["group"], buckets=_LATENESS_BUCKETS)
ALERTS = Counter("orderpipe_alerts_total", "Alerts raised, by kind.", ["group", "kind"])
THROTTLED_SECONDS = Counter("orderpipe_rate_limited_seconds_total",
                            "Time consumption was paused by the rate limit.", ["group"])
BREAKER_STATE = Gauge("orderpipe_circuit_breaker_state", "0 closed, 1 open, 2 half-open.", ["group"])
BREAKER_STATES = {"closed": 0, "open": 1, "half_open": 2}
HELD_KEYS = Gauge("orderpipe_held_keys", "Keys whose later events wait for one in the retry chain (ordered retries).",
                  ["group"])
HELD_EVENTS = Gauge("orderpipe_held_events", "Events waiting behind their key's head.", ["group"])
HELD_OLDEST_SECONDS = Gauge("orderpipe_held_oldest_seconds", "Age of the oldest held key (0: none).", ["group"])
