"""(c) Per-consumer idempotent throughput and (e) the naive baseline.

(c) runs the real `ServiceConsumer` (inbox row + effect + outbox row per message in one
transaction per batch, offsets stored after the commit, auto-committed in the background)
against events pre-produced to the broker, on SQLite and PostgreSQL, with:
- `noop`: the handler does no database work and returns one event (so the inbox and the
  outbox row are still written: that is the runtime's own cost);
- `analytics`: the real analytics handler (`record_order`: two rollup upserts per order);
- `inventory`: the real inventory handler (`reserve_stock`: read stock, update, reservation).

(e) is the same consumer with batch size 1 and a synchronous offset commit after every
message: one database transaction and one commit per message, what a first version does.
"""

from __future__ import annotations

import gc
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Producer, TopicPartition
from sqlalchemy import MetaData, func, select

from bench.common import CODEC, encoded_order_created, figure
from services.runtime.admin import ensure_topics
from services.runtime.consumer import ServiceConsumer
from services.runtime.db import make_engine
from services.runtime.events import OrderCreated, OrderRecorded
from services.runtime.handler import Service, UnitOfWork
from services.runtime.heap import tune_gc
from services.runtime.kafka import make_consumer, make_producer
from services.runtime.outbox import OutboxRelay
from services.runtime.settings import Settings
from services.runtime.topology import EVENT_TOPICS, ConsumerGroup, TopicSpec


def produce_orders(settings: Settings, topic: str, count: int, seed: int = 5) -> None:
    """`count` OrderCreated events with envelope headers, as the orders relay publishes them."""
    ensure_topics({"bootstrap.servers": settings.bootstrap}, [TopicSpec(topic)])
    rng = random.Random(seed)
    producer: Producer = make_producer(settings, **{"client.id": "bench-feeder"})
    for _ in range(count):
        key, value, headers = encoded_order_created(rng)
        while True:
            try:
                producer.produce(topic, key=key, value=value, headers=headers)
                break
            except BufferError:
                producer.poll(0.005)
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("could not pre-produce the bench events")


# -- the services under test ------------------------------------------------------------------


def _noop_service(group: ConsumerGroup, batch_size: int) -> tuple[Service, Callable]:
    def noop(event: OrderCreated, uow: UnitOfWork) -> list[OrderRecorded]:
        return [OrderRecorded(order_id=event.order_id, units=0, revenue=event.total, currency=event.currency,
                              recorded_at=uow.now)]

    return Service(group, MetaData(), {OrderCreated: [noop]}, batch_size=batch_size), lambda engine: None


def _analytics_service(group: ConsumerGroup, batch_size: int) -> tuple[Service, Callable]:
    from services.analytics.handlers import HANDLERS
    from services.analytics.tables import metadata

    return Service(group, metadata, HANDLERS, batch_size=batch_size), lambda engine: None


def _inventory_service(group: ConsumerGroup, batch_size: int) -> tuple[Service, Callable]:
    from services.inventory.handlers import HANDLERS
    from services.inventory.service import seed_stock
    from services.inventory.tables import metadata
    from services.inventory.catalog import CATALOG

    def seed(engine):
        seed_stock(engine, {item.sku: 10**9 for item in CATALOG})

    return Service(group, metadata, HANDLERS, batch_size=batch_size), seed


EFFECTS: dict[str, Callable[[ConsumerGroup, int], tuple[Service, Callable]]] = {
    "noop": _noop_service,
    "analytics": _analytics_service,
    "inventory": _inventory_service,
}


def _next_offsets(messages) -> list[TopicPartition]:
    highest: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic(), m.partition())
        highest[key] = max(highest.get(key, -1), m.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]


class NaiveConsumer(ServiceConsumer):
    """(e): one message per transaction (batch size 1) and a synchronous offset commit each."""

    def handle_batch(self, messages):
        result = super().handle_batch(messages)
        self.consumer.commit(offsets=_next_offsets(messages), asynchronous=False)
        return result


class Meter:
    """Wraps a consumer's `handle_batch` (public API only) to time it: the clock starts after
    the first batch (which carries the group join) and stops when `count` events are done,
    then the consumer's own `run()` loop is told to stop. Runs on the consumer's thread, so a
    profiler started here sees the hot loop only."""

    def __init__(self, sc: ServiceConsumer, count: int, stop: threading.Event, profiler=None, broker_cpu=None):
        self.sc, self.count, self.stop, self.profiler = sc, count, stop, profiler
        self.broker_cpu = broker_cpu or (lambda: None)
        self.broker_start = self.broker_end = None
        self.done = self.first = self.duplicates = 0
        self.start = self.end = None
        self._inner = sc.handle_batch
        sc.handle_batch = self

    def __call__(self, messages):
        result = self._inner(messages)
        if self.stop.is_set():
            return result
        # Duplicates (a batch redelivered after a rebalance on a loaded machine) are absorbed by
        # the inbox; they do not count as throughput.
        self.done += result.processed
        self.duplicates += result.duplicates
        if self.start is None and self.done:
            self.start, self.first, self.cpu_start = time.perf_counter(), self.done, time.process_time()
            self.broker_start = self.broker_cpu()
            if self.profiler is not None:
                self.profiler.start()
        elif self.done >= self.count:
            self.end, self.cpu_end = time.perf_counter(), time.process_time()
            self.broker_end = self.broker_cpu()
            if self.profiler is not None:
                self.profiler.stop()
            self.stop.set()
        return result


def _relay_drained(relay: OutboxRelay, rows: int, name: str, timeout: float = 60.0) -> int:
    """Wait until the relay has published all `rows` outbox rows; their number, or RuntimeError."""
    deadline = time.monotonic() + timeout
    while (backlog := relay.backlog()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if backlog:
        raise RuntimeError(f"{name}: its relay published {rows - backlog} of {rows} outbox rows within {timeout:.0f} s")
    return rows


@dataclass
class Case:
    effect: str
    database_url: str
    count: int
    naive: bool = False
    with_relay: bool = False


def run_case(settings: Settings, topic: str, case: Case, profiler=None, timeout: float = 300.0,
             broker_cpu=None) -> dict:
    # The GC settings run_service applies. Before this case's clients exist: frozen objects are
    # never collected, and the clients must go when the case ends.
    tune_gc()
    name = f"bench-{case.effect}{'-naive' if case.naive else ''}-{uuid.uuid4().hex[:6]}"
    group = ConsumerGroup(name, inputs=(topic,))
    # With the relay, the topics it publishes to too: Apache Kafka here creates no topic on first
    # use, and a relay publishing to a missing topic retried for the whole case (its delivery
    # failures measured as if they were publishing) and outlived it, reconnecting to the stopped
    # broker from inside the test process.
    outputs = list(EVENT_TOPICS) if case.with_relay else []
    ensure_topics({"bootstrap.servers": settings.bootstrap},
                  [TopicSpec(t) for t in (*group.retry_topics(topic), group.dlt_topic(topic))] + outputs)
    batch_size = 1 if case.naive else settings.consumer_batch_size
    service, seed = EFFECTS[case.effect](group, batch_size)
    engine = make_engine(case.database_url)
    stop = threading.Event()
    relay_stop = threading.Event()  # later than `stop`: the relay publishes the last rows first
    relay = relay_thread = None
    try:
        service.metadata.create_all(engine)
        seed(engine)
        cls = NaiveConsumer if case.naive else ServiceConsumer
        sc = cls(service, engine, make_consumer(settings, group.name, **{"client.id": name}),
                 make_producer(settings, **{"client.id": f"{name}-retries"}), CODEC)
        if case.with_relay:  # the service process's shape: its relay publishes its outputs meanwhile
            relay = OutboxRelay(engine, service.outbox, make_producer(settings, **{"client.id": f"{name}-relay"}),
                                batch_size=settings.relay_batch_size)
            relay_thread = threading.Thread(target=relay.run, args=(relay_stop, settings.relay_poll_interval_s),
                                            daemon=True)
            relay_thread.start()
        meter = Meter(sc, case.count, stop, profiler, broker_cpu)
        watchdog = threading.Timer(timeout, stop.set)
        watchdog.start()
        try:
            sc.run(stop, poll_timeout=0.5)
        finally:
            watchdog.cancel()
        if meter.end is None:
            raise RuntimeError(f"{name}: {meter.done} of {case.count} events within {timeout:.0f} s")
        seconds = meter.end - meter.start
        totals = sc.totals
        if totals.retried or totals.dead_lettered:
            raise RuntimeError(f"{name}: unexpected failures: {vars(totals)}")
        with engine.connect() as conn:
            inbox_rows = conn.execute(select(func.count()).select_from(service.inbox)).scalar_one()
            outbox_rows = conn.execute(select(func.count()).select_from(service.outbox)).scalar_one()
        if inbox_rows != totals.processed or outbox_rows != totals.processed:
            raise RuntimeError(f"{name}: {totals.processed} processed but {inbox_rows} inbox rows, "
                               f"{outbox_rows} outbox rows")
        extra = {}
        if relay is not None:  # the case counts only if its relay really published what it measured beside
            extra["relay_published"] = _relay_drained(relay, outbox_rows, name)
        broker_s = (None if meter.broker_start is None or meter.broker_end is None
                    else meter.broker_end - meter.broker_start)
        return figure(meter.done - meter.first, seconds, meter.cpu_end - meter.cpu_start, broker_s,
                      batch_size=batch_size, processed=totals.processed, duplicates=totals.duplicates, **extra)
    finally:
        stop.set()
        relay_stop.set()
        if relay_thread is not None:
            relay_thread.join(15)
        # drop the clients now (the relay's producer too): no reconnect noise once the broker stops
        sc = meter = relay = relay_thread = None
        gc.collect()
        engine.dispose()
