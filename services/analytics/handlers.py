"""Analytics: per-minute and per-SKU rollups of orders, units and revenue; a cancelled order is
taken out of them again."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import delete, select

from services.analytics.tables import cancelled_orders, per_minute, per_sku, recorded_orders
from services.runtime.cancellation import compensated, is_cancelled
from services.runtime.db import upsert_add
from services.runtime.events import Event, OrderCancelled, OrderCreated, OrderRecorded
from services.runtime.handler import UnitOfWork


def record_order(event: OrderCreated, uow: UnitOfWork) -> list[Event]:
    if is_cancelled(uow, cancelled_orders, event.order_id):
        return []  # cancelled before it was counted: it never will be
    units = sum(line.quantity for line in event.lines)
    minute = event.created_at.strftime("%Y-%m-%dT%H:%M")
    per_line: dict[str, tuple[int, Decimal]] = {}
    for line in event.lines:  # an order that lists a SKU twice still counts once for it
        units_so_far, revenue_so_far = per_line.get(line.sku, (0, Decimal(0)))
        per_line[line.sku] = (units_so_far + line.quantity, revenue_so_far + line.quantity * line.unit_price)
    _add(uow, minute, event.currency, units, event.total, per_line, sign=1)
    uow.conn.execute(recorded_orders.insert().values(
        order_id=event.order_id, minute=minute, currency=event.currency, units=units, revenue=event.total,
        per_sku={sku: [u, str(r)] for sku, (u, r) in per_line.items()}))
    return [OrderRecorded(order_id=event.order_id, units=units, revenue=event.total, currency=event.currency,
                          recorded_at=uow.now)]


def take_out_cancelled(event: OrderCancelled, uow: UnitOfWork) -> list[Event]:
    """Subtract exactly what the order added to the rollups (nothing if it was not counted yet:
    then it never will be)."""
    if is_cancelled(uow, cancelled_orders, event.order_id):
        return []
    row = uow.conn.execute(select(recorded_orders).where(recorded_orders.c.order_id == event.order_id)).mappings().first()
    if row is None:
        return compensated(uow, cancelled_orders, event.order_id, "the order was not counted: nothing to take out")
    per_line = {sku: (units, Decimal(revenue)) for sku, (units, revenue) in row["per_sku"].items()}
    _add(uow, row["minute"], row["currency"], row["units"], row["revenue"], per_line, sign=-1)
    uow.conn.execute(delete(recorded_orders).where(recorded_orders.c.order_id == event.order_id))
    return compensated(uow, cancelled_orders, event.order_id,
                       f"took 1 order, {row['units']} units and {row['revenue']} {row['currency']} out of the "
                       f"rollups of {row['minute']}")


def _add(uow: UnitOfWork, minute: str, currency: str, units: int, revenue: Decimal,
         per_line: dict[str, tuple[int, Decimal]], sign: int) -> None:
    upsert_add(uow.conn, per_minute, {"minute": minute, "currency": currency},
               {"orders": sign, "units": sign * units, "revenue": sign * revenue})
    for sku, (sku_units, sku_revenue) in sorted(per_line.items()):
        upsert_add(uow.conn, per_sku, {"sku": sku, "currency": currency},
                   {"orders": sign, "units": sign * sku_units, "revenue": sign * sku_revenue})


HANDLERS = {OrderCreated: [record_order], OrderCancelled: [take_out_cancelled]}
