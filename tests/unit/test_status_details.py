"""Details of the order-status fold that the status API and operators read.

Promises pinned here:
- a retry/dead-letter copy becomes a change of the step named in the record, with the attempt
  number as its failure count, the copy's `reason` (the DLT topic and why) as the step's detail,
  and its `error` (or "no error recorded") as the step's last error; attempt 0 and unknown steps
  are refused with a message naming the bad value;
- a rejection without a reason still reads "stock rejected";
- arrival order does not matter for details of the same rank: the smallest detail and, at an
  equal failure count, the smallest error win; each step carries the time it last changed;
- the SLA flag keeps the earliest deadline whichever SlaExceeded arrives first, and the SLA
  reason spells "1 failed attempt" / "2 failed attempts";
- `unfinished_steps`, `to_avro` (the published record) and `parse_since` with an explicit offset.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from streams.order_status import status as status_module
from streams.order_status.status import (
    SLA_EXCEEDED,
    STEP_DEAD_LETTERED,
    STEP_RETRYING,
    StepChange,
    UnknownEvent,
    next_status,
    parse_since,
)

ORDER = "order-9"
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def created():
    return next_status(None, "OrderCreated", {"order_id": ORDER, "created_at": T0}, "ev-created", T0)


def fold(status, *events):
    for i, (event_type, record, event_id) in enumerate(events):
        status = next_status(status, event_type, {"order_id": ORDER, **record}, event_id, at(i + 1))
    return status


# -- failure copies ---------------------------------------------------------------------------
# `STEP_EVENTS` binds the translators once, at import; these tests build them afresh as well, so
# that the translation of a copy (not only the fold around it) is what they check.

@pytest.mark.parametrize("kind, state", [(STEP_RETRYING, "retrying"), (STEP_DEAD_LETTERED, "dead_lettered")])
def test_a_failure_copy_becomes_a_change_of_the_named_step(kind, state):
    translate = status_module._failure(state)
    record = {"order_id": ORDER, "step": "invoice", "attempt": 3, "error": "OperationalError: locked",
              "reason": "orders.created.invoice.dlt: retries exhausted after 3 attempts"}
    assert translate(record) == [StepChange("invoice", state, record["reason"], 3, "OperationalError: locked")]
    assert translate({"order_id": ORDER, "step": "email", "attempt": 1}) == [
        StepChange("email", state, None, 1, "no error recorded")]
    assert translate({"order_id": ORDER, "step": "email", "attempt": "2", "error": ""}) == [
        StepChange("email", state, None, 2, "no error recorded")]


@pytest.mark.parametrize("record, message", [
    ({"step": "billing", "attempt": 1}, "unknown step 'billing'"),
    ({"step": "email", "attempt": 0}, "attempt must be >= 1, got 0"),
])
def test_a_failure_copy_with_a_bad_step_or_attempt_is_refused(record, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        status_module._failure("retrying")({"order_id": ORDER, **record})
    with pytest.raises(ValueError, match=f"^{message}$"):
        next_status(created(), STEP_DEAD_LETTERED, {"order_id": ORDER, **record}, "ev-bad", at(1))


def test_a_dead_lettered_step_shows_the_dlt_reason_attempts_and_error():
    dlt = "orders.created.invoice.dlt: retries exhausted after 1 attempts"
    status = fold(created(), (STEP_DEAD_LETTERED, {"step": "invoice", "attempt": 1, "reason": dlt}, "ev-d"))
    invoice = status.steps["invoice"]
    assert (invoice.state, invoice.detail, invoice.failures, invoice.last_error) == (
        "dead_lettered", dlt, 1, "no error recorded")
    assert invoice.updated_at == at(1)
    assert status.reason == "invoice dead-lettered: no error recorded"


# -- same-rank details and errors: order-independent -----------------------------------------

def test_equal_rank_details_keep_the_smallest_whatever_the_arrival_order():
    a = (STEP_DEAD_LETTERED, {"step": "email", "attempt": 4, "error": "E", "reason": "a: first topic"}, "ev-a")
    b = (STEP_DEAD_LETTERED, {"step": "email", "attempt": 4, "error": "E", "reason": "b: second topic"}, "ev-b")
    none = (STEP_DEAD_LETTERED, {"step": "email", "attempt": 4, "error": "E"}, "ev-n")
    for events in ([a, b], [b, a], [a, none], [none, a], [b, none, a]):
        assert fold(created(), *events).steps["email"].detail == "a: first topic", events


def test_at_an_equal_failure_count_the_smallest_error_wins_whatever_the_arrival_order():
    x = (STEP_RETRYING, {"step": "email", "attempt": 2, "error": "A: refused"}, "ev-x")
    y = (STEP_RETRYING, {"step": "email", "attempt": 2, "error": "B: timed out"}, "ev-y")
    older = (STEP_RETRYING, {"step": "email", "attempt": 1, "error": "0: first"}, "ev-o")
    for events in ([x, y], [y, x], [older, y, x], [y, older]):
        email = fold(created(), *events).steps["email"]
        expected = "B: timed out" if "ev-x" not in [e[2] for e in events] else "A: refused"
        assert (email.failures, email.last_error) == (2, expected), events


def test_a_step_records_when_it_last_changed():
    status = fold(created(), ("StockReserved", {}, "ev-r"), ("ConfirmationEmailSent", {"message_id": "<m>"}, "ev-e"))
    assert status.steps["inventory"].updated_at == at(1)
    assert status.steps["email"].updated_at == at(2)
    assert status.steps["invoice"].updated_at is None


def test_a_rejection_without_a_reason_still_says_stock_rejected():
    status = fold(created(), ("StockRejected", {"reason": ""}, "ev-rej"))
    assert (status.state, status.reason) == ("FAILED", "stock rejected")
    assert status.steps["inventory"].detail == "stock rejected"
    assert status.steps["invoice"].state == "skipped"


# -- SLA --------------------------------------------------------------------------------------

def test_the_earliest_sla_deadline_is_kept_in_either_arrival_order():
    early = (SLA_EXCEEDED, {"deadline": at(300)}, "sla-1")
    late = (SLA_EXCEEDED, {"deadline": at(600)}, "sla-2")
    for events in ([early, late], [late, early]):
        status = fold(created(), *events)
        assert status.sla_deadline == at(300)
        assert status.reason.startswith(f"SLA exceeded (deadline {at(300).isoformat()})")


def test_the_sla_reason_counts_failed_attempts_in_words():
    status = fold(created(),
                  (STEP_RETRYING, {"step": "email", "attempt": 2, "error": "E"}, "ev-r2"),
                  (STEP_RETRYING, {"step": "invoice", "attempt": 1, "error": "E"}, "ev-i1"),
                  (SLA_EXCEEDED, {"deadline": at(300)}, "sla"))
    assert status.reason == (f"SLA exceeded (deadline {at(300).isoformat()}), not finished: inventory pending, "
                             "email retrying (2 failed attempts), invoice retrying (1 failed attempt), "
                             "analytics pending")


# -- read side --------------------------------------------------------------------------------

def test_unknown_events_are_refused_by_name():
    with pytest.raises(UnknownEvent, match="^the status view does not fold 'OrderShipped' events$"):
        next_status(None, "OrderShipped", {"order_id": ORDER}, "ev-x", T0)


def test_unfinished_steps_lists_what_is_still_open():
    status = fold(created(), ("StockRejected", {"reason": "out of stock"}, "ev-rej"),
                  (STEP_RETRYING, {"step": "email", "attempt": 1, "error": "E"}, "ev-r"))
    assert status.unfinished_steps() == ["email", "analytics"]


def test_the_published_record_carries_each_step_last_error():
    status = fold(created(), (STEP_RETRYING, {"step": "email", "attempt": 1, "error": "SMTP: closed"}, "ev-r"))
    steps = {s["step"]: s for s in status.to_avro()["steps"]}
    assert steps["email"] == {"step": "email", "state": "retrying", "attempts": 1, "last_error": "SMTP: closed",
                              "detail": None, "updated_at": at(1), "compensation": None,
                              "compensation_detail": None}
    assert steps["invoice"]["last_error"] is None


def test_parse_since_keeps_an_explicit_offset():
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_since("2025-03-01T10:00:00+02:00", now) == datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
    assert parse_since("2025-03-01T10:00:00+02:00", now).utcoffset() == timezone(timedelta(hours=2)).utcoffset(None)


# -- step events, as the services declare them ----------------------------------------------------
# `STEP_EVENTS` is built from the declarations at import; these build it afresh, so that the
# translation itself (not only the fold around it) is what they check.

def test_each_declared_step_event_becomes_its_changes():
    outcomes = status_module._outcomes(status_module.STEP_DECLARATIONS)
    assert set(outcomes) == {"StockReserved", "StockRejected", "ConfirmationEmailSent", "InvoiceIssued",
                             "OrderRecorded"}
    assert outcomes["StockReserved"]({"order_id": ORDER}) == [StepChange("inventory", "done", None)]
    assert outcomes["StockRejected"]({"order_id": ORDER, "reason": "out of stock: SKU-1"}) == [
        StepChange("inventory", "failed", "out of stock: SKU-1"), StepChange("invoice", "skipped", None)]
    assert outcomes["ConfirmationEmailSent"]({"order_id": ORDER, "message_id": "<m-1>"}) == [
        StepChange("email", "done", "<m-1>")]
    assert outcomes["InvoiceIssued"]({"order_id": ORDER, "invoice_number": "INV-000001"}) == [
        StepChange("invoice", "done", "INV-000001")]
    assert outcomes["OrderRecorded"]({"order_id": ORDER, "units": 2}) == [StepChange("analytics", "done", None)]


def test_a_failed_step_without_its_detail_names_the_event_and_a_done_one_stays_blank():
    from services.runtime.declaration import StatusStep

    outcomes = status_module._outcomes({
        "payment": StatusStep(done={"PaymentCaptured": "reference"}, failed={"PaymentDeclinedByBank": "why"}),
        "shipping": StatusStep(done={"ParcelShipped": None}, skipped_on=("PaymentDeclinedByBank",)),
        "gift-wrap": StatusStep(done={"GiftWrapped": None}, skipped_on=("GiftWrapCancelled",)),  # named by it alone
    })
    assert outcomes["GiftWrapCancelled"]({"order_id": ORDER}) == [StepChange("gift-wrap", "skipped", None)]
    assert outcomes["PaymentDeclinedByBank"]({"order_id": ORDER}) == [
        StepChange("payment", "failed", "payment declined by bank"), StepChange("shipping", "skipped", None)]
    assert outcomes["PaymentCaptured"]({"order_id": ORDER}) == [StepChange("payment", "done", None)]
    assert outcomes["PaymentCaptured"]({"order_id": ORDER, "reference": "r-7"}) == [StepChange("payment", "done", "r-7")]
    assert outcomes["ParcelShipped"]({"order_id": ORDER, "reference": "r-7"}) == [StepChange("shipping", "done", None)]


def test_a_since_reaching_back_before_the_year_1_is_a_value_error_not_an_overflow():
    """`GET /status/?since=99999999999d` was a 500 (OverflowError); now the view answers 400."""
    from datetime import UTC, datetime

    import pytest

    from streams.order_status.status import parse_since

    with pytest.raises(ValueError, match="reaches back before the year 1"):
        parse_since("99999999999d", datetime(2026, 1, 1, tzinfo=UTC))
