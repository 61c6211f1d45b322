"""Reading what the runtime wrote: every message of a topic (with its raw headers, to check
that none is duplicated), and waiting for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from conftest import unique_name

WAIT_S = 30.0


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


def read_topic(bootstrap: str, topic: str) -> list[Received]:
    client = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("reader"), "enable.auto.commit": False,
                       "isolation.level": "read_committed", "log_level": 0})
    try:
        partitions = client.list_topics(topic, timeout=10).topics[topic].partitions
        pending = {p: end for p in partitions
                   if (end := client.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]) > 0}
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


def wait_until(condition: Callable[[], object], timeout: float = WAIT_S, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
    return value
