"""Inventory: reserve every line of an order, or reject the order whole; give a cancelled
order's stock back."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import bindparam, delete, select, update

from services.inventory.tables import cancelled_orders, reservations, stock
from services.runtime.cancellation import compensated, is_cancelled
from services.runtime.events import (
    Event, MissingStock, OrderCancelled, OrderCreated, ReservedLine, StockRejected, StockReserved,
)
from services.runtime.handler import UnitOfWork


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
