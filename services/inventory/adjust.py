"""Putting stock in by hand (`orderpipe stock add`): in inventory's own database, the stock level,
its audit row (who, from where, why, the level after) and its StockAdjusted event in inventory's
outbox, in one transaction, so no change is ever made without its record and its event. The
inventory process's relay publishes the event to stock.adjusted (key: the SKU); while inventory
is not running it waits in the outbox. A SKU inventory has never seen is created."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from services.inventory.tables import outbox, stock, stock_adjustments
from services.runtime.codec import Codec
from services.runtime.db import utcnow
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.events import StockAdjusted
from services.runtime.outbox import add_event

MAX_ADD = 1_000_000_000  # fits the Integer column with room for what is there already


@dataclass(frozen=True)
class Adjustment:
    sku: str
    delta: int
    available_after: int
    reason: str
    operator: str
    host: str
    adjusted_at: datetime


def add_stock(engine: Engine, sku: str, quantity: int, *, reason: str, operator: str, host: str,
              codec: Codec) -> Adjustment:
    """`codec` encodes the StockAdjusted as the inventory process would (codec_from_settings)."""
    if not 1 <= quantity <= MAX_ADD:
        raise ValueError(f"quantity must be between 1 and {MAX_ADD:,}")
    for attempt in range(2):
        try:
            with engine.begin() as conn:
                now = utcnow()
                grown = conn.execute(update(stock).where(stock.c.sku == sku)
                                     .values(available=stock.c.available + quantity))
                if grown.rowcount == 0:  # a new SKU
                    conn.execute(stock.insert().values(sku=sku, available=quantity, reserved=0))
                available = conn.execute(select(stock.c.available).where(stock.c.sku == sku)).scalar_one()
                event = StockAdjusted(sku=sku, delta=quantity, available_after=available, reason=reason,
                                      operator=operator, adjusted_at=now)
                envelope = Envelope(new_event_id(), event.event_type(), event.schema_version, correlation_id=sku)
                adjustment = Adjustment(sku, quantity, available, reason, operator, host, now)
                conn.execute(stock_adjustments.insert().values(
                    sku=sku, delta=quantity, available_after=available, reason=reason, operator=operator,
                    host=host, adjusted_at=now))
                add_event(conn, outbox, codec, event, envelope)
            return adjustment
        except IntegrityError:  # another add created the same new SKU first: now it is an update
            if attempt:
                raise
    raise AssertionError("unreachable")


def stock_levels(engine: Engine, sku: str | None = None) -> list[dict]:
    query = select(stock).order_by(stock.c.sku)
    if sku is not None:
        query = query.where(stock.c.sku == sku)
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def adjustments(engine: Engine, sku: str | None = None, limit: int = 50) -> list[dict]:
    """The latest `limit` adjustments, oldest first."""
    query = select(stock_adjustments).order_by(stock_adjustments.c.id.desc()).limit(limit)
    if sku is not None:
        query = query.where(stock_adjustments.c.sku == sku)
    with engine.connect() as conn:
        return [dict(row) for row in reversed(conn.execute(query).mappings().all())]
