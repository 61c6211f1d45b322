"""`next_status`: the fold behind the order-status view, without Faust or Kafka."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.runtime.codec import Codec, EmbeddedRegistry
from streams.order_status.fold import STATUS_SCHEMA_VERSION, Metrics, fold_until_done, status_value
from streams.order_status.status import (
    MAX_APPLIED_EVENT_IDS,
    STEP_DEAD_LETTERED,
    STEP_RETRYING,
    STEPS,
    OrderStatus,
    UnknownEvent,
    matches,
    next_status,
    parse_since,
    redelivered,
    sla_deadline_passed,
    sla_event_id,
)

ORDER = "order-1"
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

CREATED = ("OrderCreated", {
    "order_id": ORDER, "customer_id": "c-1", "customer_email": "c@example.com", "currency": "EUR",
    "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": Decimal("5.00")}], "total": Decimal("10.00"),
    "created_at": T0,
}, "ev-created")
RESERVED = ("StockReserved", {"order_id": ORDER, "lines": [{"sku": "SKU-1", "quantity": 2}], "reserved_at": T0},
            "ev-reserved")
REJECTED = ("StockRejected", {
    "order_id": ORDER, "reason": "out of stock: SKU-1 (requested 2, available 1)",
    "missing": [{"sku": "SKU-1", "requested": 2, "available": 1}], "rejected_at": T0,
}, "ev-rejected")
EMAILED = ("ConfirmationEmailSent", {"order_id": ORDER, "message_id": "<m-1@orderpipe>", "recipient": "c@example.com",
                                     "sent_at": T0}, "ev-email")
INVOICED = ("InvoiceIssued", {"order_id": ORDER, "invoice_number": "INV-000042", "total": Decimal("10.00"),
                              "currency": "EUR", "pdf_path": "INV-000042.pdf", "issued_at": T0}, "ev-invoice")
RECORDED = ("OrderRecorded", {"order_id": ORDER, "units": 2, "revenue": Decimal("10.00"), "currency": "EUR",
                              "recorded_at": T0}, "ev-analytics")

RESERVED_ORDER = [CREATED, RESERVED, EMAILED, INVOICED, RECORDED]
REJECTED_ORDER = [CREATED, REJECTED, EMAILED, RECORDED]


def fold(events, start: OrderStatus | None = None) -> OrderStatus:
    status = start
    for i, (event_type, record, event_id) in enumerate(events):
        status = next_status(status, event_type, record, event_id, T0 + timedelta(seconds=i + 1))
    assert status is not None
    return status


def without_times(status: OrderStatus) -> dict:
    """What must not depend on arrival order: everything but timestamps and the id log's order."""
    data = status.model_dump(exclude={"created_at", "updated_at", "applied"})
    for step in data["steps"].values():
        step.pop("updated_at")
    data["applied_event_ids"] = sorted(status.applied_event_ids)
    return data


def test_reserved_order_completes_in_every_arrival_order() -> None:
    results = [fold(p) for p in itertools.permutations(RESERVED_ORDER)]
    assert len(results) == 120
    first = without_times(results[0])
    assert all(without_times(r) == first for r in results)
    status = results[0]
    assert status.state == "COMPLETED" and status.reason is None
    assert {name: s.state for name, s in status.steps.items()} == dict.fromkeys(STEPS, "done")
    assert status.steps["invoice"].detail == "INV-000042"
    assert all(s.attempts == 1 for s in status.steps.values())


def test_order_is_pending_until_every_step_is_done() -> None:
    status = fold([CREATED, RESERVED, EMAILED, INVOICED])
    assert status.state == "PENDING"
    assert status.steps["analytics"].state == "pending"
    assert fold([RECORDED], status).state == "COMPLETED"


def test_rejected_order_fails_with_reason_and_skips_invoice() -> None:
    for events in itertools.permutations(REJECTED_ORDER):
        status = fold(events)
        assert status.state == "FAILED"
        assert status.reason == "out of stock: SKU-1 (requested 2, available 1)"
        assert status.steps["inventory"].state == "failed"
        assert status.steps["inventory"].detail == status.reason
        assert status.steps["inventory"].last_error is None  # a rejection is an outcome, not an error
        assert status.steps["invoice"].state == "skipped"
        assert status.steps["email"].state == "done"
        assert status.steps["analytics"].state == "done"


def test_applying_an_event_twice_is_a_no_op() -> None:
    status = fold(RESERVED_ORDER[:3])
    for event_type, record, event_id in RESERVED_ORDER[:3]:
        again = next_status(status, event_type, record, event_id, T0 + timedelta(hours=1))
        assert again is status  # the agent uses identity to skip the table write and the publish


def test_replayed_step_under_a_new_event_id_changes_nothing_but_the_id_log() -> None:
    status = fold(RESERVED_ORDER)
    event_type, record, _ = EMAILED
    again = next_status(status, event_type, record, "ev-email-resent", T0 + timedelta(hours=1))
    assert again.steps == status.steps and again.state == "COMPLETED"
    assert again.applied_event_ids[-1] == "ev-email-resent"


def test_done_step_is_never_downgraded() -> None:
    # Contradictory input (an invoice, then a rejection) must not undo the issued invoice.
    status = fold([CREATED, INVOICED, REJECTED])
    assert status.steps["invoice"].state == "done"
    assert status.steps["invoice"].detail == "INV-000042"
    assert status == fold([CREATED, INVOICED, REJECTED]) and without_times(status) == without_times(
        fold([REJECTED, INVOICED, CREATED]))


def test_step_event_before_order_created_creates_the_status() -> None:
    status = fold([EMAILED])
    assert status.order_id == ORDER and status.state == "PENDING"
    assert status.steps["email"].state == "done"
    assert status.created_at == T0 + timedelta(seconds=1)  # first seen, until OrderCreated tells

    late = fold([CREATED], status)
    assert late.created_at == T0  # the order's own timestamp
    assert late.steps == status.steps
    assert late.applied_event_ids == ["ev-email", "ev-created"]


def test_order_created_alone_is_pending_with_every_step_pending() -> None:
    status = fold([CREATED])
    assert status.state == "PENDING" and status.created_at == T0
    assert {name: s.state for name, s in status.steps.items()} == dict.fromkeys(STEPS, "pending")


def test_applied_event_ids_are_bounded() -> None:
    status = fold([CREATED])
    event_type, record, _ = EMAILED
    for i in range(MAX_APPLIED_EVENT_IDS + 10):
        status = next_status(status, event_type, record, f"dup-{i}", T0)
    assert len(status.applied_event_ids) == MAX_APPLIED_EVENT_IDS
    assert status.applied_event_ids[-1] == f"dup-{MAX_APPLIED_EVENT_IDS + 9}"


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(UnknownEvent):
        next_status(None, "OrderShipped", {"order_id": ORDER}, "ev-x", T0)


def test_json_round_trip() -> None:
    status = fold(REJECTED_ORDER)
    data = status.to_json()
    assert data["state"] == "FAILED" and isinstance(data["updated_at"], str)
    assert OrderStatus.from_json(data) == status


def test_avro_record_matches_the_schema() -> None:
    codec = Codec(EmbeddedRegistry())
    status = fold(REJECTED_ORDER)
    decoded = codec.decode(status_value(codec, status))
    # the version the envelope names (STATUS_SCHEMA_VERSION), whatever the registry's latest is
    assert decoded.event_type == "OrderStatus" and decoded.schema_id == 11
    assert codec.registry.by_id(decoded.schema_id).version == STATUS_SCHEMA_VERSION == 2
    record = decoded.record
    assert (record["order_id"], record["state"], record["reason"]) == (ORDER, "FAILED", status.reason)
    steps = {s["step"]: s for s in record["steps"]}
    assert {name: s["state"] for name, s in steps.items()} == {
        "inventory": "failed", "email": "done", "invoice": "skipped", "analytics": "done"}
    assert steps["invoice"]["updated_at"] == status.steps["invoice"].updated_at
    assert steps["inventory"]["detail"] == status.reason and steps["inventory"]["attempts"] == 1
    assert all(s["compensation"] is None and s["compensation_detail"] is None for s in steps.values())


# -- the failure path: retry and dead-letter copies, read by the group's x-group header -----------

def failure(kind: str, step: str, attempt: int, error: str, reason: str | None = None):
    record = {"order_id": ORDER, "step": step, "attempt": attempt, "error": error}
    if kind == STEP_DEAD_LETTERED:
        record["reason"] = reason or f"orders.created.{step}.dlt: retries exhausted after {attempt} attempts"
    return (kind, record, f"ev-created:{step}:{'dlt' if kind == STEP_DEAD_LETTERED else 'retry'}:{attempt}")


EMAIL_RETRY_1 = failure(STEP_RETRYING, "email", 1, "SMTPServerDisconnected: closed")
EMAIL_RETRY_2 = failure(STEP_RETRYING, "email", 2, "TimeoutError: timed out")
EMAIL_DEAD = failure(STEP_DEAD_LETTERED, "email", 4, "SMTPServerDisconnected: closed again")


def test_retrying_step_then_success_completes_in_every_arrival_order_with_duplicates() -> None:
    # A retry copy can arrive after the success of the retried attempt (different topics).
    events = [CREATED, EMAIL_RETRY_1, EMAIL_RETRY_2, EMAILED, EMAIL_RETRY_1]
    results = {repr(without_times(fold([*p, RESERVED, INVOICED, RECORDED]))) for p in itertools.permutations(events)}
    assert len(results) == 1
    status = fold([*events, RESERVED, INVOICED, RECORDED])
    email = status.steps["email"]
    assert status.state == "COMPLETED"
    assert (email.state, email.failures, email.attempts) == ("done", 2, 3)
    assert email.last_error == "TimeoutError: timed out" and email.detail == "<m-1@orderpipe>"


def test_retrying_step_keeps_the_order_pending_with_attempts_and_last_error() -> None:
    status = fold([CREATED, RESERVED, EMAIL_RETRY_2, EMAIL_RETRY_1])  # the later attempt's error wins
    email = status.steps["email"]
    assert status.state == "PENDING" and status.reason is None
    assert (email.state, email.attempts, email.last_error) == ("retrying", 2, "TimeoutError: timed out")


def test_dead_lettered_step_stalls_the_order_until_a_replay_succeeds() -> None:
    stalled = fold([CREATED, RESERVED, INVOICED, RECORDED, EMAIL_RETRY_1, EMAIL_DEAD])
    email = stalled.steps["email"]
    assert stalled.state == "STALLED"
    assert stalled.reason == "email dead-lettered: SMTPServerDisconnected: closed again"
    assert (email.state, email.attempts) == ("dead_lettered", 4)
    assert email.detail == "orders.created.email.dlt: retries exhausted after 4 attempts"
    # an operator replays the dead letter; the e-mail goes out: a later success wins
    replayed = fold([EMAILED], stalled)
    assert replayed.state == "COMPLETED" and replayed.reason is None
    assert (replayed.steps["email"].state, replayed.steps["email"].attempts) == ("done", 5)
    # ... in whichever order the dead letter and the success are read
    assert without_times(fold([CREATED, RESERVED, INVOICED, RECORDED, EMAILED, EMAIL_DEAD, EMAIL_RETRY_1])) == \
        without_times(replayed)


def test_every_dead_lettered_step_is_named() -> None:
    invoice_dead = failure(STEP_DEAD_LETTERED, "invoice", 1, "PermanentError: no template", "orders.created.invoice.dlt: not retryable")
    status = fold([CREATED, EMAIL_DEAD, invoice_dead])
    assert status.state == "STALLED"
    assert status.reason == ("email dead-lettered: SMTPServerDisconnected: closed again; "
                             "invoice dead-lettered: PermanentError: no template")


def test_rejection_is_failed_even_with_a_dead_lettered_step() -> None:
    # FAILED is final: no replay can change a rejection; the dead letter stays visible on its step.
    for events in itertools.permutations([CREATED, REJECTED, EMAIL_DEAD]):
        status = fold(events)
        assert status.state == "FAILED" and status.reason == "out of stock: SKU-1 (requested 2, available 1)"
        assert status.steps["email"].state == "dead_lettered"


def test_failure_copies_applied_twice_are_no_ops() -> None:
    status = fold([CREATED, EMAIL_RETRY_1, EMAIL_DEAD])
    for event_type, record, event_id in (EMAIL_RETRY_1, EMAIL_DEAD):
        assert next_status(status, event_type, record, event_id, T0 + timedelta(hours=1)) is status


def test_failure_of_an_unknown_step_is_refused() -> None:
    kind, record, event_id = failure(STEP_RETRYING, "shipping", 1, "x")
    with pytest.raises(ValueError):
        next_status(None, kind, record, event_id, T0)


# -- SLA ---------------------------------------------------------------------------------------

SLA = ("SlaExceeded", {"order_id": ORDER, "deadline": T0 + timedelta(minutes=5)}, sla_event_id(ORDER))


def test_sla_stalls_an_unfinished_order_and_completion_clears_it() -> None:
    stalled = fold([CREATED, RESERVED, EMAIL_RETRY_1, SLA])
    assert stalled.state == "STALLED"
    assert stalled.reason == ("SLA exceeded (deadline 2025-01-01T12:05:00+00:00), not finished: "
                              "email retrying (1 failed attempt), invoice pending, analytics pending")
    assert stalled.sla_deadline == T0 + timedelta(minutes=5)
    later = fold([EMAILED, INVOICED], stalled)
    assert later.state == "STALLED" and later.reason.endswith("not finished: analytics pending")
    assert fold([RECORDED], later).state == "COMPLETED"


def test_sla_in_every_arrival_order() -> None:
    # A late SLA message (the timer saw the order unfinished, the last step came in meanwhile)
    # changes nothing for a completed order; an unfinished one is STALLED whatever the order.
    for events in itertools.permutations([CREATED, RESERVED, EMAILED, INVOICED, RECORDED, SLA]):
        assert fold(events).state == "COMPLETED"
    states = {fold(p).state for p in itertools.permutations([CREATED, REJECTED, SLA])}
    assert states == {"FAILED"}
    assert {without_times(fold(p))["reason"] for p in itertools.permutations([CREATED, EMAILED, SLA])} == {
        "SLA exceeded (deadline 2025-01-01T12:05:00+00:00), not finished: inventory pending, invoice pending, "
        "analytics pending"}


def test_dead_letter_reason_wins_over_sla() -> None:
    status = fold([CREATED, SLA, EMAIL_DEAD])
    assert status.state == "STALLED" and status.reason.startswith("email dead-lettered")
    assert status.sla_deadline is not None


def test_sla_deadline_passed_reads_the_stored_json() -> None:
    stored = fold([CREATED, RESERVED]).to_json()
    assert sla_deadline_passed(stored, 300, T0 + timedelta(seconds=299)) is None
    assert sla_deadline_passed(stored, 300, T0 + timedelta(seconds=300)) == T0 + timedelta(seconds=300)
    flagged = fold([SLA], fold([CREATED, RESERVED])).to_json()
    assert sla_deadline_passed(flagged, 300, T0 + timedelta(hours=1)) is None  # already flagged
    done = fold(RESERVED_ORDER).to_json()
    assert sla_deadline_passed(done, 300, T0 + timedelta(hours=1)) is None
    assert sla_deadline_passed(fold(REJECTED_ORDER[:2]).to_json(), 300, T0 + timedelta(hours=1)) is None
    dead = fold([CREATED, EMAIL_DEAD]).to_json()  # stalled by a dead letter, not yet by the SLA
    assert sla_deadline_passed(dead, 300, T0 + timedelta(hours=1)) == T0 + timedelta(seconds=300)


# -- redelivery: re-read of the same message vs. upstream duplicate --------------------------------

def test_redelivered_tells_a_re_read_from_a_duplicate() -> None:
    event_type, record, event_id = EMAILED
    status = next_status(None, event_type, record, event_id, T0, position="email.sent:3:17")
    assert redelivered(status, event_id, "email.sent:3:17")  # same message read again: republish
    assert not redelivered(status, event_id, "email.sent:3:42")  # same event produced twice: no-op
    assert not redelivered(status, "ev-other", "email.sent:3:17")
    assert not redelivered(None, event_id, "email.sent:3:17")


# -- queries -----------------------------------------------------------------------------------

def test_parse_since_accepts_durations_and_iso_times() -> None:
    now = T0
    assert parse_since("1h", now) == T0 - timedelta(hours=1)
    assert parse_since("30m", now) == T0 - timedelta(minutes=30)
    assert parse_since("90s", now) == T0 - timedelta(seconds=90)
    assert parse_since("2d", now) == T0 - timedelta(days=2)
    assert parse_since("2025-01-01T11:00:00+00:00", now) == T0 - timedelta(hours=1)
    assert parse_since("2025-01-01T11:00:00", now) == T0 - timedelta(hours=1)  # naive means UTC
    with pytest.raises(ValueError, match="duration"):
        parse_since("yesterday", now)


def test_matches_filters_on_state_and_last_change() -> None:
    stored = fold(REJECTED_ORDER).to_json()  # updated_at = T0 + 4 s
    assert matches(stored, None, None)
    assert matches(stored, frozenset({"FAILED", "STALLED"}), T0 + timedelta(seconds=4))
    assert not matches(stored, frozenset({"STALLED"}), None)
    assert not matches(stored, None, T0 + timedelta(seconds=5))


def test_sla_watch_offers_only_open_orders_past_their_deadline() -> None:
    import asyncio

    from streams.order_status.sla import SlaWatch

    watch = SlaWatch(sla_s=60)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    open_order = OrderStatus(order_id="a", created_at=t0, updated_at=t0)
    done = OrderStatus(order_id="b", state="COMPLETED", created_at=t0, updated_at=t0)
    watch.note(open_order)
    watch.note(done)
    assert watch.due(t0 + timedelta(seconds=59)) == []
    assert watch.due(t0 + timedelta(seconds=60)) == [b"a"]
    assert watch.due(t0 + timedelta(seconds=61)) == []  # handed out once; the fold re-adds what stays open

    flagged = open_order.model_copy(update={"sla_deadline": t0 + timedelta(seconds=60)})
    stored = [(b"a", flagged.to_json()), (b"b", done.to_json()),
              (b"c", OrderStatus(order_id="c", created_at=t0, updated_at=t0).to_json())]
    asyncio.run(watch.rebuild(iter(stored), {0, 1}))
    assert watch.partitions == {0, 1}
    assert watch.due(t0 + timedelta(hours=1)) == [b"c"]


# -- an event whose fold fails is kept, never skipped -------------------------------------------

class _Message:
    topic, partition, offset = "stock.reserved", 3, 41


class _Event:
    message = _Message()


def test_a_failed_fold_is_retried_until_it_succeeds() -> None:
    calls = []

    async def fold_one(event) -> None:
        calls.append(event)
        if len(calls) < 3:
            raise RuntimeError("changelog topic has 0 partitions")

    metrics = Metrics()
    asyncio.run(fold_until_done(fold_one, _Event(), lambda e: True, metrics, first_delay_s=0.001))
    assert len(calls) == 3 and metrics.fold_retries == 2
    assert "orderpipe_order_status_fold_retries_total 2" in metrics.prometheus()


def test_a_failed_fold_of_a_partition_this_worker_lost_is_left_to_its_new_owner() -> None:
    calls = []

    async def fold_one(event) -> None:
        calls.append(event)
        raise RuntimeError("boom")

    metrics = Metrics()
    asyncio.run(fold_until_done(fold_one, _Event(), lambda e: False, metrics, first_delay_s=0.001))
    assert len(calls) == 1 and metrics.fold_retries == 0
