"""How the consumer loop splits a batch into runs for the handlers' batch forms, and what it does
when a batch form fails (services/runtime/consumer.py `_batch_run`, `_handle_run`).

On the real loop with the fake Kafka clients of `kafka_fakes` and a real SQLite file; the service
records one effect row per handled event, per message or set-based:
- a run is a maximal stretch of consecutive claimed messages of one event type whose handlers
  all have a batch form: another event type, a message without a batch form, or a second copy
  of a message (a duplicate, run per message) ends it;
- the messages of a held key are parked, not put in a run; the others around them still are;
- a batch form that raises leaves nothing: the run is redone per message, the failing message
  gets its retry copy, the others their effect once.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select

from kafka_fakes import FakeConsumer, FakeProducer
from services.runtime.consumer import ServiceConsumer
from services.runtime.db import make_engine
from services.runtime.envelope import EVENT_ID
from services.runtime.errors import RetryableError
from services.runtime.events import Event, OrderCancelled, OrderCreated
from services.runtime.handler import BatchUnitOfWork, Service, UnitOfWork, batch_form_of
from services.runtime.topology import ConsumerGroup
from test_routing_promises import CODEC, message, order_created

POISON = "o-poison"


class BatchRig:
    """A service whose OrderCreated handler has a batch form (both raise for POISON) and whose
    OrderCancelled handler has none."""

    def __init__(self, path):
        self.group = ConsumerGroup("batch-runs", inputs=("batch-runs.in",), retry_delays_s=(1,))
        metadata = MetaData()
        self.effects = Table("effects", metadata, Column("id", Integer, primary_key=True, autoincrement=True),
                             Column("event_id", String(64), nullable=False),
                             Column("how", String(16), nullable=False))
        self.batch_calls: list[list[str]] = []  # the order ids of each call of the batch form

        def record(event: Event, uow: UnitOfWork) -> None:
            if event.order_id == POISON:
                raise RetryableError("poisoned")
            uow.conn.execute(self.effects.insert().values(event_id=uow.envelope.event_id, how="one"))

        @batch_form_of(record)
        def record_all(events: list[Event], uow: BatchUnitOfWork) -> list[list[Event]]:
            self.batch_calls.append([e.order_id for e in events])
            uow.conn.execute(self.effects.insert(), [{"event_id": envelope.event_id, "how": "batch"}
                                                     for envelope in uow.envelopes])
            if any(e.order_id == POISON for e in events):  # after writing: the rollback must undo it
                raise RetryableError("poisoned")
            return [[] for _ in events]

        def record_cancel(event: Event, uow: UnitOfWork) -> None:
            uow.conn.execute(self.effects.insert().values(event_id=uow.envelope.event_id, how="one"))

        service = Service(self.group, metadata, {OrderCreated: [record], OrderCancelled: [record_cancel]})
        self.engine = make_engine(f"sqlite:///{path / 'batch-runs.db'}")
        metadata.create_all(self.engine)
        self.producer = FakeProducer()
        self.consumer = ServiceConsumer(service, self.engine, FakeConsumer(), self.producer, CODEC)

    @property
    def source(self) -> str:
        return self.group.inputs[0]

    def effects_by_event(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for event_id, how in conn.execute(select(self.effects.c.event_id, self.effects.c.how)
                                              .order_by(self.effects.c.id)):
                out.setdefault(event_id, []).append(how)
        return out

    def effect_count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(self.effects)).scalar_one()


@pytest.fixture
def rig(tmp_path) -> Iterator[BatchRig]:
    made = BatchRig(tmp_path)
    yield made
    made.engine.dispose()


def event_id(msg) -> str:
    return dict(msg.headers())[EVENT_ID].decode()


def cancelled(order_id: str) -> OrderCancelled:
    return OrderCancelled(order_id=order_id, customer_id="c-1", customer_email="ada@example.com",
                          cancelled_at=datetime(2026, 1, 1, tzinfo=UTC))


def test_runs_end_at_another_event_type_and_at_a_second_copy(rig):
    m = [message(rig.source, 0, order_created("o-1")), message(rig.source, 1, order_created("o-2")),
         message(rig.source, 2, cancelled("o-9")),
         message(rig.source, 3, order_created("o-3"))]
    again = m[3]  # the same message delivered twice in the batch
    m += [again, message(rig.source, 5, order_created("o-4")), message(rig.source, 6, order_created("o-5"))]

    result = rig.consumer.handle_batch(m)

    assert rig.batch_calls == [["o-1", "o-2"], ["o-3"], ["o-4", "o-5"]]
    assert (result.processed, result.duplicates) == (6, 1)
    effects = rig.effects_by_event()
    assert effects == {event_id(m[0]): ["batch"], event_id(m[1]): ["batch"], event_id(m[2]): ["one"],
                       event_id(m[3]): ["batch"], event_id(m[5]): ["batch"], event_id(m[6]): ["batch"]}


def test_a_failing_batch_form_is_undone_and_its_run_redone_per_message(rig):
    m = [message(rig.source, 0, order_created("o-1")), message(rig.source, 1, order_created(POISON)),
         message(rig.source, 2, order_created("o-3"))]

    result = rig.consumer.handle_batch(m)

    assert rig.batch_calls == [["o-1", POISON, "o-3"]]
    assert (result.processed, result.retried, result.dead_lettered) == (2, 1, 0)
    # the batch form's rows are gone; each other message has its per-message effect, once
    assert rig.effects_by_event() == {event_id(m[0]): ["one"], event_id(m[2]): ["one"]}
    [copy] = rig.producer.produced
    assert copy["topic"] == rig.group.retry_topic(rig.source, 1)
    assert copy["headers"][EVENT_ID].decode() == event_id(m[1])


def test_a_held_keys_messages_are_parked_not_run_and_the_run_goes_on_around_them(rig):
    rig.consumer.handle_batch([message(rig.source, 0, order_created(POISON))])  # fails: its key is held
    assert rig.effect_count() == 0
    rig.batch_calls.clear()
    m = [message(rig.source, 1, order_created("o-1")), message(rig.source, 2, order_created(POISON)),
         message(rig.source, 3, order_created("o-3"))]

    result = rig.consumer.handle_batch(m)

    assert result.held == 1 and result.processed == 2
    assert rig.batch_calls == [["o-1"], ["o-3"]]  # the parked message ended the first run
    assert rig.effects_by_event() == {event_id(m[0]): ["batch"], event_id(m[2]): ["batch"]}
