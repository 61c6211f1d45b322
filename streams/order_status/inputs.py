"""What each input topic tells the view: from a Kafka message to a `next_status` input.

Three kinds of topics feed the fold, all keyed by order id and partitioned alike (murmur2,
same partition count), so one worker sees all of an order's messages:

- the event topics (`STATUS_INPUTS`): the decoded event is the fold input as it is; among them
  orders.cancelled (OrderCancelled) and orders.compensated (StepCompensated, one per service);
- the failures topic (`orderpipe.failures`): one JSON notice per failure a consumer group routes
  to one of its retry or dead-letter topics (services/runtime/failure_notices.py). The step is
  the one of the group that failed, never the failed event's type. The source topic tells what
  failed: a failed orders.cancelled event is the group's *compensation* failing
  (CompensationRetrying / CompensationDeadLettered), any other its step (StepRetrying /
  StepDeadLettered);
- the SLA topic, written by the worker's own SLA timer.

Pure functions only; the Faust agent in app.py does the I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.runtime.failure_notices import FailureNotice
from services.runtime.topology import ORDERS_CANCELLED
from streams.order_status.status import (
    COMPENSATION_DEAD_LETTERED,
    COMPENSATION_RETRYING,
    STEPS,
    SLA_EXCEEDED,
    STEP_DEAD_LETTERED,
    STEP_RETRYING,
    sla_event_id,
)


class NotAnInput(ValueError):
    """A message the view cannot fold (logged and skipped by the agent)."""


@dataclass(frozen=True)
class FoldInput:
    event_type: str
    record: dict[str, Any]
    event_id: str


def failure_input(notice: FailureNotice) -> FoldInput:
    """A failure notice as a StepRetrying / StepDeadLettered input, or for a failed OrderCancelled
    as a CompensationRetrying / CompensationDeadLettered one: the group failed to undo its part
    of the order, which says nothing about the step's own work."""
    step = notice.group if notice.group in STEPS else None  # a consumer group's step has its name
    if step is None:
        raise NotAnInput(f"group {notice.group!r} is not a step of the order status")
    exc_type = notice.error_type.rsplit(".", 1)[-1]
    message = notice.error
    error = f"{exc_type}: {message}" if exc_type and message else (exc_type or message or None)
    record = {"order_id": notice.order_id, "step": step, "attempt": notice.attempt, "error": error}
    if notice.kind == "dlt":
        record["reason"] = f"{notice.topic}: {notice.reason or 'dead-lettered'}"
    # The notice names the failed event's id: the fold input's own id must differ from it (or
    # the event's step event would count as this failure's duplicate) and be the same for the
    # same failure read twice.
    event_id = f"{notice.event_id or 'no-event-id'}:{notice.group}:{notice.kind}:{notice.attempt}"
    if notice.source == ORDERS_CANCELLED:
        event_type = COMPENSATION_DEAD_LETTERED if notice.kind == "dlt" else COMPENSATION_RETRYING
    else:
        event_type = STEP_DEAD_LETTERED if notice.kind == "dlt" else STEP_RETRYING
    return FoldInput(event_type, record, event_id)


def sla_message(order_id: str, deadline: datetime) -> bytes:
    return json.dumps({"order_id": order_id, "deadline": deadline.isoformat()}).encode()


def sla_input(value: bytes) -> FoldInput:
    try:
        data = json.loads(value)
        order_id, deadline = data["order_id"], datetime.fromisoformat(data["deadline"])
    except (ValueError, KeyError, TypeError) as exc:
        raise NotAnInput(f"not an SLA message: {exc!r}") from None
    return FoldInput(SLA_EXCEEDED, {"order_id": order_id, "deadline": deadline}, sla_event_id(order_id))
