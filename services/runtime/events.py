"""Python types for the events that cross Kafka.

The `.avsc` files in `schemas/` are the contract; these models mirror them so handlers get
typed, validated objects. `tests/unit/test_events_match_schemas.py` fails when a model and its
latest schema drift apart, so neither can change alone.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


class Event(BaseModel):
    """Base of every event. `schema_version` is the version this code writes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: ClassVar[int] = 1

    order_id: str

    @classmethod
    def event_type(cls) -> str:
        return cls.__name__


class OrderLine(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sku: str
    quantity: int = Field(gt=0)
    unit_price: Decimal


class OrderCreated(Event):
    schema_version: ClassVar[int] = 2

    customer_id: str
    customer_email: str
    currency: str
    lines: list[OrderLine]
    total: Decimal
    created_at: datetime
    channel: str | None = None  # v2: where the order was placed, e.g. web, app


class ReservedLine(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sku: str
    quantity: int


class StockReserved(Event):
    lines: list[ReservedLine]
    reserved_at: datetime


class MissingStock(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sku: str
    requested: int
    available: int


class StockRejected(Event):
    reason: str
    missing: list[MissingStock]
    rejected_at: datetime


class ConfirmationEmailSent(Event):
    message_id: str
    recipient: str
    sent_at: datetime


class InvoiceIssued(Event):
    invoice_number: str
    total: Decimal
    currency: str
    pdf_path: str
    issued_at: datetime


class OrderRecorded(Event):
    units: int
    revenue: Decimal
    currency: str
    recorded_at: datetime


class OrderCancelled(Event):
    customer_id: str
    customer_email: str  # the cancellation mail's recipient: the cancel may be read before the order
    reason: str | None = None
    cancelled_at: datetime


class StepCompensated(Event):
    """A service undid its part of a cancelled order (each service emits one per cancelled order)."""

    step: str
    action: str
    document: str | None = None  # what it issued: a credit note's number, a cancellation mail's Message-ID
    compensated_at: datetime


# Every event type by name; a service's own ones join it when its declaration registers them
# (services/runtime/contracts.py).
EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (OrderCreated, StockReserved, StockRejected, ConfirmationEmailSent, InvoiceIssued, OrderRecorded,
                OrderCancelled, StepCompensated)
}

# Consumers read every event as the schema version their model was built on (Avro resolution),
# so a producer moving to a newer compatible version does not break them.
READER_VERSIONS: dict[str, int] = {name: cls.schema_version for name, cls in EVENT_TYPES.items()}
