"""(b) Relay throughput: unpublished outbox rows to broker acks, through `OutboxRelay.publish_batch`
(select a batch in seq order, produce it, wait for every ack, mark the rows published)."""

from __future__ import annotations

import random
import time
import uuid

from sqlalchemy import MetaData

from bench.common import encoded_order_created, figure
from bench.raw import _spent, warm_up
from services.runtime.admin import ensure_topics
from services.runtime.db import make_engine, outbox_table, utcnow
from services.runtime.kafka import make_producer
from services.runtime.outbox import OutboxRelay
from services.runtime.settings import Settings
from services.runtime.topology import TopicSpec


def fill_outbox(engine, outbox, topic: str, count: int, seed: int = 11) -> None:
    """`count` OrderCreated rows, exactly as `add_event` writes them, inserted in bulk."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        key, value, headers = encoded_order_created(rng)
        rows.append({"id": str(uuid.uuid4()), "aggregatetype": "order", "aggregateid": key.decode(),
                     "type": "OrderCreated", "topic": topic, "payload": value,
                     "headers": [[k, v.decode()] for k, v in headers], "created_at": utcnow()})
    with engine.begin() as conn:
        for i in range(0, len(rows), 5_000):
            conn.execute(outbox.insert(), rows[i:i + 5_000])


def run(settings: Settings, database_url: str, count: int, broker_cpu=None) -> dict:
    broker_cpu = broker_cpu or (lambda: None)
    topic = f"bench.relay.{uuid.uuid4().hex[:8]}"
    ensure_topics({"bootstrap.servers": settings.bootstrap}, [TopicSpec(topic)])
    engine = make_engine(database_url)
    try:
        outbox = outbox_table(MetaData())
        outbox.metadata.create_all(engine)
        fill_outbox(engine, outbox, topic, count)
        producer = make_producer(settings, **{"client.id": "bench-relay"})
        warm_up(producer, topic)  # a long-running relay's producer is connected already
        relay = OutboxRelay(engine, outbox, producer, batch_size=settings.relay_batch_size)
        published = 0
        start, cpu, b0 = time.perf_counter(), time.process_time(), broker_cpu()
        while published < count:
            n = relay.publish_batch()
            if n == 0:
                raise RuntimeError(f"relay stopped after {published} of {count} rows")
            published += n
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        broker_s = _spent(broker_cpu, b0)
        if relay.backlog():
            raise RuntimeError("relay left unpublished rows")
    finally:
        engine.dispose()
    return figure(published, seconds, cpu, broker_s, batch_size=settings.relay_batch_size)
