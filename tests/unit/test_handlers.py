"""The services' handlers as plain functions, on a real SQLite database (no broker).

Each handler runs in a transaction with a `UnitOfWork`, as the consumer runtime runs it;
the assertions are on outcomes: stock levels, mails sent, invoices and their PDFs, rollups.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import MetaData, select

from services.analytics import handlers as analytics
from services.analytics.tables import metadata as analytics_metadata
from services.analytics.tables import per_minute, per_sku
from services.email import handlers as email
from services.email.mailer import MailDeliveryError, RecordingMailer, message_id_for
from services.email.tables import metadata as email_metadata
from services.email.tables import sent_emails
from services.inventory import handlers as inventory
from services.inventory.tables import metadata as inventory_metadata
from services.inventory.tables import reservations, stock
from services.invoice import handlers as invoice
from services.invoice.tables import invoices
from services.invoice.tables import metadata as invoice_metadata
from services.runtime.db import make_engine
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.events import (
    ConfirmationEmailSent,
    InvoiceIssued,
    MissingStock,
    OrderCreated,
    OrderLine,
    OrderRecorded,
    ReservedLine,
    StockRejected,
    StockReserved,
)
from services.runtime.handler import UnitOfWork

NOW = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)


def order(*lines: tuple[str, int, str], order_id: str | None = None, created_at: datetime = NOW,
          currency: str = "EUR") -> OrderCreated:
    order_lines = [OrderLine(sku=sku, quantity=qty, unit_price=Decimal(price)) for sku, qty, price in lines]
    return OrderCreated(
        order_id=order_id or str(uuid.uuid4()), customer_id="cust-1", customer_email="ada@example.com",
        currency=currency, lines=order_lines, total=sum((l.quantity * l.unit_price for l in order_lines), Decimal("0")),
        created_at=created_at,
    )


def handle(engine, handler, event, deps=None, event_id: str | None = None):
    """Run one handler in one transaction, the way the consumer does; return (events, envelope)."""
    envelope = Envelope(event_id=event_id or new_event_id(), event_type=event.event_type(),
                        schema_version=event.schema_version, correlation_id=event.order_id)
    with engine.begin() as conn:
        out = list(handler(event, UnitOfWork(conn, envelope, "test", deps, now=NOW)) or ())
    return out, envelope


@pytest.fixture
def db(tmp_path: Path):
    engines = []

    def make(metadata: MetaData):
        engine = make_engine(f"sqlite:///{tmp_path / 'unit.db'}")
        metadata.create_all(engine)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


# -- inventory --------------------------------------------------------------------------------


@pytest.fixture
def inventory_db(db):
    engine = db(inventory_metadata)
    with engine.begin() as conn:
        conn.execute(stock.insert(), [{"sku": "SKU-1", "available": 10, "reserved": 0},
                                      {"sku": "SKU-2", "available": 5, "reserved": 0}])
    return engine


def stock_levels(engine) -> dict[str, tuple[int, int]]:
    with engine.connect() as conn:
        return {r.sku: (r.available, r.reserved) for r in conn.execute(select(stock))}


def test_inventory_reserves_every_line_and_decrements_stock(inventory_db):
    event = order(("SKU-1", 3, "2.00"), ("SKU-2", 2, "5.00"), ("SKU-1", 1, "2.00"))

    out, _ = handle(inventory_db, inventory.reserve_stock, event)

    assert out == [StockReserved(order_id=event.order_id, reserved_at=NOW,
                                 lines=[ReservedLine(sku="SKU-1", quantity=4), ReservedLine(sku="SKU-2", quantity=2)])]
    assert stock_levels(inventory_db) == {"SKU-1": (6, 4), "SKU-2": (3, 2)}
    with inventory_db.connect() as conn:
        rows = {(r.order_id, r.sku, r.quantity) for r in conn.execute(select(reservations))}
    assert rows == {(event.order_id, "SKU-1", 4), (event.order_id, "SKU-2", 2)}


def test_inventory_can_reserve_the_last_unit(inventory_db):
    out, _ = handle(inventory_db, inventory.reserve_stock, order(("SKU-2", 5, "1.00")))

    assert isinstance(out[0], StockReserved)
    assert stock_levels(inventory_db)["SKU-2"] == (0, 5)


def test_inventory_reserves_an_order_without_lines_as_nothing(inventory_db):
    event = order()

    out, _ = handle(inventory_db, inventory.reserve_stock, event)

    assert out == [StockReserved(order_id=event.order_id, reserved_at=NOW, lines=[])]
    assert stock_levels(inventory_db) == {"SKU-1": (10, 0), "SKU-2": (5, 0)}


def test_inventory_rejects_the_whole_order_when_one_line_is_short(inventory_db):
    event = order(("SKU-1", 3, "2.00"), ("SKU-2", 4, "5.00"), ("SKU-2", 2, "5.00"), ("SKU-NEW", 1, "1.00"))

    out, _ = handle(inventory_db, inventory.reserve_stock, event)

    [rejected] = out
    assert isinstance(rejected, StockRejected)
    assert rejected.missing == [MissingStock(sku="SKU-2", requested=6, available=5),
                                MissingStock(sku="SKU-NEW", requested=1, available=0)]
    assert "SKU-2" in rejected.reason and "SKU-NEW" in rejected.reason and "SKU-1" not in rejected.reason
    # Rejected whole: not even the line that was available is reserved.
    assert stock_levels(inventory_db) == {"SKU-1": (10, 0), "SKU-2": (5, 0)}
    with inventory_db.connect() as conn:
        assert conn.execute(select(reservations)).all() == []


# -- email ------------------------------------------------------------------------------------


def test_email_sends_the_confirmation_with_a_message_id_from_the_event_id(db):
    engine = db(email_metadata)
    mailer = RecordingMailer()
    event = order(("SKU-1", 2, "24.90"))

    out, envelope = handle(engine, email.send_confirmation, event, email.EmailDeps(mailer, "shop@example.com"))

    [mail] = mailer.sent
    assert mail.message_id == message_id_for(envelope.event_id) == f"<{envelope.event_id}@orderpipe.local>"
    assert (mail.sender, mail.recipient) == ("shop@example.com", "ada@example.com")
    assert event.order_id in mail.subject and "2 x SKU-1" in mail.text and "49.80 EUR" in mail.text
    assert out == [ConfirmationEmailSent(order_id=event.order_id, message_id=mail.message_id,
                                         recipient="ada@example.com", sent_at=NOW)]
    with engine.connect() as conn:
        assert conn.execute(select(sent_emails.c.order_id, sent_emails.c.message_id)).all() == [
            (event.order_id, mail.message_id)]


class Crash(Exception):
    """The process dies after the handler ran, before the transaction commits."""


def test_email_resend_after_a_crash_before_commit_keeps_its_message_id(db):
    engine = db(email_metadata)
    mailer = RecordingMailer()
    deps = email.EmailDeps(mailer, "shop@example.com")
    event, event_id = order(("SKU-1", 1, "1.00")), new_event_id()

    def send_then_crash(e, uow):
        email.send_confirmation(e, uow)
        raise Crash

    with pytest.raises(Crash):
        handle(engine, send_then_crash, event, deps, event_id=event_id)
    handle(engine, email.send_confirmation, event, deps, event_id=event_id)  # the redelivery

    # The mail went out twice, recognisably the same message; the database has it once.
    assert [m.message_id for m in mailer.sent] == [message_id_for(event_id)] * 2
    with engine.connect() as conn:
        assert len(conn.execute(select(sent_emails)).all()) == 1


def test_email_failure_writes_nothing(db):
    engine = db(email_metadata)
    mailer = RecordingMailer(fail_times=1)

    with pytest.raises(MailDeliveryError):
        handle(engine, email.send_confirmation, order(("SKU-1", 1, "1.00")), email.EmailDeps(mailer, "s@example.com"))

    assert mailer.sent == []
    with engine.connect() as conn:
        assert conn.execute(select(sent_emails)).all() == []


# -- invoice ----------------------------------------------------------------------------------


@pytest.fixture
def invoice_env(db, tmp_path: Path):
    return db(invoice_metadata), invoice.InvoiceDeps(tmp_path / "invoices")


def reserved(event: OrderCreated) -> StockReserved:
    return StockReserved(order_id=event.order_id, reserved_at=NOW,
                         lines=[ReservedLine(sku=l.sku, quantity=l.quantity) for l in event.lines])


def rejected(event: OrderCreated) -> StockRejected:
    return StockRejected(order_id=event.order_id, reason="out of stock: SKU-9", rejected_at=NOW,
                         missing=[MissingStock(sku="SKU-9", requested=1, available=0)])


def issued_invoices(engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(invoices.c.number, invoices.c.order_id).order_by(invoices.c.number))]


def test_invoice_is_issued_only_once_both_order_and_reservation_are_known(invoice_env):
    engine, deps = invoice_env
    first, second, never = order(("SKU-1", 2, "24.90")), order(("SKU-2", 1, "3.50")), order(("SKU-3", 1, "1.00"))

    # OrderCreated first, then StockReserved
    assert handle(engine, invoice.remember_order, first, deps)[0] == []
    [one] = handle(engine, invoice.stock_reserved, reserved(first), deps)[0]
    # StockReserved first, then OrderCreated
    assert handle(engine, invoice.stock_reserved, reserved(second), deps)[0] == []
    [two] = handle(engine, invoice.remember_order, second, deps)[0]
    # rejected, in either order: never an invoice
    assert handle(engine, invoice.remember_order, never, deps)[0] == []
    assert handle(engine, invoice.stock_rejected, rejected(never), deps)[0] == []
    late = order(("SKU-4", 1, "1.00"))
    assert handle(engine, invoice.stock_rejected, rejected(late), deps)[0] == []
    assert handle(engine, invoice.remember_order, late, deps)[0] == []
    # a third reserved order takes the next number: gapless
    third = order(("SKU-5", 3, "2.00"))
    handle(engine, invoice.remember_order, third, deps)
    [three] = handle(engine, invoice.stock_reserved, reserved(third), deps)[0]

    assert [(e.invoice_number, e.order_id) for e in (one, two, three)] == [
        ("INV-000001", first.order_id), ("INV-000002", second.order_id), ("INV-000003", third.order_id)]
    assert one == InvoiceIssued(order_id=first.order_id, invoice_number="INV-000001", total=Decimal("49.80"),
                                currency="EUR", pdf_path="INV-000001.pdf", issued_at=NOW)
    assert issued_invoices(engine) == [(1, first.order_id), (2, second.order_id), (3, third.order_id)]
    for e in (one, two, three):
        pdf = deps.invoice_dir / e.pdf_path
        assert pdf.read_bytes().startswith(b"%PDF-")
    assert sorted(p.name for p in deps.invoice_dir.glob("*.pdf")) == [
        "INV-000001.pdf", "INV-000002.pdf", "INV-000003.pdf"]


def test_invoice_is_not_issued_twice_for_a_repeated_event(invoice_env):
    engine, deps = invoice_env
    event = order(("SKU-1", 1, "1.00"))
    handle(engine, invoice.remember_order, event, deps)
    handle(engine, invoice.stock_reserved, reserved(event), deps)

    assert handle(engine, invoice.stock_reserved, reserved(event), deps)[0] == []
    assert handle(engine, invoice.remember_order, event, deps)[0] == []
    assert issued_invoices(engine) == [(1, event.order_id)]


def test_invoice_number_of_a_rolled_back_transaction_is_given_back(invoice_env):
    engine, deps = invoice_env
    lost, kept = order(("SKU-1", 1, "1.00")), order(("SKU-2", 1, "2.00"))
    handle(engine, invoice.remember_order, lost, deps)

    def issue_then_crash(event, uow):
        assert invoice.stock_reserved(event, uow)[0].invoice_number == "INV-000001"
        raise Crash

    with pytest.raises(Crash):
        handle(engine, issue_then_crash, reserved(lost), deps)
    handle(engine, invoice.remember_order, kept, deps)
    [issued] = handle(engine, invoice.stock_reserved, reserved(kept), deps)[0]

    assert issued.invoice_number == "INV-000001"
    assert issued_invoices(engine) == [(1, kept.order_id)]


# -- analytics --------------------------------------------------------------------------------


def test_analytics_rolls_up_orders_units_and_revenue_per_minute_and_sku(db):
    engine = db(analytics_metadata)
    a = order(("SKU-1", 2, "10.00"), ("SKU-2", 1, "5.50"), created_at=NOW)
    b = order(("SKU-1", 1, "10.00"), created_at=NOW + timedelta(seconds=5))
    c = order(("SKU-2", 4, "5.50"), created_at=NOW + timedelta(minutes=1))

    outs = [handle(engine, analytics.record_order, e)[0] for e in (a, b, c)]

    assert outs[0] == [OrderRecorded(order_id=a.order_id, units=3, revenue=Decimal("25.50"), currency="EUR",
                                     recorded_at=NOW)]
    with engine.connect() as conn:
        minutes = {r.minute: (r.orders, r.units, r.revenue) for r in conn.execute(select(per_minute))}
        skus = {r.sku: (r.orders, r.units, r.revenue) for r in conn.execute(select(per_sku))}
    assert minutes == {"2026-03-14T09:26": (2, 4, Decimal("35.50")), "2026-03-14T09:27": (1, 4, Decimal("22.00"))}
    assert skus == {"SKU-1": (2, 3, Decimal("30.00")), "SKU-2": (2, 5, Decimal("27.50"))}


def test_analytics_keeps_currencies_apart(db):
    engine = db(analytics_metadata)
    handle(engine, analytics.record_order, order(("SKU-1", 1, "10.00"), currency="EUR"))
    handle(engine, analytics.record_order, order(("SKU-1", 1, "12.00"), currency="USD"))

    with engine.connect() as conn:
        rows = {(r.sku, r.currency): (r.orders, r.revenue) for r in conn.execute(select(per_sku))}
    assert rows == {("SKU-1", "EUR"): (1, Decimal("10.00")), ("SKU-1", "USD"): (1, Decimal("12.00"))}


def test_analytics_counts_an_order_once_per_sku_even_with_repeated_lines(db):
    engine = db(analytics_metadata)
    handle(engine, analytics.record_order, order(("SKU-1", 1, "10.00"), ("SKU-1", 2, "10.00")))

    with engine.connect() as conn:
        assert conn.execute(select(per_sku.c.orders, per_sku.c.units)).all() == [(1, 3)]
