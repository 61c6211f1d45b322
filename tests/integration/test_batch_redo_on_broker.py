"""A batch whose batch form fails is redone per message, on the real broker, SQLite and PostgreSQL.

The real inventory service (its `reserve_stock` and batch form `reserve_stocks`) consumes a
batch of orders in which one cannot be reserved a second time: a reservation of its order id
exists already (the database refuses the insert, an IntegrityError). The batch form fails on it
for the whole run; the runtime rolls the run back and runs each message through `reserve_stock`:
- every other order is reserved exactly once (stock taken once, one reservation, one inbox row,
  one StockReserved in the outbox: nothing doubled by the failed attempt);
- the poisoned order goes down the retry chain and ends in the dead-letter topic, with its
  event id and the failure's headers, and takes no stock;
- a clean batch after it is run by the batch form again, in one call.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from conftest import settings_for
from reading import read_topic, wait_until
from services.inventory.handlers import HANDLERS, reserve_stock, reserve_stocks
from services.inventory.service import seed_stock
from services.inventory.tables import metadata, outbox, reservations, stock
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.consumer import ServiceConsumer
from services.runtime.controls import WorkerControls
from services.runtime.envelope import EVENT_ID, Envelope, new_event_id
from services.runtime.events import OrderCreated, OrderLine
from services.runtime.failure_headers import H_ATTEMPT, H_EXC_TYPE, H_ORIGINAL_TOPIC, H_REASON
from services.runtime.handler import Service
from services.runtime.kafka import make_consumer, make_producer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CODEC = Codec(EmbeddedRegistry())
STOCK = 1000
POISONED = "o-poisoned"


class BatchFormCalls:
    """Wraps the batch form: how many events each call got, and whether it raised."""

    def __init__(self):
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, events, uow):
        try:
            outputs = reserve_stocks(events, uow)
        except Exception:
            self.calls.append((len(events), False))
            raise
        self.calls.append((len(events), True))
        return outputs


@pytest.fixture
def batch_calls(monkeypatch) -> BatchFormCalls:
    calls = BatchFormCalls()
    monkeypatch.setattr(reserve_stock, "batch_form", calls)
    return calls


class InventoryRig:
    """The real inventory service on its own group and topics; its consumer starts when asked."""

    def __init__(self, bootstrap: str, group, engine):
        self.bootstrap, self.group, self.engine = bootstrap, group, engine
        self.settings = settings_for(bootstrap)
        self.producer = make_producer(self.settings)
        self.stop_event = threading.Event()
        self.errors: list[BaseException] = []
        self.thread: threading.Thread | None = None
        self.service = Service(group, metadata, HANDLERS, batch_size=500, controls=WorkerControls(breaker=None))

    @property
    def source(self) -> str:
        return self.group.inputs[0]

    def produce(self, order_id: str) -> str:
        event = OrderCreated(order_id=order_id, customer_id="c-1", customer_email="ada@example.com", currency="EUR",
                             lines=[OrderLine(sku="SKU-1", quantity=2, unit_price=Decimal("9.90"))],
                             total=Decimal("19.80"), created_at=datetime.now(UTC).replace(microsecond=0))
        envelope = Envelope(new_event_id(), "OrderCreated", OrderCreated.schema_version, order_id)
        self.producer.produce(self.source, key=order_id.encode(), headers=envelope.to_headers(),
                              value=CODEC.encode("OrderCreated", event.model_dump(), OrderCreated.schema_version))
        return envelope.event_id

    def flush(self) -> None:
        assert self.producer.flush(30) == 0

    def start(self) -> None:
        consumer = ServiceConsumer(self.service, self.engine, make_consumer(self.settings, self.group.name),
                                   make_producer(self.settings), CODEC)

        def run():
            try:
                consumer.run(self.stop_event, poll_timeout=0.1)
            except BaseException as exc:
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, name=f"consumer-{self.group.name}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(20)
            assert not self.thread.is_alive(), "consumer thread did not stop"
        assert not self.errors, self.errors


@pytest.fixture
def inventory(kafka_bootstrap, private_group, database_url, test_engine) -> Iterator[InventoryRig]:
    rig = InventoryRig(kafka_bootstrap, private_group(retry_delays_s=(0.2, 0.2), prefix="batch-redo"),
                       test_engine(database_url))
    metadata.create_all(rig.engine)  # with the runtime's tables, which the service added to the metadata
    seed_stock(rig.engine, {"SKU-1": STOCK})
    yield rig
    rig.stop()


def counts(engine) -> dict:
    with engine.connect() as conn:
        return {
            "available": conn.execute(select(stock.c.available).where(stock.c.sku == "SKU-1")).scalar_one(),
            "reservations": dict(conn.execute(select(reservations.c.order_id, func.count())
                                              .group_by(reservations.c.order_id)).all()),
            "outbox": dict(conn.execute(select(outbox.c.type, func.count()).group_by(outbox.c.type)).all()),
        }


def test_a_batch_whose_batch_form_fails_is_redone_per_message(inventory, batch_calls):
    with inventory.engine.begin() as conn:  # the order was reserved before, by another event id
        conn.execute(reservations.insert().values(order_id=POISONED, sku="SKU-1", quantity=2,
                                                  reserved_at=datetime.now(UTC)))
    others = [f"o-{uuid.uuid4().hex[:8]}" for _ in range(20)]
    sent = {order_id: inventory.produce(order_id) for order_id in others[:10]}
    poisoned_event = inventory.produce(POISONED)
    sent |= {order_id: inventory.produce(order_id) for order_id in others[10:]}
    inventory.flush()
    inventory.start()  # after producing: the first poll takes all 21 in one batch

    source = inventory.source
    [dead] = wait_until(lambda: read_topic(inventory.bootstrap, inventory.group.dlt_topic(source)),
                        what="the dead letter")

    assert batch_calls.calls[0] == (21, False)  # the whole batch went to the batch form, which failed
    assert dead.headers[EVENT_ID] == poisoned_event
    assert dead.headers[H_EXC_TYPE] == "sqlalchemy.exc.IntegrityError"
    assert dead.headers[H_ORIGINAL_TOPIC] == source and dead.headers[H_ATTEMPT] == "3"
    assert dead.headers[H_REASON] == "retries exhausted after 3 attempts"
    state = counts(inventory.engine)
    assert state["available"] == STOCK - 2 * len(others)  # each other order took its stock once
    assert state["reservations"] == {**{o: 1 for o in others}, POISONED: 1}  # the poisoned one kept its old row
    assert state["outbox"] == {"StockReserved": len(others)}
    inbox = inventory.service.inbox
    with inventory.engine.connect() as conn:
        claimed = set(conn.execute(select(inbox.c.event_id)).scalars())
    assert claimed == set(sent.values())  # the poisoned event's claim was given back at every attempt

    # a clean batch afterwards is run set-based again, in one call
    calls_before = len(batch_calls.calls)
    later = [f"o-{uuid.uuid4().hex[:8]}" for _ in range(5)]
    for order_id in later:
        inventory.produce(order_id)
    inventory.flush()
    wait_until(lambda: len(counts(inventory.engine)["reservations"]) == len(others) + 1 + len(later),
               what="the later orders reserved")
    assert all(ok for _, ok in batch_calls.calls[calls_before:])
    assert sum(n for n, _ in batch_calls.calls[calls_before:]) == len(later)
    assert counts(inventory.engine)["available"] == STOCK - 2 * (len(others) + len(later))

