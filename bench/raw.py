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
                timeout: float = 120.0, broker_cpu=lambda: None) -> tuple[int, float, float, float | None]:
    """Subscribe and read `count` messages; returns (messages counted, seconds, CPU seconds,
    broker CPU seconds) measured from the end of the first non-empty batch, so the group join
    (Tansu holds it for the rebalance timeout) is not counted."""
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
            start, first, cpu, b0 = time.perf_counter(), seen, time.process_time(), broker_cpu()
    if seen < count:
        raise RuntimeError(f"raw consume: read {seen} of {count} messages within {timeout:.0f} s")
    return seen - first, time.perf_counter() - start, time.process_time() - cpu, _spent(broker_cpu, b0)


def warm_broker(settings: Settings, count: int, batch_size: int) -> None:
    """Untimed: `count` messages produced and consumed once on a topic of their own, before any
    section measures. A fresh JVM (Apache Kafka) runs its request path interpreted until the JIT
    has compiled it, which would make the ceiling, measured first, the slowest figure of the run;
    Tansu needs no warm-up, and gets the same one so both brokers are measured the same way."""
    topic = f"bench.warm-up.{uuid.uuid4().hex[:8]}"
    ensure_topics({"bootstrap.servers": settings.bootstrap}, [TopicSpec(topic)])
    producer = Producer(producer_config(settings, **{"client.id": "bench-warm-up"}))
    warm_up(producer, topic)
    produce_all(producer, topic, count)
    consumer = Consumer(consumer_config(settings, f"bench-warm-up-{uuid.uuid4().hex[:6]}"))
    try:
        consume_all(consumer, [topic], count + 1, batch_size)
    finally:
        consumer.close()


def run(settings: Settings, count: int, batch_size: int, broker_cpu=None) -> dict:
    """`broker_cpu`: a clock of the broker's CPU seconds (bench.common.broker_cpu_clock); its
    use over each measured phase is stored beside the client's own."""
    broker_cpu = broker_cpu or (lambda: None)
    topic = f"bench.raw.{uuid.uuid4().hex[:8]}"
    ensure_topics({"bootstrap.servers": settings.bootstrap}, [TopicSpec(topic)])
    producer = Producer(producer_config(settings, **{"client.id": "bench-raw"}))
    warm_up(producer, topic)
    b0 = broker_cpu()
    seconds, cpu = produce_all(producer, topic, count)
    produce = figure(count, seconds, cpu, _spent(broker_cpu, b0), value_bytes=VALUE_BYTES,
                     partitions=TopicSpec(topic).partitions,
                     config="idempotent, acks=all, lz4, linger.ms=5 (the relays' producer config)")
    consumer = Consumer(consumer_config(settings, f"bench-raw-{uuid.uuid4().hex[:6]}"))
    try:
        counted, seconds, cpu, broker_s = consume_all(consumer, [topic], count + 1, batch_size,  # + the warm-up
                                                      broker_cpu=broker_cpu)
    finally:
        consumer.close()
    consume = figure(counted, seconds, cpu, broker_s, batch_size=batch_size,
                     config="read_committed, subscribe, consume() batches, no processing")
    return {"produce": produce, "consume": consume}


def _spent(clock, before):
    after = clock()
    return None if before is None or after is None else after - before
