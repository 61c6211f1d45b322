"""Bad bodies to POST /orders get a 422 that says what is wrong, never a 500.

FastAPI's own validation handler echoes each bad value back; a number JSON cannot write
(`1e400` parses to infinity, `NaN`, `-Infinity`) made that response fail to encode (a 500)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from services import registry
from services.orders.api import StatusClient, create_app
from services.orders.tables import orders
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.db import make_engine
from services.runtime.migrate import upgrade_database

BODY = ('{"customer_id": "c-1", "customer_email": "c@example.com", "currency": "EUR", '
        '"lines": [{"sku": "SKU-1", "quantity": 1, "unit_price": %s}]}')


@pytest.fixture
def client(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'orders.db'}")
    upgrade_database(engine, registry.service("orders"))
    with TestClient(create_app(engine, Codec(EmbeddedRegistry()), StatusClient("http://127.0.0.1:9", timeout=1)),
                    raise_server_exceptions=False) as c:
        yield c
    engine.dispose()


@pytest.mark.parametrize(("price", "echoed", "kind"), [
    ("1e400", "inf", "finite_number"), ("NaN", "nan", "finite_number"), ("-Infinity", "-inf", "finite_number"),
    ('"abc"', "abc", "decimal_parsing"),
])
def test_a_price_that_is_not_a_finite_number_is_a_422_naming_the_field(client, price, echoed, kind):
    answer = client.post("/orders", content=BODY % price, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", "lines", 0, "unit_price"]
    assert (error["type"], error["input"]) == (kind, echoed)


def test_a_body_over_the_limit_is_413_unread_whether_declared_or_streamed(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'orders.db'}")
    upgrade_database(engine, registry.service("orders"))
    app = create_app(engine, Codec(EmbeddedRegistry()), StatusClient("http://127.0.0.1:9", timeout=1),
                     max_body_bytes=2_048)
    too_big = (BODY % "1.00").replace('"c-1"', '"' + "c" * 3_000 + '"').encode()
    fits = BODY % "1.00"
    with TestClient(app) as client:
        declared = client.post("/orders", content=too_big, headers={"content-type": "application/json"})
        streamed = client.post("/orders", content=iter([too_big[:1_500], too_big[1_500:]]),
                               headers={"content-type": "application/json"})  # chunked: no Content-Length
        fits = client.post("/orders", content=fits, headers={"content-type": "application/json"})
    for answer in (declared, streamed):
        assert answer.status_code == 413
        assert answer.json()["detail"].startswith("request body too large: ")
        assert "at most 2048" in answer.json()["detail"]
    assert fits.status_code == 202
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(orders)).scalar_one() == 1  # only the one that fit


def test_the_largest_order_fits_the_event_and_a_larger_price_is_a_422_naming_the_field(client):
    """OrderCreated holds the total as an Avro decimal(18, 2); a total past it was a 500
    (schemathesis found it). The bounds of each field now keep every total within it."""
    def order(price: str, lines: int) -> str:
        items = ", ".join('{"sku": "SKU-%d", "quantity": 10000, "unit_price": "%s"}' % (n, price) for n in range(lines))
        return '{"customer_id": "c-1", "customer_email": "c@example.com", "currency": "EUR", "lines": [%s]}' % items

    largest = client.post("/orders", content=order("9999999999.99", 100), headers={"content-type": "application/json"})
    assert largest.status_code == 202, largest.text
    too_dear = client.post("/orders", content=order("10000000000", 1), headers={"content-type": "application/json"})
    assert too_dear.status_code == 422, too_dear.text
    [error] = too_dear.json()["detail"]
    assert error["loc"] == ["body", "lines", 0, "unit_price"] and "no more than 10 digits before the decimal point" in error["msg"]
