"""Analytics: per-minute and per-SKU rollups of orders, units and revenue."""

from __future__ import annotations

from services.analytics.tables import per_minute, per_sku
from services.runtime.consumer import UnitOfWork
from services.runtime.db import upsert_add
from services.runtime.events import Event, OrderCreated, OrderRecorded


def record_order(event: OrderCreated, uow: UnitOfWork) -> list[Event]:
    units = sum(line.quantity for line in event.lines)
    minute = event.created_at.strftime("%Y-%m-%dT%H:%M")
    upsert_add(uow.conn, per_minute, {"minute": minute, "currency": event.currency},
               {"orders": 1, "units": units, "revenue": event.total})
    for line in event.lines:
        upsert_add(uow.conn, per_sku, {"sku": line.sku, "currency": event.currency},
                   {"orders": 1, "units": line.quantity, "revenue": line.quantity * line.unit_price})
    return [OrderRecorded(order_id=event.order_id, units=units, revenue=event.total, currency=event.currency,
                          recorded_at=uow.now)]


HANDLERS = {OrderCreated: [record_order]}
