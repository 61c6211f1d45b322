"""Loyalty: a point per unit ordered, per customer, announced as PointsAwarded. Orders for the
customer `customer-broken` fail for good (PermanentError), so the test sees the service's own
dead-letter topic fill."""

from __future__ import annotations

from extra_service.loyalty.events import PointsAwarded
from extra_service.loyalty.tables import points

from services.runtime.db import upsert_add
from services.runtime.errors import PermanentError
from services.runtime.events import Event, OrderCreated
from services.runtime.handler import UnitOfWork


def award_points(event: OrderCreated, uow: UnitOfWork) -> list[Event]:
    if event.customer_id == "customer-broken":
        raise PermanentError("no loyalty account for customer-broken")
    units = sum(line.quantity for line in event.lines)
    upsert_add(uow.conn, points, {"customer_id": event.customer_id}, {"points": units})
    return [PointsAwarded(order_id=event.order_id, customer_id=event.customer_id, points=units, awarded_at=uow.now)]


HANDLERS = {OrderCreated: [award_points]}
