"""Cancelling an order: the cancellation row and its OrderCancelled outbox row in ONE transaction.

An order is cancelled at most once: a second cancel finds the first one's row and does nothing
(two cancels at the same moment: the primary key lets one commit; the other reads its row).
The orders service does not know how far the order got downstream, and need not: every consumer
service undoes what it did for the order and skips what it had not done yet (README, Cancelling
an order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from services.orders.tables import cancellations, orders, outbox
from services.runtime.codec import Codec
from services.runtime.db import utcnow
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.events import OrderCancelled
from services.runtime.outbox import add_event


class UnknownOrder(Exception):
    def __init__(self, order_id: str):
        super().__init__(f"order {order_id} not found")


@dataclass(frozen=True)
class Cancellation:
    order_id: str
    reason: str | None
    cancelled_at: datetime
    already: bool  # an earlier request had cancelled it: nothing was done now


def cancel_order(engine: Engine, codec: Codec, order_id: str, reason: str | None,
                 also: Callable[[Connection, Cancellation], None] | None = None) -> Cancellation:
    """Cancel the order (UnknownOrder if there is none). `also` runs in the same transaction
    when this call cancelled it (the Idempotency-Key's answer is stored there)."""
    try:
        return _cancel_once(engine, codec, order_id, reason, also)
    except IntegrityError:
        # Another request cancelled it between our read and our insert; its row is there now.
        with engine.connect() as conn:
            first = _cancellation_of(conn, order_id)
        if first is None:
            raise
        return first


def _cancel_once(engine: Engine, codec: Codec, order_id: str, reason: str | None,
                 also: Callable[[Connection, Cancellation], None] | None) -> Cancellation:
    with engine.begin() as conn:
        order = conn.execute(select(orders.c.customer_id, orders.c.customer_email)
                             .where(orders.c.order_id == order_id)).first()
        if order is None:
            raise UnknownOrder(order_id)
        if (first := _cancellation_of(conn, order_id)) is not None:
            return first
        now = utcnow()
        conn.execute(cancellations.insert().values(order_id=order_id, reason=reason, cancelled_at=now))
        event = OrderCancelled(order_id=order_id, customer_id=order.customer_id, customer_email=order.customer_email,
                               reason=reason, cancelled_at=now)
        add_event(conn, outbox, codec, event, Envelope(
            event_id=new_event_id(), event_type="OrderCancelled", schema_version=OrderCancelled.schema_version,
            correlation_id=order_id))
        cancellation = Cancellation(order_id, reason, now, already=False)
        if also is not None:
            also(conn, cancellation)
        return cancellation


def _cancellation_of(conn: Connection, order_id: str) -> Cancellation | None:
    row = conn.execute(select(cancellations).where(cancellations.c.order_id == order_id)).mappings().first()
    if row is None:
        return None
    return Cancellation(order_id, row["reason"], row["cancelled_at"], already=True)
