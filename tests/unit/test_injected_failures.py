"""Injected failures in the consumer loop (`ServiceConsumer`) and the outbox relay (`OutboxRelay`).

The consumer runs its real loop (`run_once`) on a real SQLite database in `tmp_path`, against
the fakes of `kafka_fakes`, extended here: `PartitionLog` serves one partition the way a broker
does (a fetch position that `consume` moves on and `seek` moves back) and records the offsets the
loop stores; `Broker` stands for the producer and can fail the way librdkafka does. Every
consumer case runs with concurrency 1 (one transaction per batch, a savepoint per message) and
concurrency 4 (lanes, a transaction per message). The loop's 1 s back-off after a failed batch
is a recorded no-op (`time.sleep` patched), so nothing here waits.

What is injected, and what each test proves:

1. The database fails the COMMIT (once) of the transaction holding one chosen event's inbox row
   (a SQLAlchemy "commit" listener raising `OperationalError`). Nothing of that transaction is
   stored (no effect, inbox or outbox row), no transaction is left holding the database, no
   offset is stored past it, the partition is rewound to it, and the next `run_once` runs every
   event exactly once, with no retry copy and no dead letter (a database failure is not the
   handler's failure):
   - `test_a_failed_commit_stores_nothing_rewinds_and_the_retry_runs_each_event_once`: the
     database ended the transaction, as PostgreSQL does after a failed COMMIT;
   - `test_a_commit_that_fails_with_the_transaction_still_open_is_rolled_back`: the
     transaction is still open after the failed COMMIT, as SQLite leaves it when COMMIT fails
     with SQLITE_BUSY; the runtime must not give that connection back to the pool.
2. `test_an_unexpected_integrity_error_routes_only_that_message_and_leaves_no_partial_effect`:
   a handler inserts a duplicate primary key into its own table (`IntegrityError`) after
   another handler of the same message wrote an effect and emitted an event. The message goes
   where `is_retryable` classifies it (today: unknown type, so the first retry tier), the other
   messages of the batch are committed and the offsets move past the whole batch, and nothing
   of the failing message remains (no effect, no outbox row, no inbox row).
3. The broker does not deliver the retry / dead-letter copy of a failing message for one batch:
   - `test_an_unacked_copy_rewinds_the_batch_and_after_recovery_the_message_is_routed_once`:
     `flush` reports the copy still undelivered (and it expires in the outage). The batch
     rewinds, no offset is stored past the failing message, and once the broker is back the
     message gets exactly one copy (retry or dead letter by its classification) while the
     committed messages of the batch are not done again;
   - `test_a_copy_refused_with_a_delivery_error_is_not_taken_for_acked`: the
     broker refuses the copy; librdkafka reports the error to `on_delivery` and leaves the
     queue empty, so `flush` returns 0. The same promises must hold;
   - `test_a_copy_still_queued_after_a_timed_out_flush_is_not_sent_twice`:
     `flush` times out with the copy still queued and the broker comes back before it
     expires; the message must still end up with exactly one copy.
4. `test_relay_delivery_errors_leave_those_rows_unpublished_and_the_next_batch_sends_only_them`:
   the relay's producer reports a `KafkaError` for some rows of a batch. Those rows stay
   unpublished, `DeliveryFailed` is raised, the acked rows are marked published, and the next
   `publish_batch` sends the failed rows again, and only them.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from confluent_kafka import KafkaError, TopicPartition
from sqlalchemy import Column, Integer, MetaData, String, Table, event, insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from kafka_fakes import FakeConsumer, FakeMessage, FakeProducer
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.consumer import BatchResult, ServiceConsumer
from services.runtime.controls import WorkerControls
from services.runtime.db import make_engine, outbox_table
from services.runtime.envelope import CAUSATION_ID, EVENT_ID, Envelope, new_event_id
from services.runtime.errors import PermanentError, RetryableError, is_retryable
from services.runtime.events import Event, OrderCreated, OrderLine, OrderRecorded
from services.runtime.handler import Handler, Service, UnitOfWork
from services.runtime.outbox import DeliveryFailed, OutboxRelay, add_event
from services.runtime.topology import ConsumerGroup

CODEC = Codec(EmbeddedRegistry())
AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
CONCURRENCY = pytest.mark.parametrize("concurrency", [1, 4], ids=["one-transaction-per-batch", "lanes"])


# -- events and messages ----------------------------------------------------------------------------


def order_created(order_id: str) -> OrderCreated:
    return OrderCreated(order_id=order_id, customer_id="c-1", customer_email="ada@example.com", currency="EUR",
                        lines=[OrderLine(sku="SKU-1", quantity=1, unit_price=Decimal("9.90"))],
                        total=Decimal("9.90"), created_at=AT)


def order_recorded(order_id: str) -> OrderRecorded:
    return OrderRecorded(order_id=order_id, units=1, revenue=Decimal("9.90"), currency="EUR", recorded_at=AT)


def message(topic: str, offset: int, event: Event) -> FakeMessage:
    """An encoded event with its envelope headers (a fresh event id), keyed by its order id."""
    envelope = Envelope(str(uuid.uuid4()), event.event_type(), event.schema_version, event.order_id)
    value = CODEC.encode(event.event_type(), event.model_dump(), event.schema_version)
    return FakeMessage(topic, offset, value, envelope.to_headers(), key=event.order_id.encode())


def event_id_of(msg: FakeMessage) -> str:
    return dict(msg.headers())[EVENT_ID].decode()


def header(copy: dict, name: str) -> str | None:
    value = copy["headers"].get(name)
    return None if value is None else value.decode()


# -- Kafka stand-ins --------------------------------------------------------------------------------


class PartitionLog(FakeConsumer):
    """One partition as the consumer sees it: `consume` returns the messages at and after the
    fetch position and moves it past them; `seek` moves it (and is recorded). Stored offsets are
    recorded by `FakeConsumer.store_offsets`."""

    def __init__(self, messages: list[FakeMessage]):
        super().__init__()
        self.messages = sorted(messages, key=lambda m: m.offset())
        self.topic, self.partition = self.messages[0].topic(), self.messages[0].partition()
        self.position = self.messages[0].offset()
        self.seeks: list[int] = []

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        batch = [m for m in self.messages if m.offset() >= self.position][:num_messages]
        if batch:
            self.position = batch[-1].offset() + 1
        return batch

    def seek(self, partition: TopicPartition) -> None:
        assert (partition.topic, partition.partition) == (self.topic, self.partition)
        self.seeks.append(partition.offset)
        self.position = partition.offset

    def pause(self, partitions) -> None:
        pass

    def resume(self, partitions) -> None:
        pass

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, self.partition)]

    def stored_offsets(self) -> list[int]:
        return [tp.offset for tp in self.stored]


# How the broker fails while it is down (`Broker.down`), as librdkafka reports it:
UNACKED_THEN_EXPIRED = ("flush times out with the copy queued; it expires before the broker is back, "
                        "and the next flush reports it as timed out (librdkafka's _MSG_TIMED_OUT)")
UNACKED_THEN_DELIVERED = "flush times out with the copy queued; it is delivered once the broker is back"
REFUSED = "the broker refuses the copy: the error goes to on_delivery, the queue is empty, flush returns 0"


class Broker(FakeProducer):
    """`FakeProducer` whose records are delivered by `flush`, unless the broker is `down`.
    `produced` lists every produce call; `delivered` what reached the topics."""

    def __init__(self):
        super().__init__()
        self.down: str | None = None
        self.queued: list[tuple[dict, Callable | None]] = []
        self.expired: list[tuple[dict, Callable | None]] = []  # reported as timed out by the next flush
        self.delivered: list[dict] = []

    def produce(self, topic, key=None, value=None, headers=None, on_delivery=None, **_):
        super().produce(topic, key=key, value=value, headers=headers)
        self.queued.append((self.produced[-1], on_delivery))

    def flush(self, _timeout=None) -> int:
        expired, self.expired = self.expired, []
        for _record, on_delivery in expired:
            if on_delivery is not None:
                on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), _record)
        if self.down in (UNACKED_THEN_EXPIRED, UNACKED_THEN_DELIVERED):
            remaining = len(self.queued)
            if self.down == UNACKED_THEN_EXPIRED:
                # message.timeout.ms passes during the outage: never delivered, reported later
                self.expired, self.queued = self.queued, []
            return remaining
        for record, on_delivery in self.queued:
            error = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if self.down == REFUSED else None
            if error is None:
                self.delivered.append(record)
            if on_delivery is not None:
                on_delivery(error, record)
        self.queued.clear()
        return 0


# -- the rig ----------------------------------------------------------------------------------------


@dataclass
class Rig:
    group: ConsumerGroup
    consumer: ServiceConsumer
    kafka: PartitionLog
    broker: Broker
    engine: Engine
    effects: Table
    ledger: Table
    injected: list[str] = field(default_factory=list)  # what an injected failure recorded

    @property
    def source(self) -> str:
        return self.group.inputs[0]

    def run_once(self) -> BatchResult:
        """One pass of the real loop: poll, handle, route, store offsets (or rewind)."""
        return self.consumer.run_once(poll_timeout=0)

    def effect_counts(self) -> Counter[str]:
        """Effect rows per event id (a count above 1 is an effect done twice)."""
        with self.engine.connect() as conn:
            return Counter(conn.execute(select(self.effects.c.event_id)).scalars())

    def outbox_counts(self) -> Counter[str]:
        """Outbox rows per causing event id."""
        outbox = self.consumer.service.outbox
        with self.engine.connect() as conn:
            return Counter(dict(h)[CAUSATION_ID] for h in conn.execute(select(outbox.c.headers)).scalars())

    def inbox_ids(self) -> set[str]:
        inbox = self.consumer.service.inbox
        with self.engine.connect() as conn:
            return set(conn.execute(select(inbox.c.event_id)).scalars())

    def ledger_counts(self) -> Counter[str]:
        with self.engine.connect() as conn:
            return Counter(conn.execute(select(self.ledger.c.order_id)).scalars())


def record_effect(effects: Table) -> Handler:
    """A handler that writes one effect row per event and emits an OrderRecorded."""

    def handle(event: Event, uow: UnitOfWork) -> list[Event]:
        uow.conn.execute(insert(effects).values(event_id=uow.envelope.event_id))
        return [order_recorded(event.order_id)]

    return handle


def book_in_ledger(ledger: Table) -> Handler:
    """A handler that inserts the order into its own ledger (primary key: order id)."""

    def handle(event: Event, uow: UnitOfWork) -> None:
        uow.conn.execute(insert(ledger).values(order_id=event.order_id))

    return handle


def fail_for(order_id: str, exc: BaseException) -> Handler:
    """A handler that raises `exc` for one order, every time."""

    def handle(event: Event, uow: UnitOfWork) -> None:
        if event.order_id == order_id:
            raise exc

    return handle


@pytest.fixture
def backoff_sleeps(monkeypatch) -> list[float]:
    """The loop sleeps 1 s after a failed batch: recorded instead of slept."""
    sleeps: list[float] = []
    monkeypatch.setattr("services.runtime.consumer.time.sleep", sleeps.append)
    return sleeps


@pytest.fixture
def make_rig(tmp_path, backoff_sleeps) -> Iterator[Callable[..., Rig]]:
    """`make_rig(name, messages_for, handlers_for, concurrency)`: a service on its own SQLite file,
    reading the messages `messages_for(source)` returns from one partition; its OrderCreated
    handlers are `handlers_for(effects, ledger)`."""
    built: list[Rig] = []

    def make(name: str, messages_for: Callable[[str], list[FakeMessage]],
             handlers_for: Callable[[Table, Table], list[Handler]], concurrency: int) -> Rig:
        group = ConsumerGroup(f"inject-{name}-{concurrency}", inputs=(f"inject-{name}-{concurrency}.in",),
                              retry_delays_s=(1, 10, 60))
        metadata = MetaData()
        effects = Table("effects", metadata, Column("id", Integer, primary_key=True, autoincrement=True),
                        Column("event_id", String(64), nullable=False))
        ledger = Table("ledger", metadata, Column("order_id", String(64), primary_key=True))
        service = Service(group, metadata, {OrderCreated: handlers_for(effects, ledger)},
                          controls=WorkerControls(concurrency=concurrency))
        engine = make_engine(f"sqlite:///{tmp_path / group.name}.db")
        metadata.create_all(engine)
        kafka, broker = PartitionLog(messages_for(group.inputs[0])), Broker()
        rig = Rig(group, ServiceConsumer(service, engine, kafka, broker, CODEC), kafka, broker, engine,
                  effects, ledger)
        built.append(rig)
        return rig

    yield make
    for rig in built:
        if rig.consumer.pool:
            rig.consumer.pool.shutdown(wait=True)
        rig.engine.dispose()


def orders(*order_ids: str) -> Callable[[str], list[FakeMessage]]:
    """OrderCreated messages for these orders at offsets 0, 1, ... of the source."""
    return lambda source: [message(source, offset, order_created(o)) for offset, o in enumerate(order_ids)]


# -- 1. the database fails at COMMIT once ----------------------------------------------------------------

# What a failed COMMIT leaves behind on the connection:
ROLLED_BACK = "the database ended the transaction (PostgreSQL after a failed COMMIT, a lost connection)"
LEFT_OPEN = "the transaction is still open (SQLite, when COMMIT fails with SQLITE_BUSY)"


def fail_commit_once_of_transaction_claiming(engine: Engine, event_id: str, leaves: str) -> list[str]:
    """The first COMMIT of a transaction whose (uncommitted) inbox rows include `event_id`
    raises OperationalError instead of committing, leaving the transaction as `leaves` says.
    Returns the list the failure is recorded in."""
    failed: list[str] = []

    def on_commit(conn: Connection) -> None:
        if failed:
            return
        claimed = conn.exec_driver_sql("SELECT 1 FROM inbox WHERE event_id = ?", (event_id,)).first()
        if claimed:
            failed.append(event_id)
            if leaves == ROLLED_BACK:
                conn.connection.driver_connection.rollback()
            raise OperationalError("COMMIT", None, sqlite3.OperationalError("injected COMMIT failure"))

    event.listen(engine, "commit", on_commit)
    return failed


def no_transaction_left_open(engine: Engine) -> bool:
    """True when a new connection can take SQLite's write lock at once: no transaction (say, a
    pooled connection's that was never rolled back) still holds the database."""
    probe = sqlite3.connect(engine.url.database, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
        return False
    finally:
        probe.close()


def assert_a_failed_commit_left_no_trace_and_runs_again_once(rig: Rig, target: FakeMessage, failed: list[FakeMessage],
                                                            committed: list[FakeMessage], sleeps: list[float]) -> None:
    """Runs the loop twice: in the first batch the COMMIT of `target`'s transaction fails
    (`failed`: the messages it took down, in offset order; `committed`: those committed apart
    from it); the second batch runs what was rewound."""
    first = rig.run_once()

    assert rig.injected == [event_id_of(target)], "the injected COMMIT failure did not fire"
    assert no_transaction_left_open(rig.engine), "the failed transaction still holds the database"
    assert first.processed == len(committed)
    lost = {event_id_of(m) for m in failed}
    assert not lost & set(rig.effect_counts()), "an effect of the failed transaction is stored"
    assert not lost & rig.inbox_ids(), "an inbox row of the failed transaction is stored"
    assert not lost & set(rig.outbox_counts()), "an outbox row of the failed transaction is stored"
    assert set(rig.effect_counts()) == {event_id_of(m) for m in committed}
    assert all(offset <= failed[0].offset() for offset in rig.kafka.stored_offsets()), "offsets stored past it"
    done_before = failed[0].offset() > rig.kafka.messages[0].offset()  # a committed prefix of the partition
    assert rig.kafka.stored_offsets() == ([failed[0].offset()] if done_before else [])
    assert rig.kafka.seeks == [failed[0].offset()], "the partition is not rewound to the failed transaction"
    assert rig.broker.produced == [], "a database failure is not the handler's: no retry copy, no dead letter"
    assert sleeps == [1.0]

    second = rig.run_once()  # the database is back; the rewound messages come again

    every = {event_id_of(m): 1 for m in rig.kafka.messages}
    redelivered = [m for m in rig.kafka.messages if m.offset() >= failed[0].offset()]
    assert (second.processed + second.duplicates, second.put_back) == (len(redelivered), 0)
    assert rig.effect_counts() == every, "an event's effect is missing or done twice"
    assert rig.outbox_counts() == every
    assert rig.inbox_ids() == set(every)
    assert rig.kafka.stored_offsets()[-1] == rig.kafka.messages[-1].offset() + 1
    assert rig.broker.produced == [] and (second.retried, second.dead_lettered) == (0, 0)


@CONCURRENCY
def test_a_failed_commit_stores_nothing_rewinds_and_the_retry_runs_each_event_once(make_rig, concurrency,
                                                                                    backoff_sleeps):
    # Orders o-1 (offsets 0, 1, 3) and o-2 (offset 2): with lanes, o-2 runs in a lane of its own.
    rig = make_rig("commit", orders("o-1", "o-1", "o-2", "o-1"),
                   lambda effects, ledger: [record_effect(effects)], concurrency)
    m0, m1, m2, m3 = rig.kafka.messages
    rig.injected = fail_commit_once_of_transaction_claiming(rig.engine, event_id_of(m1), ROLLED_BACK)
    if concurrency == 1:
        failed, committed = [m0, m1, m2, m3], []  # the batch's one transaction
    else:
        failed, committed = [m1, m3], [m0, m2]  # m1's own transaction; m3, behind it in its lane, does not run

    assert_a_failed_commit_left_no_trace_and_runs_again_once(rig, m1, failed, committed, backoff_sleeps)


@pytest.mark.parametrize("concurrency", [
    pytest.param(1, id="one-transaction-per-batch"),
    # Was a bug with lanes: after a failed COMMIT SQLAlchemy no longer calls the transaction
    # active, so it was not rolled back and its connection went back to the pool still inside
    # BEGIN IMMEDIATE, holding SQLite's write lock. The lane now discards that connection.
    pytest.param(4, id="lanes"),
])
def test_a_commit_that_fails_with_the_transaction_still_open_is_rolled_back(make_rig, concurrency, backoff_sleeps):
    # One order, so one lane: no other transaction ever waits for the lock, and a leaked one
    # shows at once (no_transaction_left_open) instead of after SQLite's 30 s busy timeout.
    rig = make_rig("commit-left-open", orders("o-1", "o-1", "o-1"),
                   lambda effects, ledger: [record_effect(effects)], concurrency)
    m0, m1, m2 = rig.kafka.messages
    rig.injected = fail_commit_once_of_transaction_claiming(rig.engine, event_id_of(m1), LEFT_OPEN)
    failed, committed = ([m0, m1, m2], []) if concurrency == 1 else ([m1, m2], [m0])

    assert_a_failed_commit_left_no_trace_and_runs_again_once(rig, m1, failed, committed, backoff_sleeps)


# -- 2. a handler hits a constraint it did not expect ---------------------------------------------------


@CONCURRENCY
def test_an_unexpected_integrity_error_routes_only_that_message_and_leaves_no_partial_effect(make_rig, concurrency):
    # Each message: first an effect row and an emitted event, then a ledger row. o-2 is already
    # in the ledger, so its second handler hits the primary key after the first one wrote.
    rig = make_rig("integrity", orders("o-1", "o-2", "o-3"),
                   lambda effects, ledger: [record_effect(effects), book_in_ledger(ledger)], concurrency)
    with rig.engine.begin() as conn:
        conn.execute(insert(rig.ledger).values(order_id="o-2"))
    good_1, bad, good_2 = rig.kafka.messages
    probe = IntegrityError("INSERT INTO ledger", {}, sqlite3.IntegrityError("UNIQUE constraint failed"))
    expected_topic = (rig.group.retry_topic(rig.source, 1) if is_retryable(probe)  # today: unknown, retried
                      else rig.group.dlt_topic(rig.source))

    result = rig.run_once()

    [copy] = rig.broker.delivered
    assert copy["topic"] == expected_topic
    assert header(copy, EVENT_ID) == event_id_of(bad)
    assert header(copy, "x-exception-type") == "sqlalchemy.exc.IntegrityError"
    assert (result.processed, result.retried + result.dead_lettered) == (2, 1)
    # the other messages are committed, and the offsets move past the whole batch
    committed = {event_id_of(good_1): 1, event_id_of(good_2): 1}
    assert rig.effect_counts() == committed
    assert rig.outbox_counts() == committed
    assert rig.inbox_ids() == set(committed)
    assert rig.ledger_counts() == {"o-1": 1, "o-2": 1, "o-3": 1}
    assert rig.kafka.stored_offsets() == [good_2.offset() + 1]
    assert rig.kafka.seeks == []


# -- 3. the broker does not deliver a retry / dead-letter copy ------------------------------------------


def assert_routed_once_after_recovery(rig: Rig, failing: FakeMessage, expected_topic: str) -> None:
    """Offsets never went past `failing` before its copy was delivered; in the end it has exactly
    one copy, the others each have their one effect, and the offsets are past the batch."""
    *_, last = rig.kafka.messages
    copies = [c for c in rig.broker.delivered if header(c, EVENT_ID) == event_id_of(failing)]
    assert [c["topic"] for c in copies] == [expected_topic], "not exactly one copy of the failing message"
    assert header(copies[0], "x-attempt") == "1"
    others = {event_id_of(m): 1 for m in rig.kafka.messages if m is not failing}
    assert rig.effect_counts() == others, "a committed effect is missing or done twice"
    assert rig.outbox_counts() == others
    assert rig.kafka.stored_offsets()[-1] == last.offset() + 1


@CONCURRENCY
@pytest.mark.parametrize("failure", [RetryableError("smtp down"), PermanentError("business rule")],
                         ids=["retryable", "permanent"])
def test_an_unacked_copy_rewinds_the_batch_and_after_recovery_the_message_is_routed_once(
        make_rig, concurrency, failure, backoff_sleeps):
    rig = make_rig(f"unacked-{type(failure).__name__}", orders("o-1", "o-2", "o-3"),
                   lambda effects, ledger: [record_effect(effects), fail_for("o-2", failure)], concurrency)
    first, failing, _ = rig.kafka.messages
    expected_topic = (rig.group.retry_topic(rig.source, 1) if is_retryable(failure)
                      else rig.group.dlt_topic(rig.source))
    rig.broker.down = UNACKED_THEN_EXPIRED

    during = rig.run_once()

    assert rig.broker.produced and rig.broker.delivered == [], "the copy was produced but not delivered"
    assert during == BatchResult(), "the batch must fail, not report its routing as done"
    assert all(offset <= failing.offset() for offset in rig.kafka.stored_offsets()), "offsets stored past it"
    assert rig.kafka.seeks == [first.offset()], "the batch is not rewound"
    assert backoff_sleeps == [1.0]

    rig.broker.down = None
    # The batch comes again and the failing message fails again. Its first copy is still on its
    # way, so no second one is made; this flush reports the first as expired: rewound once more.
    assert rig.run_once() == BatchResult() and rig.broker.delivered == []
    assert len(rig.broker.produced) == 1, "a second copy while the first was still on its way"
    after = rig.run_once()  # and now the copy is made again and delivered

    assert (after.duplicates, after.retried + after.dead_lettered) == (2, 1)
    assert_routed_once_after_recovery(rig, failing, expected_topic)


@CONCURRENCY
def test_a_copy_refused_with_a_delivery_error_is_not_taken_for_acked(make_rig, concurrency):
    """Was a bug that lost the message: the copies had no delivery callback and a refused one
    leaves the producer's queue, so flush() said 0 remaining and the offsets went past it."""
    rig = make_rig("refused", orders("o-1", "o-2", "o-3"),
                   lambda effects, ledger: [record_effect(effects), fail_for("o-2", RetryableError("down"))],
                   concurrency)
    _, failing, _ = rig.kafka.messages

    rig.broker.down = REFUSED
    rig.run_once()

    assert rig.broker.produced and rig.broker.delivered == [], "the copy was produced and refused"
    assert all(offset <= failing.offset() for offset in rig.kafka.stored_offsets()), (
        f"offsets {rig.kafka.stored_offsets()} stored past offset {failing.offset()}, whose copy was refused")

    rig.broker.down = None
    rig.run_once()

    assert_routed_once_after_recovery(rig, failing, rig.group.retry_topic(rig.source, 1))


@CONCURRENCY
def test_a_copy_still_queued_after_a_timed_out_flush_is_not_sent_twice(make_rig, concurrency):
    """After a flush that timed out the copy stays queued in the producer while the batch is
    rewound. The message runs again and fails again: it must not get a second copy (once the
    broker was back both were delivered, one more per timed-out flush)."""
    rig = make_rig("late", orders("o-1", "o-2", "o-3"),
                   lambda effects, ledger: [record_effect(effects), fail_for("o-2", RetryableError("down"))],
                   concurrency)
    _, failing, _ = rig.kafka.messages

    rig.broker.down = UNACKED_THEN_DELIVERED
    during = rig.run_once()

    assert rig.broker.queued and rig.broker.delivered == [], "the copy is produced and still queued"
    assert (during, rig.kafka.stored_offsets(), rig.kafka.seeks) == (BatchResult(), [], [0])  # rewound, as above

    rig.broker.down = None
    rig.run_once()

    assert_routed_once_after_recovery(rig, failing, rig.group.retry_topic(rig.source, 1))


# -- 4. the relay: delivery errors for some rows of a batch ---------------------------------------------


class ReportingBroker(FakeProducer):
    """A producer that reports each record's delivery to its `on_delivery` in `flush`; the
    records whose key is in `refuse_once` get a KafkaError, the first time only."""

    def __init__(self, refuse_once: set[bytes]):
        super().__init__()
        self.refuse_once = set(refuse_once)
        self.reports: list[tuple[dict, Callable]] = []

    def produce(self, topic, key=None, value=None, headers=None, on_delivery=None, **_):
        super().produce(topic, key=key, value=value, headers=headers)
        self.reports.append((self.produced[-1], on_delivery))

    def flush(self, _timeout=None) -> int:
        reports, self.reports = self.reports, []
        for record, on_delivery in reports:
            refused = record["key"] in self.refuse_once
            self.refuse_once.discard(record["key"])
            on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT) if refused else None, record)
        return 0


def stage_outbox_row(engine: Engine, outbox: Table, order_id: str) -> str:
    """One OrderRecorded in the outbox, as a handler's transaction writes it; its event id."""
    event = order_recorded(order_id)
    envelope = Envelope(new_event_id(), "OrderRecorded", OrderRecorded.schema_version, order_id)
    with engine.begin() as conn:
        add_event(conn, outbox, CODEC, event, envelope)
    return envelope.event_id


def published(engine: Engine, outbox: Table) -> dict[str, bool]:
    """Per event id: is the row marked published?"""
    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.id, outbox.c.published_at)).all()
    return {row.id: row.published_at is not None for row in rows}


def test_relay_delivery_errors_leave_those_rows_unpublished_and_the_next_batch_sends_only_them(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'relay.db'}")
    outbox = outbox_table(MetaData())
    outbox.metadata.create_all(engine)
    ids = {o: stage_outbox_row(engine, outbox, o) for o in ("o-1", "o-2", "o-3", "o-4")}
    broker = ReportingBroker(refuse_once={b"o-2", b"o-4"})
    relay = OutboxRelay(engine, outbox, broker)
    try:
        with pytest.raises(DeliveryFailed, match="2 outbox rows failed delivery"):
            relay.publish_batch()

        assert len(broker.produced) == 4
        assert published(engine, outbox) == {
            ids["o-1"]: True, ids["o-2"]: False, ids["o-3"]: True, ids["o-4"]: False}

        assert relay.publish_batch() == 2

        resent = [header(r, EVENT_ID) for r in broker.produced[4:]]
        assert resent == [ids["o-2"], ids["o-4"]], "the failed rows, in seq order, and only them"
        assert all(published(engine, outbox).values())
        assert relay.publish_batch() == 0 and len(broker.produced) == 6
    finally:
        engine.dispose()
