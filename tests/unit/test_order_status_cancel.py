"""A cancelled order in the order-status view, without Faust or Kafka.

Promises pinned here:
- OrderCancelled makes the order CANCELLED whatever its steps (final: the SLA timer leaves it
  alone) and every step's compensation "pending"; StepCompensated makes that step's
  compensation "done" (the service's action as its detail), and a step not finished by then
  "skipped", while a step event read later still wins;
- the cancellation's events arrive on other topics than the steps' and each other's: every
  arrival order gives the same status, a StepCompensated read first already counts;
- a retry or dead-letter copy of an OrderCancelled is the group's compensation failing: it moves
  the compensation (only up: a done one stays done), never the step's own state; a dead-lettered
  compensation is named in the reason and raises its own alert;
- duplicates are no-ops, and the status is published as OrderStatus v2.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest

from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.envelope import Envelope
from services.runtime.failure_notices import FailureNotice
from services.runtime.topology import FAILURES, ORDERS_CANCELLED, ORDERS_COMPENSATED, ORDERS_CREATED
from streams.order_status.fold import (
    STATUS_SCHEMA_VERSION,
    Metrics,
    apply_event,
    count_and_alert,
    partition_of,
    status_value,
)
from streams.order_status.inputs import failure_input
from streams.order_status.openapi import openapi_document
from streams.order_status.sla import SlaWatch
from streams.order_status.status import (
    COMPENSATION_DEAD_LETTERED,
    COMPENSATION_RETRYING,
    FINAL_ORDER_STATES,
    ORDER_STATES,
    STEPS,
    OrderStatus,
    next_status,
    sla_deadline_passed,
    sla_event_id,
)
from streams.order_status.web import _list_params

ORDER = "order-c"
T0 = datetime(2025, 6, 1, 10, 0, tzinfo=UTC)
CODEC = Codec(EmbeddedRegistry())

CREATED = ("OrderCreated", {
    "order_id": ORDER, "customer_id": "c-1", "customer_email": "c@example.com", "currency": "EUR",
    "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": Decimal("5.00")}], "total": Decimal("10.00"),
    "created_at": T0,
}, "ev-created")
RESERVED = ("StockReserved", {"order_id": ORDER, "lines": [{"sku": "SKU-1", "quantity": 2}], "reserved_at": T0},
            "ev-reserved")
EMAILED = ("ConfirmationEmailSent", {"order_id": ORDER, "message_id": "<m-1@orderpipe>", "recipient": "c@example.com",
                                     "sent_at": T0}, "ev-email")
INVOICED = ("InvoiceIssued", {"order_id": ORDER, "invoice_number": "INV-000042", "total": Decimal("10.00"),
                              "currency": "EUR", "pdf_path": "INV-000042.pdf", "issued_at": T0}, "ev-invoice")
RECORDED = ("OrderRecorded", {"order_id": ORDER, "units": 2, "revenue": Decimal("10.00"), "currency": "EUR",
                              "recorded_at": T0}, "ev-analytics")
STEP_EVENT = {"inventory": RESERVED, "email": EMAILED, "invoice": INVOICED, "analytics": RECORDED}
STEP_DETAIL = {"inventory": None, "email": "<m-1@orderpipe>", "invoice": "INV-000042", "analytics": None}

CANCEL_RECORD = {"order_id": ORDER, "customer_id": "c-1", "customer_email": "c@example.com",
                 "reason": "changed my mind", "cancelled_at": T0 + timedelta(minutes=1)}
CANCELLED = ("OrderCancelled", CANCEL_RECORD, "ev-cancelled")
ACTIONS = {"inventory": ("released 2 x SKU-1", None), "email": ("sent the cancellation mail", None),
           "invoice": ("credit note CN-000003 for invoice INV-000042", "CN-000003"),
           "analytics": ("removed from the rollups", None)}


def compensated(step: str, action: str | None = None, document: str | None = None):
    default_action, default_document = ACTIONS[step]
    return ("StepCompensated", {"order_id": ORDER, "step": step, "action": action or default_action,
                                "document": document if action else default_document,
                                "compensated_at": T0 + timedelta(minutes=2)}, f"ev-compensated-{step}")


def notice(group: str, attempt: int, kind: str = "retry", source: str = ORDERS_CANCELLED,
           error: str = "database is locked") -> FailureNotice:
    """The failure notice of an OrderCancelled (or another event) that failed in `group`."""
    topic = f"{source}.{group}.{'dlt' if kind == 'dlt' else f'retry.{attempt}'}"
    reason = f"retries exhausted after {attempt} attempts" if kind == "dlt" else None
    return FailureNotice(ORDER, group, source, topic, kind, attempt, "ev-cancelled" if source == ORDERS_CANCELLED
                         else "ev-created", "sqlalchemy.exc.OperationalError", error, reason, T0.isoformat())


def cancel_copy(step: str, kind: str, attempt: int, error: str | None = None):
    """The notice of a failed OrderCancelled, as inputs.py turns it into a fold input."""
    fold_input = failure_input(notice(step, attempt, kind, error=error or "database is locked"))
    return fold_input.event_type, fold_input.record, fold_input.event_id


def fold(events, start: OrderStatus | None = None) -> OrderStatus:
    status = start
    for i, (event_type, record, event_id) in enumerate(events):
        status = next_status(status, event_type, record, event_id, T0 + timedelta(seconds=i + 1))
    assert status is not None
    return status


def without_times(status: OrderStatus) -> dict:
    data = status.model_dump(exclude={"created_at", "updated_at", "applied"})
    for step in data["steps"].values():
        step.pop("updated_at")
    data["applied_event_ids"] = sorted(status.applied_event_ids)
    return data


def states(status: OrderStatus) -> dict[str, tuple]:
    return {name: (s.state, s.compensation) for name, s in status.steps.items()}


# -- the cancellation and each step ---------------------------------------------------------------

def test_a_cancelled_order_is_cancelled_with_every_compensation_pending() -> None:
    status = fold([CREATED, CANCELLED])
    assert status.state == "CANCELLED"
    assert status.reason == "cancelled: changed my mind; compensating: inventory, email, invoice, analytics"
    assert (status.cancelled_at, status.cancel_reason) == (CANCEL_RECORD["cancelled_at"], "changed my mind")
    assert states(status) == dict.fromkeys(STEPS, ("pending", "pending"))
    assert all(s.compensation_detail is None for s in status.steps.values())


def test_a_cancellation_without_a_reason_says_so() -> None:
    for reason in (None, ""):
        status = fold([CREATED, ("OrderCancelled", {**CANCEL_RECORD, "reason": reason}, "ev-cancelled")])
        assert status.cancel_reason is None
        assert status.reason == "cancelled (no reason given); compensating: inventory, email, invoice, analytics"


@pytest.mark.parametrize("step", STEPS)
def test_a_step_done_before_the_cancellation_stays_done_and_is_compensated(step: str) -> None:
    status = fold([CREATED, STEP_EVENT[step], CANCELLED])
    assert (status.steps[step].state, status.steps[step].compensation) == ("done", "pending")
    status = fold([compensated(step)], status)
    assert (status.steps[step].state, status.steps[step].compensation) == ("done", "done")
    assert status.steps[step].detail == STEP_DETAIL[step] and status.steps[step].attempts == 1
    others = [name for name in STEPS if name != step]
    assert status.state == "CANCELLED"
    assert status.reason == f"cancelled: changed my mind; compensating: {', '.join(others)}"


@pytest.mark.parametrize("step", STEPS)
def test_a_step_not_done_before_the_cancellation_is_skipped_once_compensated(step: str) -> None:
    status = fold([CREATED, CANCELLED, compensated(step)])
    assert (status.steps[step].state, status.steps[step].compensation) == ("skipped", "done")
    assert status.steps[step].attempts == 0
    # ... unless the service had done it after all (its event was on its way): a late "done" wins
    late = fold([STEP_EVENT[step]], status)
    assert (late.steps[step].state, late.steps[step].compensation) == ("done", "done")
    assert late.steps[step].detail == STEP_DETAIL[step]
    assert without_times(late) == without_times(fold([CREATED, STEP_EVENT[step], CANCELLED, compensated(step)]))


def test_every_compensation_done_leaves_only_the_cancellation_as_the_reason() -> None:
    status = fold([CREATED, RESERVED, EMAILED, CANCELLED, *(compensated(step) for step in STEPS)])
    assert status.state == "CANCELLED" and status.reason == "cancelled: changed my mind"
    assert states(status) == {"inventory": ("done", "done"), "email": ("done", "done"),
                              "invoice": ("skipped", "done"), "analytics": ("skipped", "done")}
    assert status.steps["inventory"].compensation_detail == "released 2 x SKU-1"


def test_a_completed_order_cancelled_later_is_cancelled() -> None:
    completed = fold([CREATED, RESERVED, EMAILED, INVOICED, RECORDED])
    assert completed.state == "COMPLETED"
    status = fold([CANCELLED, *(compensated(step) for step in STEPS)], completed)
    assert status.state == "CANCELLED" and status.reason == "cancelled: changed my mind"
    assert states(status) == dict.fromkeys(STEPS, ("done", "done"))


def test_a_rejected_order_cancelled_is_cancelled_and_keeps_its_failed_step() -> None:
    rejected = ("StockRejected", {"order_id": ORDER, "reason": "out of stock: SKU-1", "missing": [],
                                  "rejected_at": T0}, "ev-rejected")
    status = fold([CREATED, rejected, CANCELLED, compensated("inventory", "nothing was reserved")])
    assert status.state == "CANCELLED"
    assert (status.steps["inventory"].state, status.steps["inventory"].detail) == ("failed", "out of stock: SKU-1")
    assert status.steps["inventory"].compensation_detail == "nothing was reserved"


# -- StepCompensated: its detail, a bad step ----------------------------------------------------------

@pytest.mark.parametrize("action, document, detail", [
    ("credit note CN-000003 for invoice INV-000042", "CN-000003", "credit note CN-000003 for invoice INV-000042"),
    ("issued a credit note", "CN-000003", "issued a credit note (document CN-000003)"),
    ("nothing was invoiced", None, "nothing was invoiced"),
])
def test_the_compensation_detail_is_the_action_with_its_document_number_once(action, document, detail) -> None:
    status = fold([CREATED, CANCELLED, compensated("invoice", action, document)])
    assert status.steps["invoice"].compensation_detail == detail


def test_a_compensation_of_an_unknown_step_is_refused() -> None:
    event_type, record, _ = compensated("email")
    with pytest.raises(ValueError, match="^unknown step 'shipping'$"):
        next_status(fold([CREATED]), event_type, {**record, "step": "shipping"}, "ev-x", T0)


# -- arrival order ----------------------------------------------------------------------------------

def test_a_step_compensated_before_the_cancellation_is_read_already_cancels_the_order() -> None:
    early = fold([CREATED, compensated("email")])
    assert early.state == "CANCELLED" and early.cancelled_at is None
    assert early.reason == "cancelled (reason not read yet); compensating: inventory, invoice, analytics"
    assert states(early) == {"inventory": ("pending", "pending"), "email": ("skipped", "done"),
                             "invoice": ("pending", "pending"), "analytics": ("pending", "pending")}
    status = fold([CANCELLED], early)
    assert status.reason == "cancelled: changed my mind; compensating: inventory, invoice, analytics"
    assert without_times(status) == without_times(fold([CREATED, CANCELLED, compensated("email")]))


def test_every_arrival_order_gives_the_same_status() -> None:
    events = [CREATED, RESERVED, CANCELLED, compensated("inventory"), compensated("email"),
              cancel_copy("inventory", "retry", 1)]
    results = [fold(p) for p in itertools.permutations(events)]
    assert len(results) == 720
    first = without_times(results[0])
    assert all(without_times(r) == first for r in results)
    status = results[0]
    assert status.state == "CANCELLED"
    assert status.reason == "cancelled: changed my mind; compensating: invoice, analytics"
    # the retry copy read after the StepCompensated did not undo it, nor touch the step
    assert states(status) == {"inventory": ("done", "done"), "email": ("skipped", "done"),
                              "invoice": ("pending", "pending"), "analytics": ("pending", "pending")}
    assert status.steps["inventory"].compensation_detail == "released 2 x SKU-1"
    assert (status.steps["inventory"].failures, status.steps["inventory"].last_error) == (0, None)


def test_compensation_failures_in_every_arrival_order() -> None:
    events = [CANCELLED, cancel_copy("invoice", "retry", 1), cancel_copy("invoice", "retry", 2),
              cancel_copy("invoice", "dlt", 4), compensated("email")]
    results = {repr(without_times(fold(p))) for p in itertools.permutations(events)}
    assert len(results) == 1
    status = fold(events)
    assert status.steps["invoice"].compensation == "dead_lettered"
    assert status.steps["invoice"].compensation_detail == (
        "orders.cancelled.invoice.dlt: retries exhausted after 4 attempts")


def test_equal_rank_compensation_details_keep_the_smallest_whatever_the_arrival_order() -> None:
    refused, timed_out = cancel_copy("email", "retry", 1, "refused"), cancel_copy("email", "retry", 2, "timed out")
    for events in ([refused, timed_out], [timed_out, refused]):
        email = fold([CREATED, CANCELLED, *events]).steps["email"]
        assert (email.compensation, email.compensation_detail) == ("retrying", "OperationalError: refused"), events


def test_two_cancellations_keep_the_earliest_in_either_order() -> None:
    later = ("OrderCancelled", {**CANCEL_RECORD, "reason": "second thoughts",
                                "cancelled_at": CANCEL_RECORD["cancelled_at"] + timedelta(seconds=5)}, "ev-cancelled-2")
    same_time = ("OrderCancelled", {**CANCEL_RECORD, "reason": "another reason"}, "ev-cancelled-3")
    for events in itertools.permutations([CANCELLED, later]):
        status = fold([CREATED, *events])
        assert (status.cancelled_at, status.cancel_reason) == (CANCEL_RECORD["cancelled_at"], "changed my mind")
    reasons = {fold([CREATED, *events]).cancel_reason for events in itertools.permutations([CANCELLED, same_time])}
    assert reasons == {"another reason"}  # a tie: the smallest, whichever came first


# -- compensation failures -------------------------------------------------------------------------

def test_a_failed_order_cancelled_is_a_compensation_failure_not_a_step_failure() -> None:
    retry = failure_input(notice("email", 2))
    assert retry.event_type == COMPENSATION_RETRYING
    assert retry.record == {"order_id": ORDER, "step": "email", "attempt": 2,
                            "error": "OperationalError: database is locked"}
    assert retry.event_id == "ev-cancelled:email:retry:2"
    dead = failure_input(notice("email", 4, "dlt"))
    assert dead.event_type == COMPENSATION_DEAD_LETTERED
    assert dead.record["reason"] == "orders.cancelled.email.dlt: retries exhausted after 4 attempts"
    # a failure of any other event is still the step's own
    step = failure_input(notice("email", 2, source=ORDERS_CREATED))
    assert step.event_type == "StepRetrying"


def test_a_retrying_compensation_keeps_the_error_and_leaves_the_step_alone() -> None:
    status = fold([CREATED, EMAILED, CANCELLED, cancel_copy("email", "retry", 1), cancel_copy("invoice", "retry", 1)])
    email, invoice = status.steps["email"], status.steps["invoice"]
    assert (email.state, email.attempts, email.failures, email.last_error) == ("done", 1, 0, None)
    assert (email.compensation, email.compensation_detail) == ("retrying", "OperationalError: database is locked")
    assert (invoice.state, invoice.compensation) == ("pending", "retrying")  # not skipped: not compensated yet
    assert status.reason == "cancelled: changed my mind; compensating: inventory, email, invoice, analytics"


def test_a_dead_lettered_compensation_is_named_and_the_step_state_unchanged() -> None:
    status = fold([CREATED, RESERVED, EMAILED, CANCELLED, cancel_copy("inventory", "retry", 1),
                   cancel_copy("inventory", "dlt", 4), compensated("email")])
    inventory = status.steps["inventory"]
    assert (inventory.state, inventory.attempts, inventory.failures, inventory.last_error, inventory.detail) == (
        "done", 1, 0, None, None)
    assert inventory.compensation == "dead_lettered"
    assert status.state == "CANCELLED"
    assert status.reason == ("cancelled: changed my mind; compensation dead-lettered: inventory: "
                             "orders.cancelled.inventory.dlt: retries exhausted after 4 attempts")
    # an operator replays the dead letter; the stock is released: a later success wins
    replayed = fold([compensated("inventory")], status)
    assert (replayed.steps["inventory"].state, replayed.steps["inventory"].compensation) == ("done", "done")
    assert replayed.reason == "cancelled: changed my mind; compensating: invoice, analytics"
    # ... in whichever order the dead letter and the success are read
    assert without_times(fold([CREATED, RESERVED, EMAILED, CANCELLED, compensated("email"), compensated("inventory"),
                               cancel_copy("inventory", "dlt", 4), cancel_copy("inventory", "retry", 1)])) == \
        without_times(replayed)


def test_every_dead_lettered_compensation_is_named_before_the_open_ones() -> None:
    status = fold([CREATED, CANCELLED, cancel_copy("invoice", "dlt", 4), cancel_copy("email", "dlt", 1)])
    assert status.reason == (
        "cancelled: changed my mind"
        "; compensation dead-lettered: email: orders.cancelled.email.dlt: retries exhausted after 1 attempts"
        "; compensation dead-lettered: invoice: orders.cancelled.invoice.dlt: retries exhausted after 4 attempts")


def test_a_compensation_failure_of_an_unknown_step_or_attempt_is_refused() -> None:
    event_type, record, _ = cancel_copy("email", "retry", 1)
    with pytest.raises(ValueError, match="^unknown step 'shipping'$"):
        next_status(None, event_type, {**record, "step": "shipping"}, "ev-x", T0)
    with pytest.raises(ValueError, match="^attempt must be >= 1, got 0$"):
        next_status(None, event_type, {**record, "attempt": 0}, "ev-x", T0)


# -- duplicates ---------------------------------------------------------------------------------------

def test_the_cancellation_events_applied_twice_are_no_ops() -> None:
    events = [CREATED, RESERVED, CANCELLED, compensated("inventory"), cancel_copy("email", "retry", 1),
              cancel_copy("email", "dlt", 4)]
    status = fold(events)
    for event_type, record, event_id in events:
        assert next_status(status, event_type, record, event_id, T0 + timedelta(hours=1)) is status


def test_a_compensation_sent_again_under_a_new_id_changes_nothing_but_the_id_log() -> None:
    status = fold([CREATED, CANCELLED, compensated("inventory")])
    event_type, record, _ = compensated("inventory")
    again = next_status(status, event_type, record, "ev-compensated-again", T0 + timedelta(hours=1))
    assert again.steps == status.steps and (again.state, again.reason) == (status.state, status.reason)
    assert again.applied_event_ids[-1] == "ev-compensated-again"


# -- what the worker does with it -------------------------------------------------------------------

def message(topic: str, offset: int, value: bytes, hdrs: dict[str, str]):
    return SimpleNamespace(
        key=ORDER.encode(), value=value, headers={k: v.encode() for k, v in hdrs.items()},
        message=SimpleNamespace(topic=topic, partition=partition_of(ORDER.encode()), offset=offset,
                                timestamp=T0.timestamp() + offset))


def envelope(event_id: str, event_type: str) -> dict[str, str]:
    return {k: v.decode() for k, v in Envelope(event_id, event_type, 1, ORDER).to_headers()}


def test_apply_event_reads_the_cancellation_topics_and_the_notices_of_order_cancelled() -> None:
    table: dict = {}
    metrics = Metrics()
    cancelled = CODEC.encode("OrderCancelled", CANCEL_RECORD)
    _, record, _ = compensated("email")
    steps = [
        message(ORDERS_CANCELLED, 1, cancelled, envelope("ev-cancelled", "OrderCancelled")),
        message(ORDERS_COMPENSATED, 2, CODEC.encode("StepCompensated", record),
                envelope("ev-compensated-email", "StepCompensated")),
        message(FAILURES, 3, notice("inventory", 1).to_bytes(), {}),
        message(FAILURES, 4, notice("inventory", 4, "dlt").to_bytes(), {}),
    ]
    for msg in steps:
        applied = apply_event(msg, CODEC, table)
        assert applied is not None
        count_and_alert(applied, metrics)
    stored = OrderStatus.from_json(table[ORDER.encode()])
    assert stored.state == "CANCELLED" and stored.cancelled_at == CANCEL_RECORD["cancelled_at"]
    assert states(stored) == {"inventory": ("pending", "dead_lettered"), "email": ("skipped", "done"),
                              "invoice": ("pending", "pending"), "analytics": ("pending", "pending")}
    # the dead-lettered compensation has its own alert and counter, not the step's
    assert (metrics.compensation_dead_lettered, metrics.dead_lettered) == (1, 0)
    assert "orderpipe_order_status_compensation_dead_lettered_total 1" in metrics.prometheus()
    # a StepCompensated of a step the view does not know is skipped, not a crash
    unknown = message(ORDERS_COMPENSATED, 5, CODEC.encode("StepCompensated", {**record, "step": "shipping"}),
                      envelope("ev-compensated-shipping", "StepCompensated"))
    assert apply_event(unknown, CODEC, table) is None


def test_the_published_status_round_trips_through_the_v2_schema() -> None:
    status = fold([CREATED, RESERVED, EMAILED, CANCELLED, compensated("invoice", "issued a credit note", "CN-000003"),
                   cancel_copy("inventory", "dlt", 4), cancel_copy("email", "retry", 1)])
    data = status_value(CODEC, status)
    decoded = CODEC.decode(data)
    sv = CODEC.registry.by_id(decoded.schema_id)
    assert (decoded.event_type, sv.version, STATUS_SCHEMA_VERSION) == ("OrderStatus", 2, 2)
    assert data == CODEC.encode("OrderStatus", status.to_avro(), version=2)
    record = decoded.record
    assert (record["state"], record["reason"]) == ("CANCELLED", status.reason)
    steps = {s["step"]: s for s in record["steps"]}
    assert {name: (s["state"], s["compensation"]) for name, s in steps.items()} == states(status)
    assert steps["invoice"]["compensation_detail"] == "issued a credit note (document CN-000003)"
    assert steps["email"]["compensation_detail"] == "OperationalError: database is locked"
    assert record == {**status.to_avro(), "steps": record["steps"]}
    assert record["steps"] == status.to_avro()["steps"]
    # and through the table's JSON
    assert OrderStatus.from_json(status.to_json()) == status


# -- SLA, queries, the API document ------------------------------------------------------------------

def test_the_sla_leaves_a_cancelled_order_alone() -> None:
    assert "CANCELLED" in FINAL_ORDER_STATES
    status = fold([CREATED, CANCELLED])
    assert sla_deadline_passed(status.to_json(), 300, T0 + timedelta(hours=1)) is None
    watch = SlaWatch(sla_s=60)
    watch.note(fold([CREATED]))
    watch.note(status)  # the same order, now cancelled: out of the index
    assert watch.due(T0 + timedelta(hours=1)) == []
    # an SLA message sent before the cancellation was folded changes neither state nor reason
    sla = ("SlaExceeded", {"order_id": ORDER, "deadline": T0 + timedelta(minutes=5)}, sla_event_id(ORDER))
    for events in itertools.permutations([CREATED, CANCELLED, sla]):
        flagged = fold(events)
        assert (flagged.state, flagged.reason) == (status.state, status.reason)


def test_cancelled_is_a_state_the_list_and_the_api_document_know() -> None:
    assert "CANCELLED" in ORDER_STATES
    states_asked, _, _ = _list_params({"state": "cancelled,STALLED"})
    assert states_asked == frozenset({"CANCELLED", "STALLED"})
    schemas = openapi_document()["components"]["schemas"]
    assert "CANCELLED" in str(schemas["OrderStatus"]["properties"]["state"])
    assert {"cancelled_at", "cancel_reason"} <= set(schemas["OrderStatus"]["properties"])
    assert {"compensation", "compensation_detail"} <= set(schemas["StepStatus"]["properties"])
    assert "dead_lettered" in str(schemas["StepStatus"]["properties"]["compensation"])
