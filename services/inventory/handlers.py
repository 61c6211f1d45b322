"""Inventory: reserve every line of an order, or reject the order whole."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import bindparam, select, update

from services.inventory.tables import reservations, stock
from services.runtime.events import Event, MissingStock, OrderCreated, ReservedLine, StockRejected, StockReserved
from services.runtime.handler import UnitOfWork


# Built once and executed with parameters: building statements per call cost more than running them.
_AVAILABLE = select(stock.c.sku, stock.c.available).where(stock.c.sku.in_(bindparam("skus", expanding=True)))
_AVAILABLE_LOCKED = _AVAILABLE.with_for_update()  # PostgreSQL: two instances of the group may touch the same SKUs
_TAKE = (update(stock).where(stock.c.sku == bindparam("line_sku"))
         .values(available=stock.c.available - bindparam("qty"), reserved=stock.c.reserved + bindparam("qty")))
_RESERVE = reservations.insert()


def reserve_stock(event: OrderCreated, uow: UnitOfWork) -> list[Event]:
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


HANDLERS = {OrderCreated: [reserve_stock]}
