"""Invoice: waits for the stock decision, then issues one PDF invoice per reserved order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from services.invoice.pdf import InvoiceDocument, InvoiceLine, render_invoice
from services.invoice.tables import invoice_counter, invoices, orders
from services.runtime.db import insert_ignore
from services.runtime.events import Event, InvoiceIssued, OrderCreated, StockRejected, StockReserved
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
_BUMP_COUNTER = (update(invoice_counter).where(invoice_counter.c.id == 1)
                 .values(last_number=invoice_counter.c.last_number + 1)
                 .returning(invoice_counter.c.last_number))
_ADD_INVOICE = invoices.insert()


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
    row = uow.conn.execute(_ORDER_STATE, {"key_order_id": order_id}).one()
    if row.order is None or row.stock != "reserved":
        return []
    if uow.conn.execute(_INVOICE_OF, {"key_order_id": order_id}).first():
        return []
    order = OrderCreated.model_validate(row.order)
    number = _next_invoice_number(uow.conn)
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


def _next_invoice_number(conn: Connection) -> int:
    # The UPDATE takes the row lock (PostgreSQL) or the write lock (SQLite, BEGIN IMMEDIATE)
    # until commit, so concurrent issuers serialize and numbers stay gapless.
    insert_ignore(conn, invoice_counter, {"id": 1, "last_number": 0})
    return conn.execute(_BUMP_COUNTER).scalar_one()


HANDLERS = {
    OrderCreated: [remember_order],
    StockReserved: [stock_reserved],
    StockRejected: [stock_rejected],
}
