"""(a) The ceiling: the bare confluent-kafka client against the same broker, in the same run.

Produce uses exactly the producer configuration our relays use (idempotent, acks=all, lz4,
linger 5 ms, murmur2), so the relay's figure divided by this one is the cost of our code.
Consume uses the consumer configuration our services use (read_committed, group
subscription, manual offset store) and the same batch size, doing nothing with the messages.
"""

from __future__ import annotations

import os
import time
import uuid

from confluent_kafka import Consumer, Producer

from bench.common import figure
from services.runtime.admin import ensure_topics
from services.runtime.kafka import consumer_config, producer_config
from services.runtime.settings import Settings
from services.runtime.topology import TopicSpec

VALUE_BYTES = 300


def warm_up(producer: Producer, topic: str) -> None:
    """One acked message first: metadata, connections and the idempotent producer id are set up
    once per producer (about a second on Tansu) and must not count as throughput."""
    producer.produce(topic, key=b"warm-up", value=b"warm-up")
    if producer.flush(30):
        raise RuntimeError("warm-up message not acked")


def produce_all(producer: Producer, topic: str, count: int, value_size: int = VALUE_BYTES) -> tuple[float, float]:
    """Produce `count` messages and wait for every ack; (seconds, CPU seconds) taken."""
    values = [os.urandom(value_size) for _ in range(64)]
    keys = [uuid.uuid4().hex.encode() for _ in range(4096)]
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(count):
        while True:
            try:
                producer.produce(topic, key=keys[i & 4095], value=values[i & 63])
                break
            except BufferError:  # local queue full: let librdkafka send, then retry
                producer.poll(0.005)
        if i & 1023 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    if remaining:
        raise RuntimeError(f"raw produce: {remaining} messages not acked")
    return time.perf_counter() - start, time.process_time() - cpu


def consume_all(consumer: Consumer, topics: list[str], count: int, batch_size: int,
                timeout: float = 120.0) -> tuple[int, float, float]:
    """Subscribe and read `count` messages; returns (messages counted, seconds) measured from the
    end of the first non-empty batch, so the group join (Tansu holds it for the rebalance
    timeout) is not counted."""
    consumer.subscribe(topics)
    seen = 0
    start = None
    deadline = time.monotonic() + timeout
    first = 0
    while seen < count and time.monotonic() < deadline:
        # never ask for more than is left: consume() waits its whole timeout for a batch to fill
        batch = consumer.consume(min(batch_size, count - seen), 0.5)
        got = sum(1 for m in batch if not m.error())
        if not got:
            continue
        seen += got
        if start is None:
            start, first, cpu = time.perf_counter(), seen, time.process_time()
    if seen < count:
        raise RuntimeError(f"raw consume: read {seen} of {count} messages within {timeout:.0f} s")
    return seen - first, time.perf_counter() - start, time.process_time() - cpu


def run(settings: Settings, count: int, batch_size: int) -> dict:
    topic = f"bench.raw.{uuid.uuid4().hex[:8]}"
    ensure_topics({"bootstrap.servers": settings.bootstrap}, [TopicSpec(topic)])
    producer = Producer(producer_config(settings, **{"client.id": "bench-raw"}))
    warm_up(producer, topic)
    seconds, cpu = produce_all(producer, topic, count)
    produce = figure(count, seconds, cpu, value_bytes=VALUE_BYTES, partitions=TopicSpec(topic).partitions,
                     config="idempotent, acks=all, lz4, linger.ms=5 (the relays' producer config)")
    consumer = Consumer(consumer_config(settings, f"bench-raw-{uuid.uuid4().hex[:6]}"))
    try:
        counted, seconds, cpu = consume_all(consumer, [topic], count + 1, batch_size)  # + the warm-up
    finally:
        consumer.close()
    consume = figure(counted, seconds, cpu, batch_size=batch_size,
                     config="read_committed, subscribe, consume() batches, no processing")
    return {"produce": produce, "consume": consume}
