"""An order's status, folded from its events by one pure function: `next_status`.

The Faust agent only decodes, calls `next_status` and stores the result; everything that
decides what a status *is* lives here and is unit-tested without Kafka.

Why the fold is safe under at-least-once delivery and across topics: each step's state only
moves up a fixed rank (a "done" step is never downgraded), the order's state and reason are
derived from the steps, never accumulated, and an event id already applied is a no-op. So the
same events, in any order and with any duplicates, give the same status (timestamps aside).
Events of one order on *different* topics have no relative order in Kafka, which is why this
matters: a step event can arrive before the OrderCreated that caused it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

StepState = Literal["pending", "retrying", "dead_lettered", "skipped", "failed", "done"]
OrderState = Literal["PENDING", "COMPLETED", "FAILED", "STALLED"]

STEPS: tuple[str, ...] = ("inventory", "email", "invoice", "analytics")
MAX_APPLIED_EVENT_IDS = 64

# A step only ever moves to a higher rank. Outcomes outrank progress reports, and "done"
# outranks everything, so a late or replayed event can never undo a finished step.
_RANK: dict[str, int] = {"pending": 0, "retrying": 1, "dead_lettered": 2, "skipped": 3, "failed": 4, "done": 5}


class UnknownEvent(ValueError):
    """An event type the status view does not fold (the agent skips it)."""


class StepStatus(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    state: StepState = "pending"
    attempts: int = 0
    last_error: str | None = None
    updated_at: datetime | None = None
    detail: str | None = None


def _pending_steps() -> dict[str, StepStatus]:
    return {name: StepStatus() for name in STEPS}


class OrderStatus(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    order_id: str
    state: OrderState = "PENDING"
    reason: str | None = None
    steps: dict[str, StepStatus] = Field(default_factory=_pending_steps)
    created_at: datetime
    updated_at: datetime
    # Recent event ids only: dedup beyond this window relies on the fold being idempotent anyway.
    applied_event_ids: list[str] = Field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A plain JSON-compatible dict (what the Faust table and the HTTP API hold)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OrderStatus:
        return cls.model_validate(data)

    def to_avro(self) -> dict[str, Any]:
        """The record for `schemas/OrderStatus.v1.avsc` (published to orders.status)."""
        return {
            "order_id": self.order_id,
            "state": self.state,
            "reason": self.reason,
            "steps": [
                {"step": name, "state": s.state, "attempts": s.attempts, "last_error": s.last_error,
                 "detail": s.detail, "updated_at": s.updated_at}
                for name, s in self.steps.items()
            ],
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


# -- the fold ------------------------------------------------------------------------------

StepChange = tuple[str, StepState, str | None]  # (step, new state, detail)


def _stock_reserved(record: dict[str, Any]) -> list[StepChange]:
    return [("inventory", "done", None)]


def _stock_rejected(record: dict[str, Any]) -> list[StepChange]:
    # The order is rejected whole, so no invoice will ever be issued for it.
    return [("inventory", "failed", record.get("reason") or "stock rejected"), ("invoice", "skipped", None)]


def _email_sent(record: dict[str, Any]) -> list[StepChange]:
    return [("email", "done", record.get("message_id"))]


def _invoice_issued(record: dict[str, Any]) -> list[StepChange]:
    return [("invoice", "done", record["invoice_number"])]


def _order_recorded(record: dict[str, Any]) -> list[StepChange]:
    return [("analytics", "done", None)]


def _apply_step(step: StepStatus, state: StepState, detail: str | None, at: datetime) -> StepStatus:
    if _RANK[state] < _RANK[step.state]:
        return step
    if state == step.state:
        # The same outcome again under another event id: keep one detail, chosen so that the
        # result does not depend on which event came first.
        details = [d for d in (step.detail, detail) if d is not None]
        detail = min(details) if details else None
        if detail == step.detail:
            return step
        return step.model_copy(update={"detail": detail, "last_error": detail if state == "failed" else step.last_error})
    return step.model_copy(update={
        "state": state, "attempts": max(step.attempts, 1), "detail": detail,
        "last_error": detail if state == "failed" else step.last_error, "updated_at": at,
    })


def _derive(steps: dict[str, StepStatus]) -> tuple[OrderState, str | None]:
    """The order's state and reason, a function of its steps only (hence order-independent)."""
    if all(s.state == "done" for s in steps.values()):
        return "COMPLETED", None
    inventory = steps["inventory"]
    if inventory.state == "failed":
        return "FAILED", inventory.detail
    stalled = [name for name in STEPS if steps[name].state == "dead_lettered"]
    if stalled:
        name = stalled[0]
        return "STALLED", f"{name} dead-lettered: {steps[name].last_error or 'no error recorded'}"
    return "PENDING", None


def next_status(current: OrderStatus | None, event_type: str, record: dict[str, Any], event_id: str,
                at: datetime) -> OrderStatus:
    """Fold one event into the order's status. Pure; `at` is the only clock."""
    if event_type != "OrderCreated" and event_type not in STEP_EVENTS:
        raise UnknownEvent(f"the status view does not fold {event_type!r} events")
    if current is not None and event_id in current.applied_event_ids:
        return current  # a redelivery: nothing changes, not even updated_at
    if current is None:
        current = OrderStatus(order_id=record["order_id"], created_at=at, updated_at=at)

    steps = dict(current.steps)
    created_at = current.created_at
    if event_type == "OrderCreated":
        # The order's own timestamp replaces the "first seen" one used when a step event came first.
        created_at = record.get("created_at") or created_at
    else:
        for name, state, detail in STEP_EVENTS[event_type](record):
            steps[name] = _apply_step(steps[name], state, detail, at)

    state, reason = _derive(steps)
    return current.model_copy(update={
        "state": state,
        "reason": reason,
        "steps": steps,
        "created_at": created_at,
        "updated_at": max(current.updated_at, at),
        "applied_event_ids": [*current.applied_event_ids, event_id][-MAX_APPLIED_EVENT_IDS:],
    })


# The events the view folds, and what each one does to the steps. OrderCreated only creates.
STEP_EVENTS: dict[str, Callable[[dict[str, Any]], list[StepChange]]] = {
    "StockReserved": _stock_reserved,
    "StockRejected": _stock_rejected,
    "ConfirmationEmailSent": _email_sent,
    "InvoiceIssued": _invoice_issued,
    "OrderRecorded": _order_recorded,
}
FOLDED_EVENTS: frozenset[str] = frozenset({"OrderCreated", *STEP_EVENTS})
