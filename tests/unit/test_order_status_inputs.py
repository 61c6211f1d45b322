"""The order-status worker's plumbing without a broker: which message is which fold input, how a
message is applied to the table (duplicates, re-reads), alerts, and the cluster-wide merge."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest

from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.envelope import (
    CAUSATION_ID, CORRELATION_ID, EVENT_ID, EVENT_TYPE, TRACEPARENT, Envelope, trace_id_of,
)
from services.runtime.failure_notices import FailureNotice, NotANotice, read_notice
from services.runtime.topology import FAILURES
from streams.order_status.fold import Metrics, apply_event, count_and_alert, partition_of, status_headers
from streams.order_status.inputs import NotAnInput, failure_input, sla_input, sla_message
from streams.order_status.web import merge_listings

ORDER = "order-1"
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
CODEC = Codec(EmbeddedRegistry())
CREATED = {"order_id": ORDER, "customer_id": "c-1", "customer_email": "c@example.com", "currency": "EUR",
           "lines": [{"sku": "SKU-1", "quantity": 1, "unit_price": Decimal("5.00")}], "total": Decimal("5.00"),
           "created_at": T0}


def notice(group: str, attempt: int, kind: str = "retry", source: str = "orders.created",
           reason: str | None = None) -> FailureNotice:
    topic = f"{source}.{group}.dlt" if kind == "dlt" else f"{source}.{group}.retry.{min(attempt, 3)}"
    return FailureNotice(ORDER, group, source, topic, kind, attempt, "ev-created", "smtplib.SMTPServerDisconnected",
                         "Connection unexpectedly closed", reason, T0.isoformat())


def test_the_step_is_the_failing_groups_not_the_failed_events() -> None:
    # An OrderCreated that failed in the email group is the *email* step retrying.
    fold_input = failure_input(notice("email", 2))
    assert fold_input.event_type == "StepRetrying"
    assert fold_input.record == {"order_id": ORDER, "step": "email", "attempt": 2,
                                 "error": "SMTPServerDisconnected: Connection unexpectedly closed"}
    # its own id, stable for the same failure, never the original's (that is OrderCreated's)
    assert fold_input.event_id == "ev-created:email:retry:2"


def test_a_dead_letter_notice_carries_topic_and_reason() -> None:
    fold_input = failure_input(notice("invoice", 4, "dlt", "stock.reserved", "retries exhausted after 4 attempts"))
    assert fold_input.event_type == "StepDeadLettered"
    assert fold_input.record["step"] == "invoice" and fold_input.record["attempt"] == 4
    assert fold_input.record["reason"] == "stock.reserved.invoice.dlt: retries exhausted after 4 attempts"
    assert fold_input.event_id == "ev-created:invoice:dlt:4"


def test_a_notice_of_an_unknown_group_is_not_an_input() -> None:
    with pytest.raises(NotAnInput, match="shipping"):
        failure_input(notice("shipping", 1))


def test_a_notice_round_trips_and_anything_else_is_not_a_notice() -> None:
    dead = notice("email", 4, "dlt", reason="not retryable")
    assert read_notice(dead.to_bytes()) == dead
    fields = json.loads(dead.to_bytes())
    for broken in (b"", b"not json", b"[]", json.dumps({**fields, "kind": "parked"}).encode(),
                   json.dumps({**fields, "attempt": "4"}).encode(), json.dumps({**fields, "order_id": ""}).encode(),
                   json.dumps({k: v for k, v in fields.items() if k != "group"}).encode(),
                   json.dumps({**fields, "extra": 1}).encode()):
        with pytest.raises(NotANotice):
            read_notice(broken)


def test_sla_message_round_trip() -> None:
    fold_input = sla_input(sla_message(ORDER, T0))
    assert (fold_input.event_type, fold_input.record) == ("SlaExceeded", {"order_id": ORDER, "deadline": T0})
    assert fold_input.event_id == sla_input(sla_message(ORDER, T0 + timedelta(seconds=1))).event_id
    with pytest.raises(NotAnInput):
        sla_input(b"{}")


# -- apply_event with a dict as the table -----------------------------------------------------

def message(topic: str, offset: int, value: bytes, headers: dict[str, str], key: str = ORDER):
    return SimpleNamespace(
        key=key.encode(), value=value, headers={k: v.encode() for k, v in headers.items()},
        message=SimpleNamespace(topic=topic, partition=partition_of(key.encode()), offset=offset,
                                timestamp=T0.timestamp() + offset))


def created_message(offset: int, event_id: str = "ev-created"):
    headers = dict(Envelope(event_id, "OrderCreated", 1, ORDER).to_headers())
    return message("orders.created", offset, CODEC.encode("OrderCreated", CREATED),
                   {k: v.decode() for k, v in headers.items()})


def test_apply_event_writes_once_republishes_a_re_read_and_ignores_a_duplicate() -> None:
    table: dict = {}
    first = apply_event(created_message(5), CODEC, table)
    assert first is not None and not first.republish and first.before is None
    assert table[ORDER.encode()]["state"] == "PENDING"
    # the same message read again (a crash before the offset commit): written and published again
    again = apply_event(created_message(5), CODEC, table)
    assert again is not None and again.republish and again.status == first.status
    # the same event produced twice upstream (another offset): nothing
    assert apply_event(created_message(9), CODEC, table) is None


def test_the_published_status_is_a_child_of_the_event_that_caused_it() -> None:
    """The status keeps the cause's trace id (a new span), names it as its causation, and has an
    event id derived from the order and the cause: the same again when a re-read republishes it."""
    cause = created_message(5, event_id="ev-7")
    applied = apply_event(cause, CODEC, {})
    headers = {k: v.decode() for k, v in status_headers(applied.status, cause)}
    again = {k: v.decode() for k, v in status_headers(applied.status, cause)}

    assert trace_id_of(headers[TRACEPARENT]) == trace_id_of(cause.headers[TRACEPARENT].decode())
    assert headers[TRACEPARENT] != cause.headers[TRACEPARENT].decode()
    assert (headers[CAUSATION_ID], headers[CORRELATION_ID], headers[EVENT_TYPE]) == ("ev-7", ORDER, "OrderStatus")
    assert again[EVENT_ID] == headers[EVENT_ID] != "ev-7"


def test_apply_event_folds_a_failure_notice_into_the_groups_step() -> None:
    table: dict = {}
    applied = apply_event(message(FAILURES, 0, notice("email", 1).to_bytes(), {}), CODEC, table)
    assert applied is not None
    assert applied.status.steps["email"].state == "retrying"
    assert applied.status.steps["inventory"].state == "pending"  # not the OrderCreated's other readers


def test_apply_event_skips_what_it_cannot_read() -> None:
    table: dict = {}
    assert apply_event(message("orders.created", 0, b"not avro", {}), CODEC, table) is None
    assert apply_event(message(FAILURES, 0, b"not a notice", {}), CODEC, table) is None
    other_order = message(FAILURES, 1, replace(notice("email", 1), order_id="order-2").to_bytes(), {})
    assert apply_event(other_order, CODEC, table) is None  # its key is ORDER: not where order-2 lives
    wrong_key = message("orders.created", 1, CODEC.encode("OrderCreated", CREATED), {"event_id": "e"}, key="other")
    assert apply_event(wrong_key, CODEC, table) is None
    assert table == {}


def test_apply_event_skips_a_stock_adjustment_quietly(caplog) -> None:
    """stock.adjusted is an event topic the view reads, but keyed by SKU and with no order_id:
    skipped as an event type the view does not fold, before the key check could warn about it."""
    adjusted = {"sku": "SKU-1", "delta": 5, "available_after": 9, "reason": "delivery", "operator": "ops",
                "adjusted_at": T0}
    headers = {k: v.decode() for k, v in Envelope("ev-adjusted", "StockAdjusted", 1, "SKU-1").to_headers()}
    table: dict = {}
    with caplog.at_level("DEBUG", logger="orderpipe.order_status"):
        assert apply_event(message("stock.adjusted", 0, CODEC.encode("StockAdjusted", adjusted), headers, key="SKU-1"),
                           CODEC, table) is None
    assert table == {} and caplog.records == []


def test_alerts_are_counted_once_per_transition() -> None:
    table: dict = {}
    metrics = Metrics()
    dead = message(FAILURES, 0, notice("email", 4, "dlt", reason="retries exhausted after 4 attempts").to_bytes(), {})
    count_and_alert(apply_event(dead, CODEC, table), metrics)
    count_and_alert(apply_event(dead, CODEC, table), metrics)  # re-read: republished, no second alert
    sla = message("order-status-sla-exceeded", 0, sla_message(ORDER, T0), {})
    count_and_alert(apply_event(sla, CODEC, table, sla_topic="order-status-sla-exceeded"), metrics)
    assert (metrics.dead_lettered, metrics.sla_exceeded, metrics.republished, metrics.events_folded) == (1, 1, 1, 2)
    assert "orderpipe_order_status_sla_exceeded_total 1" in metrics.prometheus()
    assert table[ORDER.encode()]["state"] == "STALLED"


# -- the cluster-wide listing --------------------------------------------------------------------

def listing(partitions: list[int], *orders: tuple[str, str]) -> dict:
    statuses = [{"order_id": o, "updated_at": at} for o, at in orders]
    return {"partitions": partitions, "count": len(statuses), "statuses": statuses}


def test_merge_listings_needs_every_partition_exactly_once() -> None:
    a = listing([0, 1, 2], ("a", "2025-01-01T12:00:01+00:00"), ("b", "2025-01-01T12:00:03+00:00"))
    b = listing([3, 4, 5], ("c", "2025-01-01T12:00:02+00:00"))
    merged = merge_listings([a, b], 6, 2)
    assert merged["count"] == 3 and [s["order_id"] for s in merged["statuses"]] == ["b", "c"]  # newest first
    assert merge_listings([a], 6, 10) is None  # a worker's partitions are missing
    assert merge_listings([a, b, listing([2])], 6, 10) is None  # partition 2 answered twice


# -- GET /orders?state=&since= on the orders API ------------------------------------------------

class FakeStatusView:
    """What the orders API asks of the view; records the queries it receives."""

    def __init__(self) -> None:
        self.queries: list[dict] = []

    def list(self, state=None, since=None, limit=None) -> dict:
        self.queries.append({"state": state, "since": since, "limit": limit})
        if state == "BROKEN":
            raise ValueError("unknown state BROKEN")
        return {"count": 3, "statuses": [{"order_id": "o-2", "state": "FAILED"}], "workers": ["w1", "w2"]}


def test_orders_api_lists_orders_by_state_and_time(tmp_path) -> None:
    from fastapi.testclient import TestClient

    from services.orders.api import StatusClient, create_app
    from services.runtime.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'orders.db'}")
    view = FakeStatusView()
    try:
        client = TestClient(create_app(engine, CODEC, view))
        answer = client.get("/orders", params={"state": "FAILED,STALLED", "since": "1h", "limit": 1})
        assert answer.status_code == 200
        assert answer.json() == {"count": 3, "orders": [{"order_id": "o-2", "state": "FAILED"}]}
        assert view.queries == [{"state": "FAILED,STALLED", "since": "1h", "limit": 1}]
        assert client.get("/orders", params={"state": "BROKEN"}).status_code == 400
        unreachable = TestClient(create_app(engine, CODEC, StatusClient("http://127.0.0.1:9", timeout=1)))
        assert unreachable.get("/orders").status_code == 503
    finally:
        engine.dispose()
