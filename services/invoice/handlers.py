"""Invoice: waits for the stock decision, then issues one PDF invoice per reserved order; a
cancelled order's invoice is credited by a credit note (PDF, numbered on its own)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Select, Table, bindparam, select, update
from sqlalchemy.engine import Connection

from services.invoice.pdf import InvoiceDocument, InvoiceLine, render_invoice
from services.invoice.tables import cancelled_orders, credit_note_counter, credit_notes, invoice_counter, invoices, orders
from services.runtime.bulk import BulkInsert
from services.runtime.cancellation import cancelled_among, compensated, is_cancelled
from services.runtime.db import among, insert_ignore
from services.runtime.events import Event, InvoiceIssued, OrderCancelled, OrderCreated, StockRejected, StockReserved
from services.runtime.handler import BatchUnitOfWork, RunNotSetBased, UnitOfWork, batch_form_of


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
    return (update(counter).where(counter.c.id == 1).values(last_number=counter.c.last_number + bindparam("count"))
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
    event, invoice_row = _invoice(uow, OrderCreated.model_validate(row.order), _next_number(uow.conn, invoice_counter))
    uow.conn.execute(_ADD_INVOICE, invoice_row)
    return [event]


def _invoice(uow: UnitOfWork | BatchUnitOfWork, order: OrderCreated, number: int) -> tuple[InvoiceIssued, dict]:
    """The order's invoice numbered `number`: its PDF written, its event, and its `invoices` row."""
    label = f"INV-{number:06d}"
    relative = f"{label}.pdf"
    doc = InvoiceDocument(number=label, order_id=order.order_id, customer_id=order.customer_id,
                          customer_email=order.customer_email, currency=order.currency,
                          lines=[InvoiceLine(line.sku, line.quantity, line.unit_price) for line in order.lines],
                          issued_at=uow.now)
    # Written before the commit: if the transaction rolls back, the number is given back and the
    # next invoice overwrites this file, so no file exists without its row for long.
    render_invoice(doc, uow.deps.invoice_dir / relative)
    row = {"number": number, "order_id": order.order_id, "total": doc.total, "currency": order.currency,
           "pdf_path": relative, "issued_at": uow.now}
    return InvoiceIssued(order_id=order.order_id, invoice_number=label, total=doc.total, currency=order.currency,
                         pdf_path=relative, issued_at=uow.now), row


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


def _next_number(conn: Connection, counter: Table, count: int = 1) -> int:
    """The first of `count` consecutive numbers of `counter`, taken for this transaction."""
    # The UPDATE takes the row lock (PostgreSQL) or the write lock (SQLite, BEGIN IMMEDIATE)
    # until commit, so concurrent issuers serialize and numbers stay gapless.
    insert_ignore(conn, counter, {"id": 1, "last_number": 0})
    return conn.execute(_BUMP_COUNTER[counter], {"count": count}).scalar_one() - count + 1


# -- batch forms: a run of one event type in a handful of statements (services/runtime/handler.py)

_STORE_ORDERS = BulkInsert(orders, ("order_id", "order"), on_conflict_set=("order",))
_STORE_STOCK = BulkInsert(orders, ("order_id", "stock"), on_conflict_set=("stock",))
_ADD_INVOICES = BulkInsert(invoices, ("number", "order_id", "total", "currency", "pdf_path", "issued_at"))


@functools.cache  # built once per dialect
def _states_of(dialect_name: str) -> Select:
    return (select(orders.c.order_id, orders.c.order, orders.c.stock, invoices.c.number)
            .outerjoin(invoices, invoices.c.order_id == orders.c.order_id)
            .where(among(orders.c.order_id, "ids", dialect_name)))


@batch_form_of(remember_order)
def remember_orders(events: list[OrderCreated], uow: BatchUnitOfWork) -> list[list[Event]]:
    return _store_and_issue(uow, _STORE_ORDERS, [{"order_id": e.order_id, "order": e.model_dump(mode="json")}
                                                 for e in events])


@batch_form_of(stock_reserved)
def stocks_reserved(events: list[StockReserved], uow: BatchUnitOfWork) -> list[list[Event]]:
    return _store_and_issue(uow, _STORE_STOCK, [{"order_id": e.order_id, "stock": "reserved"} for e in events])


@batch_form_of(stock_rejected)
def stocks_rejected(events: list[StockRejected], uow: BatchUnitOfWork) -> list[list[Event]]:
    return _store_and_issue(uow, _STORE_STOCK, [{"order_id": e.order_id, "stock": "rejected"} for e in events])


def _store_and_issue(uow: BatchUnitOfWork, store: BulkInsert, rows: list[dict]) -> list[list[Event]]:
    """What the per-message handlers do for each row's order in turn: store what the event says,
    then `_issue_if_ready`. The orders of a run are distinct (a run naming one twice raises and
    is redone per message), so each order's state after the whole run's writes is the state
    its own event left: the invoices are those the handlers would issue, numbered in run order."""
    order_ids = [row["order_id"] for row in rows]
    if len(set(order_ids)) != len(order_ids):
        raise RunNotSetBased("an order twice in one run: its second event sees its first one's invoice")
    # the rows in key order, then the orders' locks in theirs: instances lock in one order
    store.execute(uow.conn, sorted(rows, key=lambda row: row["order_id"]))
    cancelled = cancelled_among(uow, cancelled_orders, order_ids)
    states = {row.order_id: row for row in uow.conn.execute(_states_of(uow.conn.dialect.name),
                                                               {"ids": sorted(order_ids)})}
    ready = [order_id for order_id in order_ids
             if order_id not in cancelled and states[order_id].order is not None
             and states[order_id].stock == "reserved" and states[order_id].number is None]
    if not ready:
        return [[] for _ in order_ids]
    first = _next_number(uow.conn, invoice_counter, len(ready))
    issued: dict[str, InvoiceIssued] = {}
    added = []
    for number, order_id in enumerate(ready, start=first):
        order = OrderCreated.model_validate(states[order_id].order)
        event, row = _invoice(uow, order, number)
        issued[order_id] = event
        added.append(row)
    _ADD_INVOICES.execute(uow.conn, added)
    return [[issued[order_id]] if order_id in issued else [] for order_id in order_ids]


HANDLERS = {
    OrderCreated: [remember_order],
    StockReserved: [stock_reserved],
    StockRejected: [stock_rejected],
    OrderCancelled: [credit_invoice],
}
