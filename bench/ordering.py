"""(f) What ordering per key costs: ordered retries (services/runtime/held.py) on and off.

The no-op service of (c) (inbox row + one outbox row per event, no effect of its own: the
runtime's cost shows undiluted) reads a topic on which every order has three events in a row
(three OrderCreated envelopes with the order id as key and event ids of their own). Four
cases per database (SQLite, and PostgreSQL when reachable), each a fresh consumer group reading
the same events from the start into a fresh database, with `WorkerControls.ordered_retries`:
- `ordered_retries on` / `ordered_retries off`, nothing fails: the happy path's cost, the held
  keys of each batch looked up once per batch;
- `ordered_retries on, 2% fail once` / `ordered_retries off, 2% fail once`: the first event of
  2% of the orders fails once with a RetryableError and is retried after 0.2 s (one retry tier).
  On, the order's later events are held in the group's database until it succeeds, then
  released one transaction each (`held`); off, they run at once, before it (`out_of_order`:
  events handled after a later event of their order).
Each case runs until every event is handled, retried and released ones included; the clock
starts after the first batch (it carries the group join), as in (c). The four cases run in
rounds (`Sizes.ordering_rounds`), on and off back to back with the first of them alternating,
and each case's fastest round is kept: on a shared machine a burst of other work (or of another
client of the PostgreSQL server) decides a single short round.
"""

from __future__ import annotations

import gc
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

from confluent_kafka import Producer
from sqlalchemy import MetaData, func, select

from bench.common import CODEC, figure, sample_order
from services.runtime.admin import ensure_topics
from services.runtime.consumer import ServiceConsumer
from services.runtime.controls import WorkerControls
from services.runtime.db import make_engine
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.errors import RetryableError
from services.runtime.events import OrderCreated, OrderRecorded
from services.runtime.handler import Service, UnitOfWork
from services.runtime.heap import tune_gc
from services.runtime.kafka import make_consumer, make_producer
from services.runtime.settings import Settings
from services.runtime.topology import ConsumerGroup, TopicSpec

EVENTS_PER_ORDER = 3
FAIL_SHARE = 0.02      # of the orders: their first event fails once
RETRY_DELAY_S = 0.2    # the group's one retry tier
# (ordered retries, failures)
CASES = ((True, False), (False, False), (True, True), (False, True))


def cases(round_: int) -> tuple[tuple[bool, bool], ...]:
    """The cases of one round: on and off back to back, so both see the same machine; which of
    them runs first alternates from round to round."""
    if round_ % 2 == 0:
        return CASES
    return tuple((not ordered, failures) for ordered, failures in CASES)


def best(figs: list[dict]) -> dict:
    """Of a case's rounds, the fastest (other work on a shared machine only ever slows a round
    down), with every round's figures beside it."""
    top = max(figs, key=lambda f: f["per_s"])
    return {**top, "rounds": len(figs), "rounds_per_s": [f["per_s"] for f in figs],
            "rounds_per_cpu_s": [f.get("per_cpu_s") for f in figs]}


def case_name(ordered: bool, failures: bool) -> str:
    return f"ordered_retries {'on' if ordered else 'off'}" + (f", {FAIL_SHARE:.0%} fail once" if failures else "")


@dataclass(frozen=True)
class Feed:
    """The pre-produced events: where they are, each one's order and place, which fail once."""

    topic: str
    events: dict[str, tuple[str, int]]   # event id -> (order id, 0-based place among its order's events)
    failing: frozenset[str]              # event ids that fail once (in the cases with failures)

    @property
    def orders(self) -> int:
        return len(self.events) // EVENTS_PER_ORDER


def produce_feed(settings: Settings, orders: int, seed: int = 11) -> Feed:
    """`orders` orders of EVENTS_PER_ORDER OrderCreated events each, an order's events in a row."""
    topic = f"bench.ordering.{uuid.uuid4().hex[:8]}"
    ensure_topics({"bootstrap.servers": settings.bootstrap}, [TopicSpec(topic)])
    rng = random.Random(seed)
    producer: Producer = make_producer(settings, **{"client.id": "bench-ordering-feeder"})
    events: dict[str, tuple[str, int]] = {}
    firsts: list[str] = []
    for _ in range(orders):
        order = sample_order(rng)
        value = CODEC.encode("OrderCreated", order.model_dump(), OrderCreated.schema_version)
        for place in range(EVENTS_PER_ORDER):
            envelope = Envelope(event_id=new_event_id(), event_type="OrderCreated",
                                schema_version=OrderCreated.schema_version, correlation_id=order.order_id)
            events[envelope.event_id] = (order.order_id, place)
            if place == 0:
                firsts.append(envelope.event_id)
            while True:
                try:
                    producer.produce(topic, key=order.order_id.encode(), value=value, headers=envelope.to_headers())
                    break
                except BufferError:
                    producer.poll(0.005)
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("could not pre-produce the ordering bench events")
    failing = frozenset(rng.sample(firsts, max(1, round(FAIL_SHARE * orders))))
    return Feed(topic, events, failing)


@dataclass
class Tracker:
    """The handler's bookkeeping: which events succeeded (in the handler; committed with their
    batch or release transaction, checked against the inbox at the end), which failed once, and
    how many ran after a later event of their own order."""

    feed: Feed
    fail: frozenset[str]
    failed: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    highest: dict[str, int] = field(default_factory=dict)
    out_of_order: int = 0

    def handle(self, event: OrderCreated, uow: UnitOfWork) -> list[OrderRecorded]:
        event_id = uow.envelope.event_id
        if event_id in self.fail and event_id not in self.failed:
            self.failed.add(event_id)
            raise RetryableError("bench: this event fails once")
        if event_id not in self.done:
            self.done.add(event_id)
            order, place = self.feed.events[event_id]
            if place < self.highest.get(order, -1):
                self.out_of_order += 1
            self.highest[order] = max(place, self.highest.get(order, -1))
        # what (c)'s no-op handler returns: its outbox row
        return [OrderRecorded(order_id=event.order_id, units=0, revenue=event.total, currency=event.currency,
                              recorded_at=uow.now)]


class WholeRun:
    """Wraps a consumer's `run_once` (public API): held events are released after the batch, in
    the same turn of the loop, so `handle_batch` alone does not see them. The clock starts after
    the first turn that handled an event and stops once every event was handled, retried and
    released ones included; then the consumer's own `run()` loop is told to stop."""

    def __init__(self, sc: ServiceConsumer, tracker: Tracker, total: int, stop: threading.Event, broker_cpu=None):
        self.tracker, self.total, self.stop = tracker, total, stop
        self.broker_cpu = broker_cpu or (lambda: None)
        self.start = self.end = self.broker_start = self.broker_end = None
        self.first = 0
        self._inner = sc.run_once
        sc.run_once = self

    def __call__(self, poll_timeout: float = 0.5):
        result = self._inner(poll_timeout)
        if self.stop.is_set():
            return result
        done = len(self.tracker.done)
        if self.start is None and done:
            self.start, self.first, self.cpu_start = time.perf_counter(), done, time.process_time()
            self.broker_start = self.broker_cpu()
        elif done >= self.total:
            self.end, self.cpu_end = time.perf_counter(), time.process_time()
            self.broker_end = self.broker_cpu()
            self.stop.set()
        return result


def run_case(settings: Settings, feed: Feed, database_url: str, *, ordered: bool, failures: bool,
             broker_cpu=None, timeout: float = 300.0) -> dict:
    tune_gc()  # as consumers.run_case: before this case's clients exist
    name = f"bench-ordering-{'on' if ordered else 'off'}{'-failing' if failures else ''}-{uuid.uuid4().hex[:6]}"
    group = ConsumerGroup(name, inputs=(feed.topic,), retry_delays_s=(RETRY_DELAY_S,))
    ensure_topics({"bootstrap.servers": settings.bootstrap},
                  [TopicSpec(t) for t in (*group.retry_topics(feed.topic), group.dlt_topic(feed.topic))])
    tracker = Tracker(feed, feed.failing if failures else frozenset())
    service = Service(group, MetaData(), {OrderCreated: [tracker.handle]}, batch_size=settings.consumer_batch_size,
                      controls=WorkerControls(ordered_retries=ordered))
    engine = make_engine(database_url)
    stop = threading.Event()
    total = len(feed.events)
    sc = meter = None
    try:
        service.metadata.create_all(engine)
        sc = ServiceConsumer(service, engine, make_consumer(settings, group.name, **{"client.id": name}),
                             make_producer(settings, **{"client.id": f"{name}-retries"}), CODEC)
        meter = WholeRun(sc, tracker, total, stop, broker_cpu)
        watchdog = threading.Timer(timeout, stop.set)
        watchdog.start()
        runtime_log = logging.getLogger("services.runtime.consumer")
        level = runtime_log.level
        if failures:  # one "handler failed" warning per failure on the terminal: the failures are the point
            runtime_log.setLevel(logging.ERROR)
        try:
            sc.run(stop, poll_timeout=0.5)
        finally:
            runtime_log.setLevel(level)
            watchdog.cancel()
        if meter.end is None:
            raise RuntimeError(f"{name}: {len(tracker.done)} of {total} events within {timeout:.0f} s")
        totals = sc.totals
        expected_retries = len(tracker.fail)
        if totals.dead_lettered or totals.retried < expected_retries or (not failures and totals.retried):
            raise RuntimeError(f"{name}: {expected_retries} retries expected, got {vars(totals)}")
        if not ordered and totals.held:
            raise RuntimeError(f"{name}: events held with ordered_retries off: {vars(totals)}")
        with engine.connect() as conn:
            inbox_rows = conn.execute(select(func.count()).select_from(service.inbox)).scalar_one()
            outbox_rows = conn.execute(select(func.count()).select_from(service.outbox)).scalar_one()
            held_left = conn.execute(select(func.count()).select_from(service.held_events)).scalar_one()
        if inbox_rows != total or outbox_rows != total or held_left:
            raise RuntimeError(f"{name}: {total} events but {inbox_rows} inbox rows, {outbox_rows} outbox rows, "
                               f"{held_left} still held")
        broker_s = (None if meter.broker_start is None or meter.broker_end is None
                    else meter.broker_end - meter.broker_start)
        return figure(total - meter.first, meter.end - meter.start, meter.cpu_end - meter.cpu_start, broker_s,
                      batch_size=service.batch_size, ordered_retries=ordered, events=total, orders=feed.orders,
                      events_per_order=EVENTS_PER_ORDER, failing_orders=len(tracker.fail),
                      retry_delay_s=RETRY_DELAY_S if failures else None, retried=totals.retried,
                      held=totals.held, out_of_order=tracker.out_of_order, duplicates=totals.duplicates,
                      # the loop's own count: handle_batch's, without the held events released after it
                      processed_in_batches=totals.processed)
    finally:
        stop.set()
        sc = meter = None  # drop the clients now: no reconnect noise once the broker stops
        gc.collect()
        engine.dispose()
