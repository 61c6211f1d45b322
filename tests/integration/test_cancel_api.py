"""POST /orders/{order_id}/cancel on SQLite and PostgreSQL (no broker: the OrderCancelled is
asserted in the outbox the relay publishes from).

- a cancel is recorded with its OrderCancelled in one transaction and answered 202;
- a second cancel (or many at once) cancels nothing again: 200 with the first cancellation;
- an unknown order is 404, a bad body 422, and neither writes anything;
- with an `Idempotency-Key` the same request gets the first answer, another request is 422.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from services.orders.api import StatusClient, create_app
from services.orders.tables import cancellations, outbox
from services.runtime.codec import Codec, EmbeddedRegistry
from test_outbox_promises import orders_engine  # noqa: F401 - a fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CODEC = Codec(EmbeddedRegistry())
ORDER = {"customer_id": "c-7", "customer_email": "grace@example.com", "currency": "EUR",
         "lines": [{"sku": "SKU-1", "quantity": 1, "unit_price": "5.00"}]}


@pytest.fixture
def api(orders_engine: Engine) -> TestClient:
    app = create_app(orders_engine, CODEC, StatusClient("http://127.0.0.1:9", timeout=1))
    with TestClient(app) as client:
        yield client


def placed(api: TestClient) -> str:
    answer = api.post("/orders", json=ORDER)
    assert answer.status_code == 202
    return answer.json()["order_id"]


def cancel(api: TestClient, order_id: str, body: dict | None = None, key: str | None = None):
    return api.post(f"/orders/{order_id}/cancel", json=body, headers={"Idempotency-Key": key} if key else {})


def cancelled_events(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        payloads = conn.execute(select(outbox.c.payload).where(outbox.c.type == "OrderCancelled")
                                .order_by(outbox.c.seq)).scalars().all()
    return [CODEC.decode(p).record for p in payloads]


def test_a_cancel_is_recorded_with_its_event_and_answered_202(api, orders_engine):
    order_id = placed(api)

    answer = cancel(api, order_id, {"reason": "ordered the wrong size"})

    assert answer.status_code == 202 and answer.headers["Location"] == f"/orders/{order_id}"
    body = answer.json()
    assert (body["order_id"], body["reason"], body["already_cancelled"]) == (order_id, "ordered the wrong size", False)
    [event] = cancelled_events(orders_engine)
    assert (event["order_id"], event["customer_id"], event["customer_email"], event["reason"]) == \
        (order_id, "c-7", "grace@example.com", "ordered the wrong size")
    shown = api.get(f"/orders/{order_id}").json()  # the view does not answer here: the order's own record
    assert shown["cancelled"] == {"cancelled_at": body["cancelled_at"], "reason": "ordered the wrong size"}


def test_a_second_cancel_cancels_nothing_again(api, orders_engine):
    order_id = placed(api)
    first = cancel(api, order_id).json()

    again = cancel(api, order_id, {"reason": "really"})

    assert again.status_code == 200
    assert again.json() == {**first, "already_cancelled": True}  # the first cancellation, its reason (none)
    assert len(cancelled_events(orders_engine)) == 1


def test_cancels_at_once_cancel_once(api, orders_engine):
    order_id = placed(api)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: cancel(api, order_id), range(16)))

    assert sorted(a.status_code for a in answers) == [200] * 15 + [202]
    assert len({a.json()["cancelled_at"] for a in answers}) == 1
    assert len(cancelled_events(orders_engine)) == 1


def test_an_unknown_order_or_a_bad_body_is_refused_and_writes_nothing(api, orders_engine):
    unknown = cancel(api, "no-such-order")
    assert unknown.status_code == 404 and unknown.json() == {"detail": "order no-such-order not found"}

    order_id = placed(api)
    for body in ({"reason": ""}, {"reason": "x" * 201}, {"why": "typo"}):
        assert cancel(api, order_id, body).status_code == 422, body
    with orders_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(cancellations)).scalar_one() == 0
    assert cancelled_events(orders_engine) == []


def test_the_same_idempotency_key_gets_the_first_answer_and_another_request_a_422(api, orders_engine):
    order_id, other_order = placed(api), placed(api)
    first = cancel(api, order_id, {"reason": "duplicate order"}, key="cancel-1")
    assert first.status_code == 202

    replayed = cancel(api, order_id, {"reason": "duplicate order"}, key="cancel-1")
    assert replayed.status_code == 202 and replayed.json() == first.json()
    assert replayed.headers["Idempotent-Replayed"] == "true"

    for refused in (cancel(api, order_id, {"reason": "something else"}, key="cancel-1"),
                    cancel(api, other_order, {"reason": "duplicate order"}, key="cancel-1")):
        assert refused.status_code == 422
        assert "already used with a different request" in refused.json()["detail"]
    assert [e["order_id"] for e in cancelled_events(orders_engine)] == [order_id]


def test_cancels_with_one_key_at_once_all_get_the_first_answer(api, orders_engine):
    order_id = placed(api)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: cancel(api, order_id, {"reason": "twice"}, key="cancel-race"), range(16)))

    assert {a.status_code for a in answers} == {202}
    assert len({a.text for a in answers}) == 1
    assert sum("Idempotent-Replayed" not in a.headers for a in answers) == 1
    assert len(cancelled_events(orders_engine)) == 1
