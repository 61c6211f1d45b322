"""`next_status`: the fold behind the order-status view, without Faust or Kafka."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.runtime.codec import Codec, EmbeddedRegistry
from streams.order_status.status import (
    MAX_APPLIED_EVENT_IDS,
    STEPS,
    OrderStatus,
    UnknownEvent,
    next_status,
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
    data = status.model_dump(exclude={"created_at", "updated_at", "applied_event_ids"})
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
        assert status.steps["inventory"].last_error == status.reason
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
    decoded = codec.decode(codec.encode("OrderStatus", status.to_avro()))
    assert decoded.event_type == "OrderStatus" and decoded.schema_id == 7
    record = decoded.record
    assert (record["order_id"], record["state"], record["reason"]) == (ORDER, "FAILED", status.reason)
    steps = {s["step"]: s for s in record["steps"]}
    assert {name: s["state"] for name, s in steps.items()} == {
        "inventory": "failed", "email": "done", "invoice": "skipped", "analytics": "done"}
    assert steps["invoice"]["updated_at"] == status.steps["invoice"].updated_at
    assert steps["inventory"]["last_error"] == status.reason
