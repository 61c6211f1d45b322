"""Inventory: reserve every line of an order, or reject the order whole."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import select, update

from services.inventory.tables import reservations, stock
from services.runtime.consumer import UnitOfWork
from services.runtime.events import Event, MissingStock, OrderCreated, ReservedLine, StockRejected, StockReserved


def reserve_stock(event: OrderCreated, uow: UnitOfWork) -> list[Event]:
    wanted = Counter()
    for line in event.lines:
        wanted[line.sku] += line.quantity
    query = select(stock.c.sku, stock.c.available).where(stock.c.sku.in_(wanted))
    if uow.conn.dialect.name == "postgresql":
        query = query.with_for_update()  # two instances of the group may touch the same SKUs
    available = dict(uow.conn.execute(query).all())
    missing = [MissingStock(sku=sku, requested=qty, available=available.get(sku, 0))
               for sku, qty in sorted(wanted.items()) if available.get(sku, 0) < qty]
    if missing:
        reason = "out of stock: " + ", ".join(
            f"{m.sku} (requested {m.requested}, available {m.available})" for m in missing)
        return [StockRejected(order_id=event.order_id, reason=reason, missing=missing, rejected_at=uow.now)]
    for sku, qty in sorted(wanted.items()):  # sorted: a stable lock order across instances
        uow.conn.execute(update(stock).where(stock.c.sku == sku)
                         .values(available=stock.c.available - qty, reserved=stock.c.reserved + qty))
        uow.conn.execute(reservations.insert().values(order_id=event.order_id, sku=sku, quantity=qty,
                                                      reserved_at=uow.now))
    lines = [ReservedLine(sku=sku, quantity=qty) for sku, qty in sorted(wanted.items())]
    return [StockReserved(order_id=event.order_id, lines=lines, reserved_at=uow.now)]


HANDLERS = {OrderCreated: [reserve_stock]}
