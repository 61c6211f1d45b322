"""`Idempotency-Key` on POST /orders, on SQLite and PostgreSQL (no broker: nothing is published).

- the same key with the same order (however it is written) returns the first answer, marked
  `Idempotent-Replayed: true`, and never places a second order or a second OrderCreated;
- the same key with another order is a 422 that says so, and changes nothing;
- many requests with one key at once: exactly one order, every answer names it;
- an expired key places a new order; expired keys are deleted;
- a key that is not printable ASCII (1 to 255 characters) is a 422.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Table, func, select, update
from sqlalchemy.engine import Engine

from services.orders.api import StatusClient, create_app
from services.orders.tables import idempotency_keys, orders, outbox
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.db import utcnow
from test_outbox_promises import orders_engine  # noqa: F401 - a fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ORDER = {"customer_id": "c-1", "customer_email": "ada@example.com", "currency": "EUR",
         "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": "24.90"}]}


@pytest.fixture
def api(orders_engine: Engine) -> TestClient:
    app = create_app(orders_engine, Codec(EmbeddedRegistry()), StatusClient("http://127.0.0.1:9", timeout=1))
    with TestClient(app) as client:
        yield client


def count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def post(api: TestClient, body: dict, key: str | None):
    return api.post("/orders", json=body, headers={"Idempotency-Key": key} if key is not None else {})


def test_the_same_key_and_order_get_the_first_answer_and_place_one_order(api, orders_engine):
    first = post(api, ORDER, "key-1")
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    # the same order written differently: another field order, the price as a number
    rewritten = {"lines": [{"unit_price": 24.9, "quantity": 2, "sku": "SKU-1"}], "currency": "EUR",
                 "customer_email": "ada@example.com", "customer_id": "c-1"}
    for again in (post(api, ORDER, "key-1"), post(api, rewritten, "key-1")):
        assert again.status_code == 202 and again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["Location"] == first.headers["Location"] == f"/orders/{first.json()['order_id']}"
    assert count(orders_engine, orders) == count(orders_engine, outbox) == 1

    another_key = post(api, ORDER, "key-2")
    no_key = post(api, ORDER, None)
    assert len({first.json()["order_id"], another_key.json()["order_id"], no_key.json()["order_id"]}) == 3
    assert count(orders_engine, orders) == count(orders_engine, outbox) == 3
    assert count(orders_engine, idempotency_keys) == 2


def test_the_same_key_with_another_order_is_refused_and_changes_nothing(api, orders_engine):
    assert post(api, ORDER, "key-1").status_code == 202
    other = {**ORDER, "lines": [{"sku": "SKU-1", "quantity": 3, "unit_price": "24.90"}]}
    refused = post(api, other, "key-1")
    assert refused.status_code == 422
    assert refused.json()["detail"] == ("Idempotency-Key 'key-1' was already used with a different request; "
                                        "use a new key for a new request")
    assert count(orders_engine, orders) == count(orders_engine, outbox) == 1


def test_requests_with_one_key_at_once_place_exactly_one_order(api, orders_engine):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(api, ORDER, "key-race"), range(16)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["order_id"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") != "true" for a in answers) == 1
    assert count(orders_engine, orders) == count(orders_engine, outbox) == 1


def test_an_expired_key_places_a_new_order_and_expired_keys_are_deleted(api, orders_engine):
    first = post(api, ORDER, "key-1").json()["order_id"]
    with orders_engine.begin() as conn:  # as if the key's time (24 h by default) had passed
        conn.execute(update(idempotency_keys).values(expires_at=utcnow() - timedelta(seconds=1)))
    second = post(api, ORDER, "key-1")
    assert second.status_code == 202 and second.json()["order_id"] != first
    assert "Idempotent-Replayed" not in second.headers
    assert post(api, ORDER, "key-1").json()["order_id"] == second.json()["order_id"]  # the new answer is kept
    assert count(orders_engine, orders) == 2 and count(orders_engine, idempotency_keys) == 1


@pytest.mark.parametrize("key", ["", "with space", "x" * 256, "caf\u00e9"])
def test_a_key_that_is_not_printable_ascii_is_refused(api, orders_engine, key):
    refused = api.post("/orders", json=ORDER, headers={"Idempotency-Key": key.encode("utf-8")})
    assert refused.status_code == 422, refused.text
    assert "Idempotency-Key" in refused.text
    assert count(orders_engine, orders) == 0
