"""An order's status, folded from its events by one pure function: `next_status`.

The Faust agent only decodes, calls `next_status` and stores the result; everything that
decides what a status *is* lives here and is unit-tested without Kafka.

What the fold reads (`FOLDED_EVENTS`):
- the business events: OrderCreated and the step events. Which event finishes or fails which
  step is declared by each consumer service (`StatusStep` in its services/<name>/service.py:
  inventory is done on StockReserved and failed on StockRejected, invoice skipped on it, ...);
- the failure path: a copy of an event in `<topic>.<group>.retry.<n>` means the group's step
  failed and will be retried (`StepRetrying`), a copy in `<topic>.<group>.dlt` means it was
  dead-lettered (`StepDeadLettered`); the step comes from the `x-group` header, not from the
  copied event's type (see `inputs.py`);
- `SlaExceeded`, sent by the worker's SLA timer when an order is not finished in time.

Why the fold is safe under at-least-once delivery and across topics: each step's state only
moves up a fixed rank (a "done" step is never downgraded, so a later success wins over
retrying or dead-lettered), a step's failure count only grows, the order's state and reason
are derived from the steps and the SLA flag, never accumulated, and an event id already
applied is a no-op. So the same events, in any order and with any duplicates, give the same
status (timestamps aside). Events of one order on *different* topics have no relative order
in Kafka, which is why this matters: a step event can arrive before the OrderCreated that
caused it, and a retry copy after the success of the retried attempt.

Overall state, first match wins:
- COMPLETED: every step done;
- FAILED (reason = the failed step's detail): a step failed, i.e. the order was rejected (stock);
  final, no operator can change it;
- STALLED (reason names the step): a step is dead-lettered, or the SLA passed with a step not
  finished. The order can still complete (an operator replays the dead letter, a slow step
  finishes), and then becomes COMPLETED. A dead-lettered step is STALLED rather than FAILED
  because FAILED means "final": a dead letter is a fault of ours, fixed by a replay;
- PENDING otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from services import registry
from services.runtime.declaration import StatusStep

StepState = Literal["pending", "retrying", "dead_lettered", "skipped", "failed", "done"]
OrderState = Literal["PENDING", "COMPLETED", "FAILED", "STALLED"]
ORDER_STATES: tuple[str, ...] = ("PENDING", "COMPLETED", "FAILED", "STALLED")

# The steps of an order: every consumer service that declares one (services/registry.py), in
# declaration order, named as the service and its consumer group (so a retry or dead-letter
# copy's x-group header names its step).
STEP_DECLARATIONS: dict[str, StatusStep] = {s.name: s.step for s in registry.SERVICES if s.step is not None}
STEPS: tuple[str, ...] = tuple(STEP_DECLARATIONS)
MAX_APPLIED_EVENT_IDS = 64

# A step only ever moves to a higher rank. Outcomes outrank progress reports, and "done"
# outranks everything, so a late or replayed event can never undo a finished step.
_RANK: dict[str, int] = {"pending": 0, "retrying": 1, "dead_lettered": 2, "skipped": 3, "failed": 4, "done": 5}
_OUTCOMES = frozenset({"done", "failed"})  # states reached by an attempt that ended the step
FINISHED_STEP_STATES = frozenset({"done", "failed", "skipped"})
FINAL_ORDER_STATES = frozenset({"COMPLETED", "FAILED"})

# Fold inputs the view derives itself (no Avro schema of their own).
STEP_RETRYING = "StepRetrying"  # record: order_id, step, attempt, error
STEP_DEAD_LETTERED = "StepDeadLettered"  # record: order_id, step, attempt, error, reason
SLA_EXCEEDED = "SlaExceeded"  # record: order_id, deadline


class UnknownEvent(ValueError):
    """An event type the status view does not fold (the agent skips it)."""


class StepStatus(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    state: StepState = "pending"
    # Attempts known to have run: failed ones, plus the one that ended the step (done/failed).
    attempts: int = 0
    failures: int = 0  # the highest x-attempt seen on a retry or dead-letter copy
    last_error: str | None = None  # the error of that failure
    updated_at: datetime | None = None
    detail: str | None = None  # e.g. the invoice number, the rejection reason, the DLT topic


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
    sla_deadline: datetime | None = None  # set once the SLA timer found the order unfinished after it
    # Recent event ids, each with the input position ("topic:partition:offset") that applied it.
    # Dedup beyond this window relies on the fold being idempotent anyway; the position tells a
    # re-read of the same message (after a crash: republish) from an upstream duplicate (no-op).
    applied: dict[str, str | None] = Field(default_factory=dict)

    @property
    def applied_event_ids(self) -> list[str]:
        return list(self.applied)

    def unfinished_steps(self) -> list[str]:
        return [name for name in STEPS if self.steps[name].state not in FINISHED_STEP_STATES]

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

class StepChange(NamedTuple):
    step: str
    state: StepState
    detail: str | None = None
    failures: int = 0  # for retry/DLT copies: the x-attempt header
    error: str | None = None


def _in_words(event_type: str) -> str:
    """`StockRejected` -> "stock rejected": the detail of a failed step whose event gave none."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", event_type).lower()


def _outcomes(steps: Mapping[str, StatusStep]) -> dict[str, Callable[[dict[str, Any]], list[StepChange]]]:
    """For each event type a step declares, what it does to the steps: done or failed (with the
    declared record field as the detail), or skipped for the steps that list it in `skipped_on`."""
    declared: dict[str, list[tuple[str, StepState, str | None]]] = {}
    for name, step in steps.items():
        for event_type, detail in step.done.items():
            declared.setdefault(event_type, []).append((name, "done", detail))
        for event_type, detail in step.failed.items():
            declared.setdefault(event_type, []).append((name, "failed", detail))
        for event_type in step.skipped_on:
            declared.setdefault(event_type, []).append((name, "skipped", None))

    def translator(event_type: str, changes: list[tuple[str, StepState, str | None]]):
        def shown(record: dict[str, Any], detail: str | None) -> str | None:
            value = record.get(detail) if detail else None
            return None if value is None or value == "" else str(value)  # a detail is text (points: "3")

        def change(record: dict[str, Any]) -> list[StepChange]:
            return [StepChange(name, state, shown(record, detail) or (_in_words(event_type) if state == "failed" else None))
                    for name, state, detail in changes]
        return change

    return {event_type: translator(event_type, changes) for event_type, changes in declared.items()}


def _failure(state: StepState) -> Callable[[dict[str, Any]], list[StepChange]]:
    def change(record: dict[str, Any]) -> list[StepChange]:
        step = record["step"]
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}")
        attempt = int(record["attempt"])
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        return [StepChange(step, state, record.get("reason"), attempt, record.get("error") or "no error recorded")]

    return change


def _min_detail(*details: str | None) -> str | None:
    # One detail for several events of the same rank, chosen so that arrival order does not matter.
    present = [d for d in details if d is not None]
    return min(present) if present else None


def _apply_step(step: StepStatus, change: StepChange, at: datetime) -> StepStatus:
    new_rank, old_rank = _RANK[change.state], _RANK[step.state]
    if new_rank > old_rank:
        state, detail = change.state, change.detail
    elif new_rank == old_rank:
        state, detail = step.state, _min_detail(step.detail, change.detail)
    else:
        state, detail = step.state, step.detail
    failures, last_error = step.failures, step.last_error
    if change.failures > failures or (
            change.failures and change.failures == failures and _min_detail(last_error, change.error) != last_error):
        failures, last_error = change.failures, change.error
    fields = {"state": state, "detail": detail, "failures": failures, "last_error": last_error,
              "attempts": failures + (1 if state in _OUTCOMES else 0)}
    if all(getattr(step, k) == v for k, v in fields.items()):
        return step
    return step.model_copy(update={**fields, "updated_at": at})


def _describe(name: str, step: StepStatus) -> str:
    if step.failures:
        return f"{name} {step.state} ({step.failures} failed attempt{'s' if step.failures > 1 else ''})"
    return f"{name} {step.state}"


def _derive(steps: Mapping[str, StepStatus], sla_deadline: datetime | None) -> tuple[OrderState, str | None]:
    """The order's state and reason: a function of its steps and SLA flag only (hence order-independent)."""
    if all(s.state == "done" for s in steps.values()):
        return "COMPLETED", None
    failed = [name for name in STEPS if steps[name].state == "failed"]
    if failed:  # a step that failed (a rejection, not an error) fails the order for good
        return "FAILED", steps[failed[0]].detail
    dead = [name for name in STEPS if steps[name].state == "dead_lettered"]
    if dead:
        return "STALLED", "; ".join(
            f"{name} dead-lettered: {steps[name].last_error or 'no error recorded'}" for name in dead)
    unfinished = [name for name in STEPS if steps[name].state not in FINISHED_STEP_STATES]
    if sla_deadline is not None and unfinished:
        return "STALLED", (f"SLA exceeded (deadline {sla_deadline.isoformat()}), not finished: "
                           + ", ".join(_describe(name, steps[name]) for name in unfinished))
    return "PENDING", None


def next_status(current: OrderStatus | None, event_type: str, record: dict[str, Any], event_id: str,
                at: datetime, position: str | None = None) -> OrderStatus:
    """Fold one event into the order's status. Pure; `at` is the only clock.

    `position` ("topic:partition:offset" of the input message) is remembered with the event id,
    so the caller can tell a re-read of this very message (`redelivered`) from a duplicate.
    """
    if event_type not in FOLDED_EVENTS:
        raise UnknownEvent(f"the status view does not fold {event_type!r} events")
    if current is not None and event_id in current.applied:
        return current  # a duplicate: nothing changes, not even updated_at
    if current is None:
        current = OrderStatus(order_id=record["order_id"], created_at=at, updated_at=at)

    steps = dict(current.steps)
    created_at, sla_deadline = current.created_at, current.sla_deadline
    if event_type == "OrderCreated":
        # The order's own timestamp replaces the "first seen" one used when a step event came first.
        created_at = record.get("created_at") or created_at
    elif event_type == SLA_EXCEEDED:
        deadline = record["deadline"]
        sla_deadline = deadline if sla_deadline is None else min(sla_deadline, deadline)
    else:
        for change in STEP_EVENTS[event_type](record):
            steps[change.step] = _apply_step(steps[change.step], change, at)

    state, reason = _derive(steps, sla_deadline)
    applied = {**current.applied, event_id: position}
    if len(applied) > MAX_APPLIED_EVENT_IDS:
        applied = dict(list(applied.items())[-MAX_APPLIED_EVENT_IDS:])
    return current.model_copy(update={
        "state": state,
        "reason": reason,
        "steps": steps,
        "created_at": created_at,
        "sla_deadline": sla_deadline,
        "updated_at": max(current.updated_at, at),
        "applied": applied,
    })


def redelivered(current: OrderStatus | None, event_id: str, position: str | None) -> bool:
    """True when this very message (same event id, same position) was folded before: a re-read
    after a crash or a rebalance. Its status change may never have reached the changelog or
    orders.status (the worker died between the store write and the producer's flush), so the
    caller writes and publishes the status again. An upstream duplicate (another position) is not."""
    return current is not None and position is not None and current.applied.get(event_id) == position


# -- the SLA -------------------------------------------------------------------------------

def sla_deadline_passed(stored: Mapping[str, Any], sla_s: float, now: datetime) -> datetime | None:
    """The deadline, when this stored status (its JSON form) is past it, unfinished, and not yet
    flagged; else None. Works on the table's JSON so the timer's scan stays cheap."""
    if stored.get("state") in FINAL_ORDER_STATES or stored.get("sla_deadline") is not None:
        return None
    deadline = datetime.fromisoformat(stored["created_at"]) + timedelta(seconds=sla_s)
    return deadline if deadline <= now else None


def sla_event_id(order_id: str) -> str:
    # One per order: the flag is set once and never cleared (completion overrides it).
    return f"sla-exceeded:{order_id}"


# -- queries -------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime) -> datetime:
    """`1h`, `30m`, `90s`, `2d` (before `now`) or an ISO 8601 time (UTC if it has no offset)."""
    match = _DURATION.match(text)
    if match:
        try:
            return now - timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])
        except OverflowError:
            raise ValueError(f"since {text!r} reaches back before the year 1") from None
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"since must be a duration such as 1h, 30m, 2d or an ISO 8601 time, not {text!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=now.tzinfo)


def matches(stored: Mapping[str, Any], states: frozenset[str] | None, since: datetime | None) -> bool:
    """A stored status (JSON form) is in one of `states` and changed at or after `since`."""
    if states is not None and stored.get("state") not in states:
        return False
    return since is None or datetime.fromisoformat(stored["updated_at"]) >= since


# The events the view folds, and what each one does to the steps. OrderCreated only creates,
# SlaExceeded only sets the SLA flag.
STEP_EVENTS: dict[str, Callable[[dict[str, Any]], list[StepChange]]] = {
    **_outcomes(STEP_DECLARATIONS),
    STEP_RETRYING: _failure("retrying"),
    STEP_DEAD_LETTERED: _failure("dead_lettered"),
}
FOLDED_EVENTS: frozenset[str] = frozenset({"OrderCreated", SLA_EXCEEDED, *STEP_EVENTS})
