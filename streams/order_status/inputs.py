"""What each input topic tells the view: from a Kafka message to a `next_status` input.

Three kinds of topics feed the fold, all keyed by order id and partitioned alike (murmur2,
same partition count), so one worker sees all of an order's messages:

- the event topics (`STATUS_INPUTS`): the decoded event is the fold input as it is; among them
  orders.cancelled (OrderCancelled) and orders.compensated (StepCompensated, one per service);
- every group's retry and dead-letter topics (`<topic>.<group>.retry.<n>`, `<topic>.<group>.dlt`):
  the value is the ORIGINAL event (e.g. OrderCreated), copied by the consumer runtime. The
  step is the one of the group that failed (the `x-group` header), never the copied event's
  type; attempt and error come from the `x-attempt` / `x-exception-*` headers. The source
  topic tells what failed: a copy of an orders.cancelled event is the group's *compensation*
  failing (CompensationRetrying / CompensationDeadLettered), any other its step
  (StepRetrying / StepDeadLettered);
- the SLA topic, written by the worker's own SLA timer.

Pure functions only; the Faust agent in app.py does the I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from services.runtime.envelope import EVENT_ID
from services.runtime.failure_headers import H_ATTEMPT, H_EXC_MESSAGE, H_EXC_TYPE, H_GROUP, H_REASON
from services import registry
from services.runtime.topology import ORDERS_CANCELLED, ConsumerGroup
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
class FailureTopic:
    group: str
    source: str
    kind: Literal["retry", "dlt"]


def failure_topics(groups: Iterable[ConsumerGroup] | None = None) -> dict[str, FailureTopic]:
    """Every group's retry and dead-letter topics (default: the registry's groups)."""
    out: dict[str, FailureTopic] = {}
    for g in registry.GROUPS if groups is None else groups:
        for source in g.inputs:
            out.update({t: FailureTopic(g.name, source, "retry") for t in g.retry_topics(source)})
            out[g.dlt_topic(source)] = FailureTopic(g.name, source, "dlt")
    return out


@dataclass(frozen=True)
class FoldInput:
    event_type: str
    record: dict[str, Any]
    event_id: str


def failure_input(topic: str, where: FailureTopic, headers: dict[str, str], order_id: str) -> FoldInput:
    """A retry or dead-letter copy of an event, as a StepRetrying / StepDeadLettered input, or for
    a copy of an OrderCancelled as a CompensationRetrying / CompensationDeadLettered one: the
    group failed to undo its part of the order, which says nothing about the step's own work."""
    group = headers.get(H_GROUP) or where.group
    step = group if group in STEPS else None  # a consumer group's step has its name
    if step is None:
        raise NotAnInput(f"x-group {group!r} is not a step of the order status")
    try:
        attempt = int(headers.get(H_ATTEMPT) or "1")
    except ValueError:
        raise NotAnInput(f"x-attempt {headers.get(H_ATTEMPT)!r} is not a number") from None
    exc_type = (headers.get(H_EXC_TYPE) or "").rsplit(".", 1)[-1]
    message = headers.get(H_EXC_MESSAGE) or ""
    error = f"{exc_type}: {message}" if exc_type and message else (exc_type or message or None)
    record = {"order_id": order_id, "step": step, "attempt": attempt, "error": error}
    if where.kind == "dlt":
        record["reason"] = f"{topic}: {headers.get(H_REASON) or 'dead-lettered'}"
    # The copy keeps the original's event_id: the fold input's own id must differ from it (or
    # the original's step event would count as this failure's duplicate) and be the same for
    # the same failure read twice.
    original = headers.get(EVENT_ID) or "no-event-id"
    event_id = f"{original}:{group}:{where.kind}:{attempt}"
    if where.source == ORDERS_CANCELLED:
        event_type = COMPENSATION_DEAD_LETTERED if where.kind == "dlt" else COMPENSATION_RETRYING
    else:
        event_type = STEP_DEAD_LETTERED if where.kind == "dlt" else STEP_RETRYING
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
