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


class BaseEvent(BaseModel):
    """Base of every event. `schema_version` is the version this code writes; `key()` is the
    aggregate id, the outbox row's `aggregateid` and so the Kafka key (what the topic's
    `TopicSpec.key` names), and `aggregate_type` the outbox row's `aggregatetype`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: ClassVar[int] = 1
    aggregate_type: ClassVar[str]

    @classmethod
    def event_type(cls) -> str:
        return cls.__name__

    def key(self) -> str:
        raise NotImplementedError


class Event(BaseEvent):
    """An event about one order, keyed by its order id: every event but inventory's StockAdjusted,
    and what services' own event types (services/runtime/contracts.py) extend.

    `order_id` lives here rather than on BaseEvent so that an event about something else (a SKU)
    need not carry one, while every order event, and every plugin's, keeps it unchanged."""

    aggregate_type: ClassVar[str] = "order"

    order_id: str

    def key(self) -> str:
        return self.order_id


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


class StockAdjusted(BaseEvent):
    """Stock put in by hand (`orderpipe stock add`), from inventory's outbox: about a SKU, not an
    order, so keyed by the SKU (every change of one SKU on one partition, in order)."""

    aggregate_type: ClassVar[str] = "stock"

    sku: str
    delta: int
    available_after: int
    reason: str
    operator: str
    adjusted_at: datetime

    def key(self) -> str:
        return self.sku


# Every event type by name; a service's own ones join it when its declaration registers them
# (services/runtime/contracts.py).
EVENT_TYPES: dict[str, type[BaseEvent]] = {
    cls.__name__: cls
    for cls in (OrderCreated, StockReserved, StockRejected, ConfirmationEmailSent, InvoiceIssued, OrderRecorded,
                OrderCancelled, StepCompensated, StockAdjusted)
}

# Consumers read every event as the schema version their model was built on (Avro resolution),
# so a producer moving to a newer compatible version does not break them.
READER_VERSIONS: dict[str, int] = {name: cls.schema_version for name, cls in EVENT_TYPES.items()}
