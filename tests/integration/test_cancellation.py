"""Cancellation at each service, on the real broker, SQLite and PostgreSQL: the real handlers of
inventory, invoice, email and analytics (their own migrations, the shared consumer loop), fed
OrderCreated, StockReserved / StockRejected and OrderCancelled on private topics, in the orders
and with the faults each test chooses.

Asserted where the outcome lives: stock levels and reservations, invoices and credit notes (and
their PDFs), mails in a real SMTP server's maildir, the analytics rollups, the StepCompensated
rows in each service's outbox. The property test at the end runs random fault schedules through
inventory and checks that each order's effects happened in the order its events were accepted.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Boolean, Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.engine import Engine

from conftest import settings_for, unique_name
from reading import read_topic, wait_until
from services.analytics.service import SERVICE as ANALYTICS
from services.analytics.tables import per_minute, per_sku
from services.email.handlers import EmailDeps
from services.email.mailer import MailDeliveryError, SmtpMailer
from services.email.service import SERVICE as EMAIL
from services.email.smtp_sink import SmtpSink, read_maildir
from services.inventory.service import SERVICE as INVENTORY, seed_stock
from services.inventory.tables import reservations, stock
from services.invoice.handlers import InvoiceDeps
from services.invoice.service import SERVICE as INVOICE
from services.invoice.tables import credit_notes, invoices
from services.runtime.admin import ensure_topics
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.consumer import ServiceConsumer
from services.runtime.controls import WorkerControls
from services.runtime.declaration import ServiceDeclaration
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.errors import RetryableError
from services.runtime.events import (
    Event, OrderCancelled, OrderCreated, OrderLine, ReservedLine, StockRejected, StockReserved,
)
from services.runtime.failure_headers import RUNTIME_HEADERS
from services.runtime.handler import Service, UnitOfWork
from services.runtime.kafka import make_consumer, make_producer
from services.runtime.migrate import upgrade_database
from services.runtime.topology import ConsumerGroup, TopicSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CODEC = Codec(EmbeddedRegistry())
STOCK = 100  # units of each SKU at the start


def order_created(order_id: str, lines: dict[str, int], price: str = "10.00") -> OrderCreated:
    order_lines = [OrderLine(sku=sku, quantity=qty, unit_price=Decimal(price)) for sku, qty in lines.items()]
    return OrderCreated(order_id=order_id, customer_id="c-1", customer_email=f"{order_id}@example.com",
                        currency="EUR", lines=order_lines, total=sum(l.quantity * l.unit_price for l in order_lines),
                        created_at=datetime.now(UTC).replace(microsecond=0))


def order_cancelled(order_id: str) -> OrderCancelled:
    return OrderCancelled(order_id=order_id, customer_id="c-1", customer_email=f"{order_id}@example.com",
                          reason="changed my mind", cancelled_at=datetime.now(UTC).replace(microsecond=0))


def new_order_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


# -- the rig: a real service on private topics ----------------------------------------------------

Fault = Callable[[Event, int], None]  # (event, how often this event was tried before); may raise


@dataclass
class ServiceRig:
    """The real service `declaration` (its handlers, tables and migrations) on its own consumer
    group and topics: each of the service's input topics `T` is `<group>.T` here. Every handler
    run that commits is logged (`runs`: order id, event type, whether it changed anything, i.e.
    returned events, in commit order), and `fault` may make any attempt fail first."""

    bootstrap: str
    declaration: ServiceDeclaration
    engine: Engine
    deps: object = None
    fault: Fault = lambda event, tried: None
    controls: WorkerControls = field(default_factory=lambda: WorkerControls(breaker=None))
    retry_delays_s: tuple[float, ...] = (0.3, 0.3)
    tries: dict = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)
    errors: list = field(default_factory=list)

    def __post_init__(self) -> None:
        name = unique_name(self.declaration.name)
        self.topic = {source: f"{name}.{source}" for source in self.declaration.group.inputs}
        self.group = ConsumerGroup(name, inputs=tuple(self.topic.values()), retry_delays_s=self.retry_delays_s)
        topics = [t for source in self.group.inputs
                  for t in (source, *self.group.retry_topics(source), self.group.dlt_topic(source))]
        ensure_topics({"bootstrap.servers": self.bootstrap}, [TopicSpec(t, partitions=2) for t in topics])
        upgrade_database(self.engine, self.declaration)
        self.runs = Table("runs", MetaData(), Column("seq", Integer, primary_key=True, autoincrement=True),
                          Column("order_id", String(64)), Column("event_type", String(64)), Column("changed", Boolean))
        self.runs.metadata.create_all(self.engine)
        handlers = {event: [self._logged(handler) for handler in chain]
                    for event, chain in self.declaration.handlers.items()}
        self.service = Service(self.group, self.declaration.metadata, handlers, deps=self.deps,
                               retryable=(MailDeliveryError,), batch_size=50, controls=self.controls)
        settings = settings_for(self.bootstrap)
        self.consumer = ServiceConsumer(self.service, self.engine, make_consumer(settings, name),
                                        make_producer(settings), CODEC)
        self.producer = make_producer(settings)
        self.thread = threading.Thread(target=self._run, name=f"consumer-{name}", daemon=True)
        self.thread.start()

    def _logged(self, handler):
        def run(event: Event, uow: UnitOfWork):
            key = (uow.envelope.event_id, handler.__name__)
            tried = self.tries.get(key, 0)
            self.tries[key] = tried + 1
            self.fault(event, tried)
            out = handler(event, uow)
            uow.conn.execute(self.runs.insert().values(order_id=event.order_id, event_type=event.event_type(),
                                                       changed=bool(out)))
            return out
        run.__name__ = handler.__name__
        return run

    def _run(self) -> None:
        try:
            self.consumer.run(self.stop_event, poll_timeout=0.1)
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.stop_event.set()
            self.thread.join(30)
            assert not self.thread.is_alive(), "consumer thread did not stop"
        assert not self.errors, self.errors

    def send(self, *events: Event) -> None:
        """Publish the events, in this order, to the topics their types go to (here: private)."""
        from services.runtime.topology import TOPIC_FOR_EVENT

        for event in events:
            envelope = Envelope(new_event_id(), event.event_type(), event.schema_version, event.order_id)
            value = CODEC.encode(event.event_type(), event.model_dump(), event.schema_version)
            self.producer.produce(self.topic[TOPIC_FOR_EVENT[event.event_type()]], key=event.order_id.encode(),
                                  value=value, headers=envelope.to_headers())
        assert self.producer.flush(30) == 0

    def runs_of(self, order_id: str, changed_only: bool = False) -> list[str]:
        """The event types of the order's committed handler runs, in commit order."""
        query = select(self.runs.c.event_type).where(self.runs.c.order_id == order_id).order_by(self.runs.c.seq)
        if changed_only:
            query = query.where(self.runs.c.changed)
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def effects_of(self, order_id: str) -> list[str]:
        """The event types of the order's handler runs that changed something, in commit order."""
        return self.runs_of(order_id, changed_only=True)

    def wait_for_retry(self, order_id: str, source: str) -> None:
        """Until the order's event from `source` has failed and its copy is in the retry chain."""
        retry_topic = self.group.retry_topic(self.topic[source], 1)
        wait_until(lambda: any(m.key == order_id for m in read_topic(self.bootstrap, retry_topic)) or None,
                   what=f"{order_id}'s event in {retry_topic}")

    def emitted(self, event_type: str, order_id: str | None = None) -> list[dict]:
        """Records of the events the service staged in its outbox (what its relay publishes)."""
        outbox = self.service.outbox
        with self.engine.connect() as conn:
            rows = conn.execute(select(outbox.c.payload).where(outbox.c.type == event_type)
                                .order_by(outbox.c.seq)).scalars().all()
        records = [CODEC.decode(payload).record for payload in rows]
        return [r for r in records if order_id is None or r["order_id"] == order_id]

    def compensation(self, order_id: str) -> dict:
        return wait_until(lambda: (self.emitted("StepCompensated", order_id) or [None])[0],
                          what=f"{self.declaration.name}'s compensation of {order_id}")

    def held(self) -> tuple[int, int]:
        with self.engine.connect() as conn:
            return (conn.execute(select(func.count()).select_from(self.service.held_keys)).scalar_one(),
                    conn.execute(select(func.count()).select_from(self.service.held_events)).scalar_one())


@pytest.fixture
def service_rig(kafka_bootstrap, test_engine, database_url) -> Iterator[Callable[..., ServiceRig]]:
    """Factory: a running real service on a fresh database (SQLite, then PostgreSQL)."""
    made: list[ServiceRig] = []

    def make(declaration: ServiceDeclaration, **kwargs) -> ServiceRig:
        made.append(ServiceRig(kafka_bootstrap, declaration, test_engine(database_url), **kwargs))
        return made[-1]

    yield make
    for rig in made:
        rig.stop_event.set()
    for rig in made:
        rig.stop()


def inventory(service_rig, **kwargs) -> ServiceRig:
    rig = service_rig(INVENTORY, **kwargs)
    seed_stock(rig.engine, {"SKU-1": STOCK, "SKU-2": STOCK, "SKU-OUT": 0})
    return rig


def levels(rig: ServiceRig) -> dict[str, tuple[int, int]]:
    with rig.engine.connect() as conn:
        return {row.sku: (row.available, row.reserved) for row in conn.execute(select(stock))}


def reserved_orders(rig: ServiceRig) -> set[str]:
    with rig.engine.connect() as conn:
        return set(conn.execute(select(reservations.c.order_id)).scalars())


# -- inventory --------------------------------------------------------------------------------------

def test_a_cancel_behind_a_retried_create_waits_and_releases_what_the_create_reserved(service_rig):
    retried = new_order_id("retried")

    def create_fails_twice(event: Event, tried: int) -> None:
        if event.order_id == retried and isinstance(event, OrderCreated) and tried < 2:
            raise RetryableError(f"attempt {tried + 1}: the stock database is busy")

    rig = inventory(service_rig, fault=create_fails_twice, retry_delays_s=(1.0, 1.0))
    rig.send(order_created(retried, {"SKU-1": 3, "SKU-2": 1}))
    rig.wait_for_retry(retried, "orders.created")
    rig.send(order_cancelled(retried))  # arrives while its create is in the retry chain
    others = [new_order_id("other") for _ in range(5)]
    rig.send(*(order_created(o, {"SKU-1": 1}) for o in others))

    compensation = rig.compensation(retried)
    wait_until(lambda: rig.held() == (0, 0) or None, what="the order's key released")

    assert rig.effects_of(retried) == ["OrderCreated", "OrderCancelled"], "the cancel ran before its create"
    assert compensation["action"] == "released 3 x SKU-1, 1 x SKU-2"
    assert levels(rig)["SKU-1"] == (STOCK - 5, 5) and levels(rig)["SKU-2"] == (STOCK, 0)
    assert reserved_orders(rig) == set(others)
    # the other orders were not held up: each was reserved before the retried create succeeded
    reserved_at = {r["order_id"]: r["reserved_at"] for r in rig.emitted("StockReserved")}
    assert all(reserved_at[o] < reserved_at[retried] for o in others), reserved_at
    assert [m.headers["x-group"] for m in read_topic(rig.bootstrap, rig.group.retry_topic(
        rig.topic["orders.created"], 1))] == [rig.group.name]


def test_a_cancel_read_before_its_create_reserves_nothing_then_or_later(service_rig):
    early = new_order_id("early")
    rig = inventory(service_rig)

    rig.send(order_cancelled(early))  # on its own topic, it may be read first
    assert rig.compensation(early)["action"] == "nothing was reserved: nothing to release"
    rig.send(order_created(early, {"SKU-1": 4}))
    later = new_order_id("later")
    rig.send(order_created(later, {"SKU-1": 1}))  # read after the early create, same partitions
    wait_until(lambda: rig.emitted("StockReserved", later) or None, what="a later order reserved")
    wait_until(lambda: rig.runs_of(early) == ["OrderCancelled", "OrderCreated"] or None,
               what="the early create handled")

    assert rig.emitted("StockReserved", early) == [] and rig.emitted("StockRejected", early) == []
    assert levels(rig)["SKU-1"] == (STOCK - 1, 1)
    assert len(rig.emitted("StepCompensated", early)) == 1


def test_a_cancel_of_a_rejected_order_releases_nothing(service_rig):
    rejected = new_order_id("rejected")
    rig = inventory(service_rig)
    rig.send(order_created(rejected, {"SKU-1": 2, "SKU-OUT": 1}))
    wait_until(lambda: rig.emitted("StockRejected", rejected) or None, what="the order rejected")
    rig.send(order_cancelled(rejected))

    assert rig.compensation(rejected)["action"] == "nothing was reserved: nothing to release"
    assert levels(rig)["SKU-1"] == (STOCK, 0)


@pytest.mark.parametrize("policy", ["hold", "release"])
def test_a_dead_lettered_create_and_its_cancel_end_with_the_stock_given_back(service_rig, policy):
    """`hold`: the cancel waits until the dead letter is replayed, then releases what the
    replayed create reserved. `release`: the cancel runs at once (nothing reserved yet) and the
    replayed create then reserves nothing. Either way the stock is whole again."""
    order = new_order_id("dead")
    broken = {"create": True}

    def create_fails_until_fixed(event: Event, tried: int) -> None:
        if isinstance(event, OrderCreated) and event.order_id == order and broken["create"]:
            raise RetryableError("the stock database is down")

    rig = inventory(service_rig, fault=create_fails_until_fixed, retry_delays_s=(0.2,),
                    controls=WorkerControls(breaker=None, held_dead_letter_policy=policy))
    rig.send(order_created(order, {"SKU-2": 7}))
    dlt = rig.group.dlt_topic(rig.topic["orders.created"])
    [dead] = wait_until(lambda: read_topic(rig.bootstrap, dlt) or None, what="the create dead-lettered")
    rig.send(order_cancelled(order))  # the customer gives up on the stuck order
    if policy == "hold":
        wait_until(lambda: rig.held() == (1, 1) or None, what="the cancel held behind its dead-lettered create")
        assert rig.emitted("StepCompensated", order) == []
    else:
        assert rig.compensation(order)["action"] == "nothing was reserved: nothing to release"

    broken["create"] = False  # fixed; an operator replays the dead letter (as `orderpipe dlt replay`)
    replay = [(k, v) for k, v in dead.raw_headers if k not in RUNTIME_HEADERS]
    rig.producer.produce(rig.group.retry_topic(rig.topic["orders.created"], 1), key=dead.key.encode(),
                         value=dead.value, headers=replay)
    rig.producer.flush(30)
    wait_until(lambda: len(rig.runs_of(order)) == 2 or None, what="the replayed create and the cancel")
    wait_until(lambda: rig.held() == (0, 0) or None, what="the key released")

    assert levels(rig)["SKU-2"] == (STOCK, 0) and reserved_orders(rig) == set()
    [compensation] = rig.emitted("StepCompensated", order)
    if policy == "hold":
        assert rig.effects_of(order) == ["OrderCreated", "OrderCancelled"]
        assert compensation["action"] == "released 7 x SKU-2"
    else:
        assert rig.runs_of(order) == ["OrderCancelled", "OrderCreated"]
        assert rig.effects_of(order) == ["OrderCancelled"]  # the replayed create did nothing
        assert rig.emitted("StockReserved", order) == []


# -- invoice -----------------------------------------------------------------------------------------

def test_invoice_credits_an_invoiced_order_and_never_invoices_one_cancelled_first(service_rig, tmp_path):
    rig = service_rig(INVOICE, deps=InvoiceDeps(tmp_path / "invoices"))
    invoiced, early, rejected = new_order_id("invoiced"), new_order_id("early"), new_order_id("rejected")
    at = datetime.now(UTC).replace(microsecond=0)

    rig.send(order_created(invoiced, {"SKU-1": 2}, price="12.50"),
             StockReserved(order_id=invoiced, lines=[ReservedLine(sku="SKU-1", quantity=2)], reserved_at=at))
    wait_until(lambda: rig.emitted("InvoiceIssued", invoiced) or None, what="the invoice")
    rig.send(order_cancelled(invoiced))
    # cancelled before the stock decision reached invoice: no invoice, then or later
    rig.send(order_created(early, {"SKU-1": 1}), order_cancelled(early))
    assert rig.compensation(early)["action"] == "no invoice was issued: nothing to credit"
    rig.send(StockReserved(order_id=early, lines=[ReservedLine(sku="SKU-1", quantity=1)], reserved_at=at))
    rig.send(order_created(rejected, {"SKU-OUT": 1}),
             StockRejected(order_id=rejected, reason="out of stock: SKU-OUT", missing=[], rejected_at=at),
             order_cancelled(rejected))

    credited = rig.compensation(invoiced)
    assert rig.compensation(rejected)["action"] == "no invoice was issued: nothing to credit"
    wait_until(lambda: rig.runs_of(early).count("StockReserved") == 1 or None, what="the late stock decision")

    assert credited["document"] == "CN-000001"
    assert credited["action"] == "credit note CN-000001 for invoice INV-000001 (25.00 EUR)"
    with rig.engine.connect() as conn:
        assert [(r.order_id, r.number) for r in conn.execute(select(invoices))] == [(invoiced, 1)]
        [note] = conn.execute(select(credit_notes)).all()
    assert (note.order_id, note.number, note.invoice_number, note.total) == (invoiced, 1, 1, Decimal("25.00"))
    pdf = (tmp_path / "invoices" / note.pdf_path).read_bytes()
    assert pdf.startswith(b"%PDF")
    assert rig.emitted("InvoiceIssued", early) == []


def test_credit_note_numbers_are_gapless_and_separate_from_invoice_numbers(service_rig, tmp_path):
    rig = service_rig(INVOICE, deps=InvoiceDeps(tmp_path / "invoices"))
    at = datetime.now(UTC).replace(microsecond=0)
    orders = [new_order_id("o") for _ in range(6)]
    for order in orders:
        rig.send(order_created(order, {"SKU-1": 1}),
                 StockReserved(order_id=order, lines=[ReservedLine(sku="SKU-1", quantity=1)], reserved_at=at))
    wait_until(lambda: len(rig.emitted("InvoiceIssued")) == 6 or None, what="six invoices")
    rig.send(*(order_cancelled(o) for o in orders[::2]))
    wait_until(lambda: len(rig.emitted("StepCompensated")) == 3 or None, what="three credit notes")

    with rig.engine.connect() as conn:
        numbers = sorted(conn.execute(select(credit_notes.c.number)).scalars())
        invoice_numbers = sorted(conn.execute(select(invoices.c.number)).scalars())
    assert numbers == [1, 2, 3] and invoice_numbers == [1, 2, 3, 4, 5, 6]


# -- email ------------------------------------------------------------------------------------------

def test_email_sends_one_cancellation_mail_and_no_confirmation_after_it(service_rig, tmp_path):
    with SmtpSink(tmp_path / "mail") as sink:
        mailer = SmtpMailer("127.0.0.1", sink.port)
        rig = service_rig(EMAIL, deps=EmailDeps(mailer, "orders@example.com"),
                          controls=WorkerControls(breaker=None, concurrency=4))
        confirmed, early = new_order_id("confirmed"), new_order_id("early")
        rig.send(order_created(confirmed, {"SKU-1": 1}))
        wait_until(lambda: rig.emitted("ConfirmationEmailSent", confirmed) or None, what="the confirmation")
        rig.send(order_cancelled(confirmed), order_cancelled(early))
        rig.compensation(confirmed)
        rig.compensation(early)
        rig.send(order_created(early, {"SKU-1": 1}))
        wait_until(lambda: "OrderCreated" in rig.runs_of(early) or None, what="the early order's create")
        mails = read_maildir(sink.maildir)

    subjects = sorted((m["To"], m["Subject"]) for m in mails)
    assert subjects == sorted([
        (f"{confirmed}@example.com", f"Your order {confirmed}"),
        (f"{confirmed}@example.com", f"Your order {confirmed} is cancelled"),
        (f"{early}@example.com", f"Your order {early} is cancelled"),
    ])
    assert "changed my mind" in next(m for m in mails if m["Subject"].endswith("cancelled")).get_content()
    assert rig.emitted("ConfirmationEmailSent", early) == []
    assert rig.compensation(confirmed)["action"].startswith("cancellation mail <")


# -- analytics ---------------------------------------------------------------------------------------

def test_analytics_takes_a_cancelled_order_out_of_its_rollups_exactly(service_rig):
    rig = service_rig(ANALYTICS)
    kept, cancelled, early = new_order_id("kept"), new_order_id("cancelled"), new_order_id("early")
    rig.send(order_created(kept, {"SKU-1": 2, "SKU-2": 1}, price="3.10"),
             order_created(cancelled, {"SKU-1": 5}, price="3.10"))
    wait_until(lambda: len(rig.emitted("OrderRecorded")) == 2 or None, what="two orders recorded")
    rig.send(order_cancelled(cancelled), order_cancelled(early))
    assert rig.compensation(cancelled)["action"].startswith("took 1 order, 5 units and 15.50 EUR out of")
    assert rig.compensation(early)["action"] == "the order was not counted: nothing to take out"
    rig.send(order_created(early, {"SKU-2": 9}))
    wait_until(lambda: "OrderCreated" in rig.runs_of(early) or None, what="the early order's create")

    with rig.engine.connect() as conn:
        minutes = conn.execute(select(func.sum(per_minute.c.orders), func.sum(per_minute.c.units),
                                      func.sum(per_minute.c.revenue))).one()
        skus = {r.sku: (r.orders, r.units, r.revenue) for r in conn.execute(select(per_sku))}
    assert (minutes[0], minutes[1], Decimal(minutes[2])) == (1, 3, Decimal("9.30"))
    assert skus == {"SKU-1": (1, 2, Decimal("6.20")), "SKU-2": (1, 1, Decimal("3.10"))}


# -- the property: each order's effects in the order its events were accepted -------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_fault_schedules_keep_each_orders_effects_in_accepted_order(service_rig, seed):
    """Random orders, some cancelled right after being placed; every attempt of every event may
    fail (retryable) as the seed's schedule says, at most as often as the retry chain allows. Each
    order's effects must happen in the order its events were accepted: never a create's effect
    after its cancel's (the create of an order whose cancel was read first has none at all), the
    cancel's exactly once; and the stock must end exactly as the orders that stayed placed
    reserved it."""
    rng = random.Random(seed)
    orders = {new_order_id(f"p{seed}"): (rng.randint(1, 3), rng.random() < 0.5) for _ in range(12)}
    schedule = {(order_id, kind): rng.choice([0, 0, 1, 2]) for order_id in orders
                for kind in ("OrderCreated", "OrderCancelled")}

    def scheduled(event: Event, tried: int) -> None:
        if tried < schedule[(event.order_id, event.event_type())]:
            raise RetryableError(f"scheduled failure {tried + 1} of {event.event_type()}")

    rig = inventory(service_rig, fault=scheduled, retry_delays_s=(0.2, 0.2),
                    controls=WorkerControls(breaker=None, concurrency=rng.choice([1, 4])))
    for order_id, (quantity, cancel) in orders.items():
        rig.send(order_created(order_id, {"SKU-1": quantity}), *([order_cancelled(order_id)] if cancel else []))

    def settled() -> bool:
        return all(len(rig.runs_of(o)) == (2 if cancel else 1) for o, (_, cancel) in orders.items())

    wait_until(lambda: settled() or None, timeout=120, what="every order's events handled")
    wait_until(lambda: rig.held() == (0, 0) or None, what="no key held")

    for order_id, (_, cancel) in orders.items():
        effects = rig.effects_of(order_id)
        if cancel:
            assert effects in (["OrderCreated", "OrderCancelled"], ["OrderCancelled"]), (order_id, effects)
        else:
            assert effects == ["OrderCreated"], (order_id, effects)
    kept = sum(quantity for quantity, cancel in orders.values() if not cancel)
    assert levels(rig)["SKU-1"] == (STOCK - kept, kept)
    assert reserved_orders(rig) == {o for o, (_, cancel) in orders.items() if not cancel}
    assert read_topic(rig.bootstrap, rig.group.dlt_topic(rig.topic["orders.created"])) == []
