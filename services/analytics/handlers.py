"""Analytics: per-minute and per-SKU rollups of orders, units and revenue."""

from __future__ import annotations

from decimal import Decimal

from services.analytics.tables import per_minute, per_sku
from services.runtime.db import upsert_add
from services.runtime.events import Event, OrderCreated, OrderRecorded
from services.runtime.handler import UnitOfWork


def record_order(event: OrderCreated, uow: UnitOfWork) -> list[Event]:
    units = sum(line.quantity for line in event.lines)
    minute = event.created_at.strftime("%Y-%m-%dT%H:%M")
    upsert_add(uow.conn, per_minute, {"minute": minute, "currency": event.currency},
               {"orders": 1, "units": units, "revenue": event.total})
    per_line: dict[str, tuple[int, Decimal]] = {}
    for line in event.lines:  # an order that lists a SKU twice still counts once for it
        units_so_far, revenue_so_far = per_line.get(line.sku, (0, Decimal(0)))
        per_line[line.sku] = (units_so_far + line.quantity, revenue_so_far + line.quantity * line.unit_price)
    for sku, (sku_units, sku_revenue) in sorted(per_line.items()):
        upsert_add(uow.conn, per_sku, {"sku": sku, "currency": event.currency},
                   {"orders": 1, "units": sku_units, "revenue": sku_revenue})
    return [OrderRecorded(order_id=event.order_id, units=units, revenue=event.total, currency=event.currency,
                          recorded_at=uow.now)]


HANDLERS = {OrderCreated: [record_order]}
