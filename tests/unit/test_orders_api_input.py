"""Bad bodies to POST /orders get a 422 that says what is wrong, never a 500.

FastAPI's own validation handler echoes each bad value back; a number JSON cannot write
(`1e400` parses to infinity, `NaN`, `-Infinity`) made that response fail to encode (a 500)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services import registry
from services.orders.api import StatusClient, create_app
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
