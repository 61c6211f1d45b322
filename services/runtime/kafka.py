"""librdkafka client configurations, in one place so every process gets the same guarantees."""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, Producer

from services.runtime.settings import Settings

# Java clients, aiokafka and Faust hash keys with murmur2; librdkafka's default (consistent_random,
# CRC32) would put an order's events on a different partition than Faust expects.
PARTITIONER = "murmur2_random"


def base_config(settings: Settings) -> dict[str, Any]:
    return {"bootstrap.servers": settings.bootstrap, **settings.extra_client_config}


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return {
        **base_config(settings),
        # Idempotence gives acks=all, retries without duplicates and per-partition order.
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": PARTITIONER,
        "linger.ms": 5,
        "compression.type": "lz4",
        **overrides,
    }


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        **base_config(settings),
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        # We store an offset only after the database transaction that handled the message has
        # committed; auto-commit then commits stored offsets in the background, in batches.
        "enable.auto.offset.store": False,
        "enable.auto.commit": True,
        "auto.commit.interval.ms": 1000,
        "isolation.level": "read_committed",
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(500, settings.session_timeout_ms // 3),
        "partition.assignment.strategy": "cooperative-sticky",
        **overrides,
    }


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    return Producer(producer_config(settings, **overrides))


def make_consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    return Consumer(consumer_config(settings, group_id, **overrides))
