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
- `SlaExceeded`, sent by the worker's SLA timer when an order is not finished in time;
- the cancellation: `OrderCancelled` (orders.cancelled) sets the order's cancellation time and
  reason and makes every step's compensation "pending"; `StepCompensated` (orders.compensated,
  one per service) makes that step's compensation "done", with the service's action as its
  detail. A step not finished by then becomes "skipped": a service does no work for a cancelled
  order (a "done" read later still wins, by rank). A retry or dead-letter copy of an
  OrderCancelled is a *compensation* failure (`CompensationRetrying`, `CompensationDeadLettered`):
  it moves the step's compensation, never the step's own state, whose work was done or skipped.

Why the fold is safe under at-least-once delivery and across topics: each step's state only
moves up a fixed rank (a "done" step is never downgraded, so a later success wins over
retrying or dead-lettered), a step's failure count only grows, the order's state and reason
are derived from the steps, the SLA flag and the cancellation, never accumulated, and an event
id already applied is a no-op. A step's compensation moves up its own rank (pending < retrying <
dead_lettered < done), and the cancellation keeps the earliest time. So the same events, in any
order and with any duplicates, give the same status (timestamps aside). Events of one order on
*different* topics have no relative order in Kafka, which is why this matters: a step event can
arrive before the OrderCreated that caused it, a retry copy after the success of the retried
attempt, and a StepCompensated before the OrderCancelled it answers.

Overall state, first match wins:
- CANCELLED: the order was cancelled (an OrderCancelled, or a compensation, was read), whatever
  its steps; final. Reason: "cancelled: <reason>" (or "cancelled (no reason given)"; "cancelled
  (reason not read yet)" while only compensations were read), then "; compensation
  dead-lettered: <step>: <detail>" for each dead-lettered compensation (an operator replays it),
  else "; compensating: <steps>" while some are not done; nothing more once all are done;
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
from services.runtime.events import OrderCancelled

StepState = Literal["pending", "retrying", "dead_lettered", "skipped", "failed", "done"]
OrderState = Literal["PENDING", "COMPLETED", "FAILED", "STALLED", "CANCELLED"]
ORDER_STATES: tuple[str, ...] = ("PENDING", "COMPLETED", "FAILED", "STALLED", "CANCELLED")
CompensationState = Literal["pending", "retrying", "dead_lettered", "done"]

# The steps of an order: every consumer service that declares one (services/registry.py), in
# declaration order, named as the service and its consumer group (so a retry or dead-letter
# copy's x-group header names its step).
STEP_DECLARATIONS: dict[str, StatusStep] = {s.name: s.step for s in registry.SERVICES if s.step is not None}
STEPS: tuple[str, ...] = tuple(STEP_DECLARATIONS)
# The steps that compensate a cancelled order: those whose service handles OrderCancelled (a
# service that does not, an added one say, has nothing to undo and is not waited for).
COMPENSATING_STEPS: tuple[str, ...] = tuple(s.name for s in registry.SERVICES
                                            if s.step is not None and OrderCancelled in s.handlers)
MAX_APPLIED_EVENT_IDS = 64

# A step only ever moves to a higher rank. Outcomes outrank progress reports, and "done"
# outranks everything, so a late or replayed event can never undo a finished step.
_RANK: dict[str, int] = {"pending": 0, "retrying": 1, "dead_lettered": 2, "skipped": 3, "failed": 4, "done": 5}
_OUTCOMES = frozenset({"done", "failed"})  # states reached by an attempt that ended the step
FINISHED_STEP_STATES = frozenset({"done", "failed", "skipped"})
FINAL_ORDER_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})  # the SLA timer leaves them alone
# A compensation, too, only moves up: a late or replayed failure copy never undoes a done one.
# No compensation (None: the order is not cancelled) is below them all.
_COMPENSATION_RANK: dict[str | None, int] = {None: -1, "pending": 0, "retrying": 1, "dead_lettered": 2, "done": 3}

ORDER_CANCELLED = "OrderCancelled"
STEP_COMPENSATED = "StepCompensated"
# Fold inputs the view derives itself (no Avro schema of their own).
STEP_RETRYING = "StepRetrying"  # record: order_id, step, attempt, error
STEP_DEAD_LETTERED = "StepDeadLettered"  # record: order_id, step, attempt, error, reason
# The same, for a copy of an OrderCancelled: the step's compensation failed, not the step.
COMPENSATION_RETRYING = "CompensationRetrying"  # record: order_id, step, attempt, error
COMPENSATION_DEAD_LETTERED = "CompensationDeadLettered"  # record: order_id, step, attempt, error, reason
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
    # Only for a cancelled order (None otherwise): where undoing the step's part stands, and what
    # the service did (its StepCompensated action) or where the compensation failed.
    compensation: CompensationState | None = None
    compensation_detail: str | None = None


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
    cancelled_at: datetime | None = None  # the OrderCancelled's time (the earliest, if there were two)
    cancel_reason: str | None = None  # what the client gave as the reason, if anything
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
        """The record for `schemas/OrderStatus.v2.avsc` (published to orders.status)."""
        return {
            "order_id": self.order_id,
            "state": self.state,
            "reason": self.reason,
            "steps": [
                {"step": name, "state": s.state, "attempts": s.attempts, "last_error": s.last_error,
                 "detail": s.detail, "updated_at": s.updated_at, "compensation": s.compensation,
                 "compensation_detail": s.compensation_detail}
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


class CompensationChange(NamedTuple):
    """A change of a step's compensation only: its own state stays as it is."""

    step: str
    compensation: CompensationState
    detail: str | None = None


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


def _known_step(step: str) -> str:
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}")
    return step


def _attempt(record: dict[str, Any]) -> int:
    attempt = int(record["attempt"])
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    return attempt


def _failure(state: StepState) -> Callable[[dict[str, Any]], list[StepChange]]:
    def change(record: dict[str, Any]) -> list[StepChange]:
        step = _known_step(record["step"])
        attempt = _attempt(record)
        return [StepChange(step, state, record.get("reason"), attempt, record.get("error") or "no error recorded")]

    return change


def _compensation_failure(state: CompensationState) -> Callable[[dict[str, Any]], list[CompensationChange]]:
    """A retry or dead-letter copy of an OrderCancelled: the group failed to undo its part. Its
    detail is the error (a dead letter's: the DLT topic and why, as for a step). The step's own
    state is not touched: its work was done or skipped before the compensation ran."""
    def change(record: dict[str, Any]) -> list[CompensationChange]:
        step = _known_step(record["step"])
        _attempt(record)  # checked as for a step's failure; the detail carries no count
        error = record.get("error") or "no error recorded"
        return [CompensationChange(step, state, (record.get("reason") or error) if state == "dead_lettered" else error)]

    return change


def _compensated(record: dict[str, Any]) -> list[StepChange | CompensationChange]:
    """A StepCompensated: that step's compensation is done. A step not finished by then will
    never be (a service skips its work for a cancelled order), so it becomes "skipped", by rank:
    a done or failed step stays as it is, and a "done" read later (it was sent before the
    cancellation reached the service) still wins."""
    step = _known_step(record["step"])
    action, document = str(record["action"]), record.get("document")
    detail = action if not document or document in action else f"{action} (document {document})"
    return [StepChange(step, "skipped"), CompensationChange(step, "done", detail)]


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


def _apply_compensation(step: StepStatus, change: CompensationChange, at: datetime) -> StepStatus:
    new_rank, old_rank = _COMPENSATION_RANK[change.compensation], _COMPENSATION_RANK[step.compensation]
    if new_rank > old_rank:
        compensation, detail = change.compensation, change.detail
    elif new_rank == old_rank:
        compensation, detail = step.compensation, _min_detail(step.compensation_detail, change.detail)
    else:
        return step
    if (compensation, detail) == (step.compensation, step.compensation_detail):
        return step
    return step.model_copy(update={"compensation": compensation, "compensation_detail": detail, "updated_at": at})


def _earliest_cancellation(cancelled_at: datetime | None, reason: str | None,
                           record: dict[str, Any]) -> tuple[datetime, str | None]:
    # At most one OrderCancelled per order, but a second one must not depend on arrival order
    # either: the earliest wins, with its reason (the smallest on a tie).
    at, why = record["cancelled_at"], record.get("reason") or None
    if cancelled_at is None or at < cancelled_at:
        return at, why
    if at == cancelled_at:
        return cancelled_at, _min_detail(reason, why)
    return cancelled_at, reason


def _is_cancelled(steps: Mapping[str, StepStatus], cancelled_at: datetime | None) -> bool:
    """The OrderCancelled was read, or a compensation: a service compensates only a cancelled
    order, and its StepCompensated may arrive first (another topic)."""
    return cancelled_at is not None or any(s.compensation is not None for s in steps.values())


def _cancelled_reason(steps: Mapping[str, StepStatus], cancelled_at: datetime | None, cancel_reason: str | None) -> str:
    if cancel_reason:
        why = f"cancelled: {cancel_reason}"
    else:  # no OrderCancelled read yet: only a compensation, which does not carry the reason
        why = "cancelled (no reason given)" if cancelled_at is not None else "cancelled (reason not read yet)"
    dead = [name for name in STEPS if steps[name].compensation == "dead_lettered"]
    if dead:  # an operator must replay it: named before anything still in progress
        return why + "".join(f"; compensation dead-lettered: {name}: "
                             f"{steps[name].compensation_detail or 'no error recorded'}" for name in dead)
    open_ = [name for name in COMPENSATING_STEPS if steps[name].compensation != "done"]
    return why + (f"; compensating: {', '.join(open_)}" if open_ else "")


def _describe(name: str, step: StepStatus) -> str:
    if step.failures:
        return f"{name} {step.state} ({step.failures} failed attempt{'s' if step.failures > 1 else ''})"
    return f"{name} {step.state}"


def _derive(steps: Mapping[str, StepStatus], sla_deadline: datetime | None, cancelled_at: datetime | None = None,
            cancel_reason: str | None = None) -> tuple[OrderState, str | None]:
    """The order's state and reason: a function of its steps, SLA flag and cancellation only
    (hence order-independent)."""
    if _is_cancelled(steps, cancelled_at):  # whatever its steps: the customer's word is final
        return "CANCELLED", _cancelled_reason(steps, cancelled_at, cancel_reason)
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
    cancelled_at, cancel_reason = current.cancelled_at, current.cancel_reason
    if event_type == "OrderCreated":
        # The order's own timestamp replaces the "first seen" one used when a step event came first.
        created_at = record.get("created_at") or created_at
    elif event_type == SLA_EXCEEDED:
        deadline = record["deadline"]
        sla_deadline = deadline if sla_deadline is None else min(sla_deadline, deadline)
    elif event_type == ORDER_CANCELLED:
        cancelled_at, cancel_reason = _earliest_cancellation(cancelled_at, cancel_reason, record)
    else:
        for change in STEP_EVENTS[event_type](record):
            if isinstance(change, CompensationChange):
                steps[change.step] = _apply_compensation(steps[change.step], change, at)
            else:
                steps[change.step] = _apply_step(steps[change.step], change, at)
    if _is_cancelled(steps, cancelled_at):
        # Every compensating step compensates a cancelled order, whichever of the order's
        # cancellation events was read first: none is left without a compensation ("pending"
        # is the lowest rank).
        for name in COMPENSATING_STEPS:
            steps[name] = _apply_compensation(steps[name], CompensationChange(name, "pending"), at)

    state, reason = _derive(steps, sla_deadline, cancelled_at, cancel_reason)
    applied = {**current.applied, event_id: position}
    if len(applied) > MAX_APPLIED_EVENT_IDS:
        applied = dict(list(applied.items())[-MAX_APPLIED_EVENT_IDS:])
    return current.model_copy(update={
        "state": state,
        "reason": reason,
        "steps": steps,
        "created_at": created_at,
        "sla_deadline": sla_deadline,
        "cancelled_at": cancelled_at,
        "cancel_reason": cancel_reason,
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
# SlaExceeded only sets the SLA flag, OrderCancelled only sets the cancellation (every step's
# compensation follows from it).
STEP_EVENTS: dict[str, Callable[[dict[str, Any]], list[StepChange | CompensationChange]]] = {
    **_outcomes(STEP_DECLARATIONS),
    STEP_RETRYING: _failure("retrying"),
    STEP_DEAD_LETTERED: _failure("dead_lettered"),
    STEP_COMPENSATED: _compensated,
    COMPENSATION_RETRYING: _compensation_failure("retrying"),
    COMPENSATION_DEAD_LETTERED: _compensation_failure("dead_lettered"),
}
FOLDED_EVENTS: frozenset[str] = frozenset({"OrderCreated", SLA_EXCEEDED, ORDER_CANCELLED, *STEP_EVENTS})
