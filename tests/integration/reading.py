"""Reading what the runtime wrote: every message of a topic (with its raw headers, to check
that none is duplicated, or decoded headers, read to each partition's EOF), and waiting for a
condition."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from conftest import unique_name
from services.runtime.envelope import headers_to_dict
from services.runtime.kafka import retrying

WAIT_S = 30.0
# How long a test waits for its producer's deliveries. A flush returns as soon as they are acked;
# on a loaded 2-core machine (both broker passes and a demo) one was still in flight after 10 s.
DELIVERY_WAIT_S = 60.0


@dataclass(frozen=True)
class Received:
    partition: int
    offset: int
    key: str | None
    value: bytes | None
    raw_headers: list[tuple[str, bytes]]

    @property
    def headers(self) -> dict[str, str]:
        return {k: v.decode() for k, v in self.raw_headers}


def watermark_offsets(client: Consumer, topic: str, partition: int) -> tuple[int, int]:
    """(low, high) of one partition, asked again while the broker answers with a transient error:
    right after a topic's creation a loaded Apache Kafka may not lead its partitions yet
    (NOT_LEADER_FOR_PARTITION)."""
    return retrying(lambda: client.get_watermark_offsets(TopicPartition(topic, partition), timeout=10), timeout=30)


def delivered(producer) -> None:
    """Wait until every message `producer` was given is acked by the broker; fail saying how many were not."""
    undelivered = producer.flush(DELIVERY_WAIT_S)
    assert undelivered == 0, f"{undelivered} messages not delivered after {DELIVERY_WAIT_S:.0f} s"


def read_topic(bootstrap: str, topic: str) -> list[Received]:
    client = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("reader"), "enable.auto.commit": False,
                       "isolation.level": "read_committed", "log_level": 0})
    try:
        partitions = client.list_topics(topic, timeout=10).topics[topic].partitions
        pending = {p: end for p in partitions if (end := watermark_offsets(client, topic, p)[1]) > 0}
        client.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        out, deadline = [], time.monotonic() + 15
        while pending and time.monotonic() < deadline:
            for m in client.consume(100, 0.2):
                if m.error():
                    continue
                out.append(Received(m.partition(), m.offset(), m.key().decode() if m.key() else None, m.value(),
                                    list(m.headers() or [])))
                if m.offset() + 1 >= pending.get(m.partition(), 0):
                    pending.pop(m.partition(), None)
        assert not pending, f"could not read {topic} to its end"
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        client.close()


def read_all(bootstrap: str, topic: str) -> list[tuple[int, int, str, bytes, dict]]:
    """Every message in `topic` now: (partition, offset, key, value, headers as text).

    Stops at each partition's EOF, which comes from the fetch response's high watermark (the
    embedded broker's ListOffsets answer can fall short, see tail_cmd)."""
    client = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("reader"), "enable.auto.commit": False,
                       "enable.partition.eof": True, "fetch.wait.max.ms": 20, "log_level": 0})
    try:
        partitions = client.list_topics(topic, timeout=10).topics[topic].partitions
        pending = set(partitions)
        client.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out = []
        deadline = time.monotonic() + 15
        while pending and time.monotonic() < deadline:
            for m in client.consume(100, 0.2):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        pending.discard(m.partition())
                    continue
                out.append((m.partition(), m.offset(), m.key().decode(), m.value(), headers_to_dict(m.headers())))
        assert not pending, f"could not read {topic} to its end"
        return sorted(out)
    finally:
        client.close()


def wait_until(condition: Callable[[], object], timeout: float = WAIT_S, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
    return value
