"""Inventory: reserve every line of an order, or reject the order whole; give a cancelled
order's stock back."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import bindparam, delete, select, update

from services.inventory.tables import cancelled_orders, reservations, stock
from services.runtime.bulk import BulkInsert
from services.runtime.cancellation import cancelled_among, compensated, is_cancelled
from services.runtime.events import (
    Event, MissingStock, OrderCancelled, OrderCreated, ReservedLine, StockRejected, StockReserved,
)
from services.runtime.handler import BatchUnitOfWork, UnitOfWork, batch_form_of


# Built once and executed with parameters: building statements per call cost more than running them.
_AVAILABLE = select(stock.c.sku, stock.c.available).where(stock.c.sku.in_(bindparam("skus", expanding=True)))
_AVAILABLE_LOCKED = _AVAILABLE.with_for_update()  # PostgreSQL: two instances of the group may touch the same SKUs
_TAKE = (update(stock).where(stock.c.sku == bindparam("line_sku"))
         .values(available=stock.c.available - bindparam("qty"), reserved=stock.c.reserved + bindparam("qty")))
_RESERVE = reservations.insert()
_RESERVED_FOR = (select(reservations.c.sku, reservations.c.quantity)
                 .where(reservations.c.order_id == bindparam("order_id")).order_by(reservations.c.sku))
_GIVE_BACK = (update(stock).where(stock.c.sku == bindparam("line_sku"))
              .values(available=stock.c.available + bindparam("qty"), reserved=stock.c.reserved - bindparam("qty")))
_FORGET_RESERVATIONS = delete(reservations).where(reservations.c.order_id == bindparam("order_id"))
# A run's statements (reserve_stocks): every SKU's total taken in one statement, every
# reservation in one. A reservation that exists already fails the insert, as in reserve_stock.
_AVAILABLE_LOCKED_IN_ORDER = _AVAILABLE_LOCKED.order_by(stock.c.sku)  # one lock order across instances
_TAKE_ALL_POSTGRESQL = ("UPDATE stock SET available = stock.available - t.qty, reserved = stock.reserved + t.qty "
                        "FROM unnest(%b::varchar[], %b::integer[]) AS t(sku, qty) WHERE stock.sku = t.sku")
_TAKE_ALL_SQLITE = "UPDATE stock SET available = available - ?, reserved = reserved + ? WHERE sku = ?"
_RESERVE_ALL = BulkInsert(reservations, ("order_id", "sku", "quantity", "reserved_at"))


def reserve_stock(event: OrderCreated, uow: UnitOfWork) -> list[Event]:
    if is_cancelled(uow, cancelled_orders, event.order_id):
        return []  # the cancellation came first: nothing is reserved, nothing to give back later
    wanted = Counter()
    for line in event.lines:
        wanted[line.sku] += line.quantity
    query = _AVAILABLE_LOCKED if uow.conn.dialect.name == "postgresql" else _AVAILABLE
    available = dict(uow.conn.execute(query, {"skus": list(wanted)}).all())
    missing = [MissingStock(sku=sku, requested=qty, available=available.get(sku, 0))
               for sku, qty in sorted(wanted.items()) if available.get(sku, 0) < qty]
    if missing:
        reason = "out of stock: " + ", ".join(
            f"{m.sku} (requested {m.requested}, available {m.available})" for m in missing)
        return [StockRejected(order_id=event.order_id, reason=reason, missing=missing, rejected_at=uow.now)]
    taken = sorted(wanted.items())  # sorted: a stable lock order across instances
    if taken:  # an executemany with no rows would run the statement once, without parameters
        uow.conn.execute(_TAKE, [{"line_sku": sku, "qty": qty} for sku, qty in taken])
        uow.conn.execute(_RESERVE, [{"order_id": event.order_id, "sku": sku, "quantity": qty,
                                     "reserved_at": uow.now} for sku, qty in taken])
    lines = [ReservedLine(sku=sku, quantity=qty) for sku, qty in sorted(wanted.items())]
    return [StockReserved(order_id=event.order_id, lines=lines, reserved_at=uow.now)]


@batch_form_of(reserve_stock)
def reserve_stocks(events: list[OrderCreated], uow: BatchUnitOfWork) -> list[list[Event]]:
    """`reserve_stock` for a run of orders, in a handful of statements: each order, in turn,
    reserves only if every line is available after the orders before it."""
    cancelled = cancelled_among(uow, cancelled_orders, (e.order_id for e in events))
    wanted_by_order: list[Counter | None] = []  # None: cancelled, nothing to do
    for event in events:
        if event.order_id in cancelled:
            wanted_by_order.append(None)
            continue
        wanted = Counter()
        for line in event.lines:
            wanted[line.sku] += line.quantity
        wanted_by_order.append(wanted)
    skus = sorted({sku for wanted in wanted_by_order if wanted for sku in wanted})
    query = _AVAILABLE_LOCKED_IN_ORDER if uow.conn.dialect.name == "postgresql" else _AVAILABLE
    available = dict(uow.conn.execute(query, {"skus": skus}).all()) if skus else {}
    taken_by_sku: Counter = Counter()
    reserved_rows: list[dict] = []
    outputs: list[list[Event]] = []
    for event, wanted in zip(events, wanted_by_order):
        if wanted is None:
            outputs.append([])
            continue
        missing = [MissingStock(sku=sku, requested=qty, available=available.get(sku, 0))
                   for sku, qty in sorted(wanted.items()) if available.get(sku, 0) < qty]
        if missing:
            reason = "out of stock: " + ", ".join(
                f"{m.sku} (requested {m.requested}, available {m.available})" for m in missing)
            outputs.append([StockRejected(order_id=event.order_id, reason=reason, missing=missing,
                                          rejected_at=uow.now)])
            continue
        for sku, qty in sorted(wanted.items()):
            available[sku] = available.get(sku, 0) - qty
            taken_by_sku[sku] += qty
            reserved_rows.append({"order_id": event.order_id, "sku": sku, "quantity": qty, "reserved_at": uow.now})
        lines = [ReservedLine(sku=sku, quantity=qty) for sku, qty in sorted(wanted.items())]
        outputs.append([StockReserved(order_id=event.order_id, lines=lines, reserved_at=uow.now)])
    if taken_by_sku:
        taken = sorted(taken_by_sku.items())
        if uow.conn.dialect.name == "postgresql":
            uow.conn.exec_driver_sql(_TAKE_ALL_POSTGRESQL, ([sku for sku, _ in taken], [qty for _, qty in taken]))
        else:
            uow.conn.exec_driver_sql(_TAKE_ALL_SQLITE, [(qty, qty, sku) for sku, qty in taken])
        _RESERVE_ALL.execute(uow.conn, reserved_rows)
    return outputs


def release_stock(event: OrderCancelled, uow: UnitOfWork) -> list[Event]:
    """Give back what the order reserved (nothing if it was rejected or not seen yet: then its
    OrderCreated, when it comes, reserves nothing)."""
    if is_cancelled(uow, cancelled_orders, event.order_id):
        return []
    query = _RESERVED_FOR.with_for_update() if uow.conn.dialect.name == "postgresql" else _RESERVED_FOR
    reserved = uow.conn.execute(query, {"order_id": event.order_id}).all()
    if reserved:
        uow.conn.execute(_GIVE_BACK, [{"line_sku": sku, "qty": qty} for sku, qty in reserved])
        uow.conn.execute(_FORGET_RESERVATIONS, {"order_id": event.order_id})
        action = "released " + ", ".join(f"{qty} x {sku}" for sku, qty in reserved)
    else:
        action = "nothing was reserved: nothing to release"
    return compensated(uow, cancelled_orders, event.order_id, action)


HANDLERS = {OrderCreated: [reserve_stock], OrderCancelled: [release_stock]}
