"""The shared consumer loop and the outbox relay against a real broker and real databases.

A small test service (its own `effects` table; the handler writes one row per event and emits
an OrderRecorded) runs through `ServiceConsumer.run()` in a thread, on its own consumer group
and its own input topics, so tests sharing the session's broker never see each other's
messages. Every test runs on SQLite and on PostgreSQL (`database_url`).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, select, update
from sqlalchemy.engine import Engine

from conftest import settings_for, unique_name
from reading import delivered, watermark_offsets
from services.runtime import consumer as runtime
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.consumer import ServiceConsumer
from services.runtime.controls import WorkerControls
from services.runtime.envelope import CAUSATION_ID, CORRELATION_ID, EVENT_ID, Envelope, headers_to_dict, new_event_id
from services.runtime.errors import PermanentError, RetryableError
from services.runtime.events import OrderCreated, OrderLine, OrderRecorded
from services.runtime.handler import Service, UnitOfWork
from services.runtime.kafka import make_consumer, make_producer
from services.runtime.outbox import DeliveryFailed, OutboxRelay, add_event
from services.runtime.topology import ANALYTICS_RECORDED, ConsumerGroup

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

CODEC = Codec(EmbeddedRegistry())
WAIT_S = 20.0


# -- the test service -------------------------------------------------------------------------


@dataclass
class Script:
    """What the handler does per order id: "ok" (default), "permanent", "retry_once", "always_retry"."""

    behaviour: dict[str, str] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)


def make_test_service(group: ConsumerGroup, script: Script) -> Service:
    metadata = MetaData()
    effects = Table(
        "effects", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(64), nullable=False),   # deliberately not unique: the inbox must dedup
        Column("order_id", String(64), nullable=False),
        Column("handled_at", Float, nullable=False),       # time.time(), the consumer's clock
    )

    def record(event: OrderCreated, uow: UnitOfWork) -> list[OrderRecorded]:
        # The effect is written first, so a failure below proves the savepoint undoes it.
        uow.conn.execute(effects.insert().values(event_id=uow.envelope.event_id, order_id=event.order_id,
                                                 handled_at=time.time()))
        script.calls[event.order_id] += 1
        behaviour = script.behaviour.get(event.order_id, "ok")
        if behaviour == "permanent":
            raise PermanentError(f"order {event.order_id} cannot be handled")
        if behaviour == "always_retry" or (behaviour == "retry_once" and script.calls[event.order_id] == 1):
            raise RetryableError(f"dependency down for {event.order_id}")
        return [OrderRecorded(order_id=event.order_id, units=sum(l.quantity for l in event.lines),
                              revenue=event.total, currency=event.currency, recorded_at=uow.now)]

    return Service(group, metadata, {OrderCreated: [record]}, batch_size=100)


class BatchFailures(logging.Handler):
    """Collects the runtime's "batch failed" errors: they are retried silently, a test must notice."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("batch failed"):
            self.records.append(record)


@dataclass
class Harness:
    bootstrap: str
    group: ConsumerGroup
    engine: Engine
    script: Script
    controls: WorkerControls | None = None  # None: the Service default (one lane)
    service: Service = field(init=False)
    consumer: ServiceConsumer = field(init=False)
    producer: Producer = field(init=False)
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self):
        self.service = make_test_service(self.group, self.script)
        if self.controls is not None:
            self.service = replace(self.service, controls=self.controls)
        self.service.metadata.create_all(self.engine)
        settings = settings_for(self.bootstrap)
        self.consumer = ServiceConsumer(self.service, self.engine, make_consumer(settings, self.group.name),
                                        make_producer(settings), CODEC)
        self.producer = make_producer(settings)

    @property
    def source(self) -> str:
        return self.group.inputs[0]

    @property
    def effects(self) -> Table:
        return self.service.metadata.tables["effects"]

    def start(self) -> Harness:
        def run():
            try:
                self.consumer.run(self.stop_event, poll_timeout=0.1)
            except BaseException as exc:  # surfaced by stop()
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, name=f"consumer-{self.group.name}", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop; `run()` then closes the consumer, which commits the stored offsets."""
        if self.thread is not None:
            self.stop_event.set()
            self.thread.join(15)
            assert not self.thread.is_alive(), "consumer thread did not stop"
            self.thread = None
        assert not self.errors, self.errors

    # -- producing and reading --

    def produce(self, value: bytes | None, key: str, headers: list[tuple[str, bytes]] | None = None,
                topic: str | None = None) -> tuple[int, int]:
        """Produce and wait for the ack; returns (partition, offset)."""
        acked: list = []
        self.producer.produce(topic or self.source, key=key.encode(), value=value, headers=headers or [],
                              on_delivery=lambda err, msg: acked.append((err, msg)))
        delivered(self.producer)
        [(err, msg)] = acked
        assert err is None, err
        return msg.partition(), msg.offset()

    def produce_order(self, order_id: str | None = None, event_id: str | None = None) -> Sent:
        event = order_created(order_id)
        envelope = Envelope(event_id=event_id or new_event_id(), event_type="OrderCreated",
                            schema_version=OrderCreated.schema_version, correlation_id=event.order_id)
        value = CODEC.encode("OrderCreated", event.model_dump(), OrderCreated.schema_version)
        partition, offset = self.produce(value, event.order_id, envelope.to_headers())
        return Sent(event, envelope.event_id, value, partition, offset)

    def effect_rows(self, order_id: str | None = None) -> list:
        query = select(self.effects).order_by(self.effects.c.id)
        if order_id is not None:
            query = query.where(self.effects.c.order_id == order_id)
        with self.engine.connect() as conn:
            return conn.execute(query).all()

    def outbox_rows(self, order_id: str | None = None) -> list:
        query = select(self.service.outbox).order_by(self.service.outbox.c.seq)
        if order_id is not None:
            query = query.where(self.service.outbox.c.aggregateid == order_id)
        with self.engine.connect() as conn:
            return conn.execute(query).all()

    def read(self, topic: str) -> list[Received]:
        return read_topic(self.bootstrap, topic)

    def retry_topic(self, attempt: int) -> str:
        return self.group.retry_topic(self.source, attempt)

    @property
    def dlt(self) -> str:
        return self.group.dlt_topic(self.source)


@dataclass(frozen=True)
class Sent:
    event: OrderCreated
    event_id: str
    value: bytes
    partition: int
    offset: int

    @property
    def order_id(self) -> str:
        return self.event.order_id


@dataclass(frozen=True)
class Received:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes | None
    headers: dict[str, str]


def order_created(order_id: str | None = None) -> OrderCreated:
    return OrderCreated(
        order_id=order_id or str(uuid.uuid4()), customer_id="c-1", customer_email="ada@example.com", currency="EUR",
        lines=[OrderLine(sku="SKU-1", quantity=2, unit_price=Decimal("24.90"))], total=Decimal("49.80"),
        created_at=datetime.now(UTC).replace(microsecond=0),
    )


def _reader(bootstrap: str) -> Consumer:
    # No subscription, so no group join: assign() reads at once.
    return Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("reader"), "enable.auto.commit": False,
                     "isolation.level": "read_committed", "log_level": 0})


def end_offsets(client: Consumer, topic: str) -> dict[int, int]:
    partitions = client.list_topics(topic, timeout=10).topics[topic].partitions
    return {p: watermark_offsets(client, topic, p)[1] for p in partitions}


def read_topic(bootstrap: str, topic: str) -> list[Received]:
    """Every message in `topic` right now, in partition order."""
    client = _reader(bootstrap)
    try:
        ends = end_offsets(client, topic)
        pending = {p: end for p, end in ends.items() if end > 0}
        client.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        out: list[Received] = []
        deadline = time.monotonic() + 15
        while pending and time.monotonic() < deadline:
            for m in client.consume(100, 0.2):
                if m.error():
                    continue
                out.append(Received(m.topic(), m.partition(), m.offset(), m.key().decode() if m.key() else None,
                                    m.value(), headers_to_dict(m.headers())))
                if m.offset() + 1 >= pending.get(m.partition(), 0):
                    pending.pop(m.partition(), None)
        assert not pending, f"could not read {topic} to its end {ends}"
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        client.close()


def wait_until(condition: Callable[[], object], timeout: float = WAIT_S, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def assert_committed_at_end(bootstrap: str, group: str, topics: list[str]) -> None:
    client = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                       "log_level": 0})
    try:
        for topic in topics:
            ends = end_offsets(client, topic)
            committed = client.committed([TopicPartition(topic, p) for p in ends], timeout=10)
            got = {tp.partition: max(tp.offset, 0) for tp in committed}  # OFFSET_INVALID: nothing committed
            assert got == ends, f"{topic}: committed {got}, end offsets {ends}"
    finally:
        client.close()


@pytest.fixture
def harness(kafka_bootstrap: str, database_url: str, test_engine, private_group) -> Iterator[Callable[..., Harness]]:
    """Factory: a started test service on a fresh database, its own group and topics."""
    made: list[Harness] = []
    failures = BatchFailures()
    logging.getLogger(runtime.__name__).addHandler(failures)

    def make(retry_delays_s: tuple[float, ...] = (1.0,), partitions: int = 1,
             behaviour: dict[str, str] | None = None) -> Harness:
        group = private_group(retry_delays_s=retry_delays_s, partitions=partitions)
        h = Harness(kafka_bootstrap, group, test_engine(database_url), Script(behaviour or {}))
        made.append(h)
        return h.start()

    try:
        yield make
    finally:
        logging.getLogger(runtime.__name__).removeHandler(failures)
        for h in made:
            h.stop_event.set()
        for h in made:
            h.stop()
            h.producer.flush(5)
    assert not failures.records, [r.getMessage() for r in failures.records]


# -- exactly-once effects -----------------------------------------------------------------------


def test_duplicate_delivery_makes_one_effect_and_one_outbox_row(harness):
    h = harness()
    sent = h.produce_order()
    for _ in range(2):  # redelivered in the same batch (or the next: both must be no-ops)
        h.produce(sent.value, sent.order_id, Envelope(sent.event_id, "OrderCreated", 1, sent.order_id).to_headers())
    wait_until(lambda: h.consumer.totals.processed + h.consumer.totals.duplicates >= 3, what="3 deliveries")

    h.produce(sent.value, sent.order_id, Envelope(sent.event_id, "OrderCreated", 1, sent.order_id).to_headers())
    wait_until(lambda: h.consumer.totals.duplicates >= 3, what="a later redelivery")
    h.stop()

    assert [r.event_id for r in h.effect_rows()] == [sent.event_id]
    assert [r.type for r in h.outbox_rows()] == ["OrderRecorded"]
    assert (h.consumer.totals.processed, h.consumer.totals.duplicates) == (1, 3)
    assert h.read(h.dlt) == [] and h.read(h.retry_topic(1)) == []
    assert_committed_at_end(h.bootstrap, h.group.name, [h.source])


def test_emitted_events_go_through_the_outbox_to_their_topic_with_envelope_headers(harness):
    h = harness()
    sent = h.produce_order()
    wait_until(lambda: h.outbox_rows(sent.order_id), what="the outbox row")

    [row] = h.outbox_rows(sent.order_id)
    assert (row.topic, row.aggregateid, row.type, row.published_at) == (
        ANALYTICS_RECORDED, sent.order_id, "OrderRecorded", None)
    relay = OutboxRelay(h.engine, h.service.outbox, h.producer)
    assert relay.publish_batch() == 1
    assert relay.publish_batch() == 0

    [published] = [m for m in h.read(ANALYTICS_RECORDED) if m.key == sent.order_id]
    assert published.headers[EVENT_ID] == row.id
    assert published.headers[CAUSATION_ID] == sent.event_id
    assert published.headers[CORRELATION_ID] == sent.order_id
    assert published.headers["event_type"] == "OrderRecorded"
    decoded = CODEC.decode(published.value)
    assert OrderRecorded.model_validate(decoded.record).model_dump(exclude={"recorded_at"}) == {
        "order_id": sent.order_id, "units": 2, "revenue": Decimal("49.80"), "currency": "EUR"}
    assert h.outbox_rows(sent.order_id)[0].published_at is not None


# -- dead letters ---------------------------------------------------------------------------------


def test_undecodable_messages_are_dead_lettered_and_the_consumer_goes_on(harness):
    h = harness()
    key = str(uuid.uuid4())
    garbage = [
        (b"\xffnot avro at all", "magic byte -1"),
        (b"\x00" + struct.pack(">I", 999) + b"\x06o-1", "unknown schema id 999"),
        (CODEC.encode("OrderCreated", order_created(key).model_dump(), 1)[:-4], "does not decode"),
    ]
    for value, _ in garbage:
        h.produce(value, key, [(EVENT_ID, new_event_id().encode())])
    no_event_id = h.produce(CODEC.encode("OrderCreated", order_created(key).model_dump(), 1), key)
    good = h.produce_order()  # same single partition, after the bad ones

    wait_until(lambda: h.effect_rows(good.order_id), what="the good message after the bad ones")
    dead = wait_until(lambda: (lambda d: d if len(d) == 4 else None)(h.read(h.dlt)), what="4 dead letters")
    h.stop()

    for (value, reason), msg in zip(garbage, dead):
        assert msg.value == value and msg.key == key
        assert msg.headers["x-reason"] == "not retryable"
        assert msg.headers["x-exception-type"] == "services.runtime.codec.DecodeError"
        assert reason in msg.headers["x-exception-message"]
        assert "DecodeError" in msg.headers["x-exception-traceback"]
        assert (msg.headers["x-attempt"], msg.headers["x-group"], msg.headers["x-original-topic"]) == (
            "1", h.group.name, h.source)
        assert EVENT_ID in msg.headers  # the original headers travel with the dead letter
    assert dead[3].headers["x-exception-type"] == "services.runtime.errors.PermanentError"
    assert "event_id" in dead[3].headers["x-exception-message"]
    assert dead[3].headers["x-original-offset"] == str(no_event_id[1])
    assert h.read(h.retry_topic(1)) == []
    assert [r.order_id for r in h.effect_rows()] == [good.order_id]
    assert_committed_at_end(h.bootstrap, h.group.name, [h.source])


def test_permanent_error_goes_straight_to_the_dead_letter_topic(harness):
    bad = str(uuid.uuid4())
    h = harness(behaviour={bad: "permanent"})
    sent = h.produce_order(bad)
    good = h.produce_order()

    [dead] = wait_until(lambda: h.read(h.dlt), what="the dead letter")
    wait_until(lambda: h.effect_rows(good.order_id), what="the next order")
    h.stop()

    assert (dead.key, dead.value, dead.headers[EVENT_ID]) == (bad, sent.value, sent.event_id)
    assert dead.headers["x-attempt"] == "1"
    assert dead.headers["x-reason"] == "not retryable"
    assert dead.headers["x-exception-type"] == "services.runtime.errors.PermanentError"
    assert "cannot be handled" in dead.headers["x-exception-message"]
    assert "x-due-at" not in dead.headers
    assert h.read(h.retry_topic(1)) == []
    # the handler's effect was rolled back with its savepoint; the next order's is committed
    assert h.effect_rows(bad) == [] and h.outbox_rows(bad) == []
    assert len(h.outbox_rows(good.order_id)) == 1
    assert_committed_at_end(h.bootstrap, h.group.name, [h.source])


# -- retries ----------------------------------------------------------------------------------


def test_retryable_error_is_retried_not_before_its_due_time(harness):
    flaky = str(uuid.uuid4())
    h = harness(retry_delays_s=(1.5,), behaviour={flaky: "retry_once"})
    sent = h.produce_order(flaky)
    other = h.produce_order()  # a failing order must not hold up the next one

    wait_until(lambda: h.effect_rows(flaky), what="the retried order's effect")
    h.stop()

    [retry] = h.read(h.retry_topic(1))
    due = float(retry.headers["x-due-at"])
    assert (retry.value, retry.headers[EVENT_ID], retry.headers["x-attempt"]) == (sent.value, sent.event_id, "1")
    assert retry.headers["x-exception-type"] == "services.runtime.errors.RetryableError"
    assert (retry.headers["x-original-topic"], retry.headers["x-original-offset"]) == (h.source, str(sent.offset))
    [effect] = h.effect_rows(flaky)
    assert effect.handled_at >= due, f"processed {due - effect.handled_at:.3f}s before its due time"
    [other_effect] = h.effect_rows(other.order_id)
    assert other_effect.handled_at < due
    assert h.script.calls[flaky] == 2
    assert len(h.outbox_rows(flaky)) == 1
    assert h.read(h.dlt) == []
    assert_committed_at_end(h.bootstrap, h.group.name, [h.source, h.retry_topic(1)])


def test_exhausted_retries_go_to_the_dead_letter_topic_with_the_original_coordinates(harness):
    doomed = str(uuid.uuid4())
    h = harness(retry_delays_s=(0.5, 0.5), behaviour={doomed: "always_retry"})
    sent = h.produce_order(doomed)

    [dead] = wait_until(lambda: h.read(h.dlt), what="the dead letter")
    h.stop()

    [first] = h.read(h.retry_topic(1))
    [second] = h.read(h.retry_topic(2))
    assert [first.headers["x-attempt"], second.headers["x-attempt"], dead.headers["x-attempt"]] == ["1", "2", "3"]
    assert dead.headers["x-reason"] == "retries exhausted after 3 attempts"
    assert "x-due-at" not in dead.headers
    for msg in (first, second, dead):
        assert (msg.headers["x-original-topic"], msg.headers["x-original-partition"],
                msg.headers["x-original-offset"]) == (h.source, str(sent.partition), str(sent.offset))
        assert msg.headers["x-first-failure-at"] == first.headers["x-first-failure-at"]
        assert (msg.key, msg.value, msg.headers[EVENT_ID]) == (doomed, sent.value, sent.event_id)
    assert float(second.headers["x-due-at"]) - float(first.headers["x-due-at"]) >= 0.5
    assert h.script.calls[doomed] == 3
    assert h.effect_rows() == [] and h.outbox_rows() == []
    assert_committed_at_end(h.bootstrap, h.group.name, [h.source, h.retry_topic(1), h.retry_topic(2)])


# -- offsets ----------------------------------------------------------------------------------


def test_committed_offsets_reach_the_end_offsets_once_the_consumer_closes(harness):
    h = harness(partitions=3)
    sent = [h.produce_order() for _ in range(12)]
    assert len({s.partition for s in sent}) > 1

    wait_until(lambda: len(h.effect_rows()) == 12, what="12 effects")
    h.stop()

    assert_committed_at_end(h.bootstrap, h.group.name, [h.source])
    assert sorted(r.event_id for r in h.effect_rows()) == sorted(s.event_id for s in sent)


# -- the outbox relay -------------------------------------------------------------------------


def stage(engine: Engine, outbox: Table, order_id: str, seq: int | None = None) -> str:
    """One OrderRecorded in the outbox, as a handler's transaction writes it; `seq` forces its
    position, as a transaction that took its seq early and committed late would have it."""
    event = OrderRecorded(order_id=order_id, units=1, revenue=Decimal("1.00"), currency="EUR",
                          recorded_at=datetime.now(UTC))
    envelope = Envelope(new_event_id(), "OrderRecorded", OrderRecorded.schema_version, order_id)
    with engine.begin() as conn:
        add_event(conn, outbox, CODEC, event, envelope)
        if seq is not None:
            conn.execute(update(outbox).where(outbox.c.id == envelope.event_id).values(seq=seq))
    return envelope.event_id


def published_ids(bootstrap: str, order_id: str) -> list[str]:
    return [m.headers[EVENT_ID] for m in read_topic(bootstrap, ANALYTICS_RECORDED) if m.key == order_id]


def test_relay_publishes_each_orders_events_in_seq_order(kafka_bootstrap, runtime_outbox):
    engine, table = runtime_outbox
    orders = [str(uuid.uuid4()) for _ in range(3)]
    staged = {o: [] for o in orders}
    for i in range(30):
        o = orders[i % 3]
        staged[o].append(stage(engine, table, o))
    relay = OutboxRelay(engine, table, make_producer(settings_for(kafka_bootstrap)), batch_size=7)

    assert sum(iter(relay.publish_batch, 0)) == 30

    for o in orders:
        assert published_ids(kafka_bootstrap, o) == staged[o]
    with engine.connect() as conn:
        assert conn.execute(select(table.c.seq).where(table.c.published_at.is_(None))).all() == []


def test_relay_marks_rows_published_only_after_the_broker_acks(kafka_bootstrap, runtime_outbox):
    engine, table = runtime_outbox
    order_id = str(uuid.uuid4())
    ids = [stage(engine, table, order_id) for _ in range(3)]
    nobody = settings_for(f"127.0.0.1:{_closed_port()}")
    unreachable = make_producer(nobody, **{"message.timeout.ms": 1000, "log_level": 0})

    with pytest.raises(DeliveryFailed):
        OutboxRelay(engine, table, unreachable).publish_batch()
    with engine.connect() as conn:
        assert conn.execute(select(table.c.published_at)).scalars().all() == [None] * 3

    before = datetime.now(UTC)
    assert OutboxRelay(engine, table, make_producer(settings_for(kafka_bootstrap))).publish_batch() == 3
    with engine.connect() as conn:
        marks = conn.execute(select(table.c.published_at)).scalars().all()
    assert all(m is not None and _aware(m) >= before.replace(microsecond=0) for m in marks)
    assert published_ids(kafka_bootstrap, order_id) == ids


def test_relay_publishes_a_lower_seq_row_that_commits_late(kafka_bootstrap, runtime_outbox):
    engine, table = runtime_outbox
    order_id = str(uuid.uuid4())
    first = [stage(engine, table, order_id, seq=10), stage(engine, table, order_id, seq=20)]
    relay = OutboxRelay(engine, table, make_producer(settings_for(kafka_bootstrap)))
    assert relay.publish_batch() == 2

    late = stage(engine, table, order_id, seq=15)  # took seq 15 before 20 was published, committed after
    assert relay.publish_batch() == 1

    assert published_ids(kafka_bootstrap, order_id) == [*first, late]
    with engine.connect() as conn:
        assert conn.execute(select(table.c.published_at).where(table.c.seq == 15)).scalar_one() is not None


def _closed_port() -> int:
    from services.tools.brokers import free_port

    return free_port()


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite returns naive datetimes
