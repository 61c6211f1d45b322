"""Invoice: waits for the stock decision, then issues one PDF invoice per reserved order; a
cancelled order's invoice is credited by a credit note (PDF, numbered on its own)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.engine import Connection

from services.invoice.pdf import InvoiceDocument, InvoiceLine, render_invoice
from services.invoice.tables import cancelled_orders, credit_note_counter, credit_notes, invoice_counter, invoices, orders
from services.runtime.cancellation import compensated, is_cancelled
from services.runtime.db import insert_ignore
from services.runtime.events import Event, InvoiceIssued, OrderCancelled, OrderCreated, StockRejected, StockReserved
from services.runtime.handler import UnitOfWork


@dataclass(frozen=True)
class InvoiceDeps:
    invoice_dir: Path


# Statements built once and executed with parameters (building them per call cost more than
# running them).
_ORDER_ID = bindparam("key_order_id")
_SET_ORDER = update(orders).where(orders.c.order_id == _ORDER_ID)
_ORDER_STATE = select(orders.c.order, orders.c.stock).where(orders.c.order_id == _ORDER_ID)
_INVOICE_OF = select(invoices.c.number).where(invoices.c.order_id == _ORDER_ID)
_INVOICED = select(invoices.c.number, invoices.c.total, invoices.c.currency).where(invoices.c.order_id == _ORDER_ID)
_ADD_INVOICE = invoices.insert()


def _bump(counter: Table):
    return (update(counter).where(counter.c.id == 1).values(last_number=counter.c.last_number + 1)
            .returning(counter.c.last_number))


_BUMP_COUNTER = {invoice_counter: _bump(invoice_counter), credit_note_counter: _bump(credit_note_counter)}


def remember_order(event: OrderCreated, uow: UnitOfWork) -> list[Event]:
    _ensure_order_row(uow.conn, event.order_id)
    uow.conn.execute(_SET_ORDER, {"key_order_id": event.order_id, "order": event.model_dump(mode="json")})
    return _issue_if_ready(uow, event.order_id)


def stock_reserved(event: StockReserved, uow: UnitOfWork) -> list[Event]:
    return _record_stock(uow, event.order_id, "reserved")


def stock_rejected(event: StockRejected, uow: UnitOfWork) -> list[Event]:
    return _record_stock(uow, event.order_id, "rejected")


def _record_stock(uow: UnitOfWork, order_id: str, decision: str) -> list[Event]:
    _ensure_order_row(uow.conn, order_id)
    uow.conn.execute(_SET_ORDER, {"key_order_id": order_id, "stock": decision})
    return _issue_if_ready(uow, order_id)


def _ensure_order_row(conn: Connection, order_id: str) -> None:
    insert_ignore(conn, orders, {"order_id": order_id, "order": None, "stock": None})


def _issue_if_ready(uow: UnitOfWork, order_id: str) -> list[Event]:
    if is_cancelled(uow, cancelled_orders, order_id):
        return []  # cancelled before it could be invoiced: it never will be
    row = uow.conn.execute(_ORDER_STATE, {"key_order_id": order_id}).one()
    if row.order is None or row.stock != "reserved":
        return []
    if uow.conn.execute(_INVOICE_OF, {"key_order_id": order_id}).first():
        return []
    order = OrderCreated.model_validate(row.order)
    number = _next_number(uow.conn, invoice_counter)
    label = f"INV-{number:06d}"
    relative = f"{label}.pdf"
    doc = InvoiceDocument(number=label, order_id=order.order_id, customer_id=order.customer_id,
                          customer_email=order.customer_email, currency=order.currency,
                          lines=[InvoiceLine(line.sku, line.quantity, line.unit_price) for line in order.lines],
                          issued_at=uow.now)
    # Written before the commit: if the transaction rolls back, the number is given back and the
    # next invoice overwrites this file, so no file exists without its row for long.
    render_invoice(doc, uow.deps.invoice_dir / relative)
    uow.conn.execute(_ADD_INVOICE, {"number": number, "order_id": order_id, "total": doc.total,
                                    "currency": order.currency, "pdf_path": relative, "issued_at": uow.now})
    return [InvoiceIssued(order_id=order_id, invoice_number=label, total=doc.total, currency=order.currency,
                          pdf_path=relative, issued_at=uow.now)]


def credit_invoice(event: OrderCancelled, uow: UnitOfWork) -> list[Event]:
    """A credit note for the order's invoice, if it was invoiced; none otherwise (and then no
    invoice is issued later: `_issue_if_ready` sees the cancellation)."""
    if is_cancelled(uow, cancelled_orders, event.order_id):
        return []
    invoice = uow.conn.execute(_INVOICED, {"key_order_id": event.order_id}).first()
    if invoice is None:
        return compensated(uow, cancelled_orders, event.order_id, "no invoice was issued: nothing to credit")
    order = OrderCreated.model_validate(uow.conn.execute(_ORDER_STATE, {"key_order_id": event.order_id}).one().order)
    number = _next_number(uow.conn, credit_note_counter)
    label, credited = f"CN-{number:06d}", f"INV-{invoice.number:06d}"
    relative = f"{label}.pdf"
    doc = InvoiceDocument(number=label, order_id=order.order_id, customer_id=order.customer_id,
                          customer_email=order.customer_email, currency=order.currency,
                          lines=[InvoiceLine(line.sku, line.quantity, line.unit_price) for line in order.lines],
                          issued_at=uow.now, kind="Credit note", credits=credited)
    render_invoice(doc, uow.deps.invoice_dir / relative)  # before the commit, as an invoice's (above)
    uow.conn.execute(credit_notes.insert(), {"number": number, "order_id": event.order_id,
                                             "invoice_number": invoice.number, "total": invoice.total,
                                             "currency": invoice.currency, "pdf_path": relative,
                                             "issued_at": uow.now})
    return compensated(uow, cancelled_orders, event.order_id,
                       f"credit note {label} for invoice {credited} ({invoice.total} {invoice.currency})",
                       document=label)


def _next_number(conn: Connection, counter: Table) -> int:
    # The UPDATE takes the row lock (PostgreSQL) or the write lock (SQLite, BEGIN IMMEDIATE)
    # until commit, so concurrent issuers serialize and numbers stay gapless.
    insert_ignore(conn, counter, {"id": 1, "last_number": 0})
    return conn.execute(_BUMP_COUNTER[counter]).scalar_one()


HANDLERS = {
    OrderCreated: [remember_order],
    StockReserved: [stock_reserved],
    StockRejected: [stock_rejected],
    OrderCancelled: [credit_invoice],
}
