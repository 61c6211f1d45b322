"""Bad bodies to POST /orders get a 422 that says what is wrong, never a 500.

FastAPI's own validation handler echoes each bad value back; a number JSON cannot write
(`1e400` parses to infinity, `NaN`, `-Infinity`) made that response fail to encode (a 500)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import func, select

from services import registry
from services.orders.api import StatusClient, create_app
from services.orders.model import EMAIL_PATTERN, PlaceOrder
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


# Every character up to CJK (where the spaces end), and a few past it.
ADDRESS_CHARACTERS = [chr(c) for c in range(0x3100)] + ["\ufeff", "\uff20", "\U0001f600"]


def _accepted_by_javascript(pattern: str, candidates: list[str]) -> list[bool]:
    """The document's reading of the pattern: JSON Schema patterns are ECMA-262 regular expressions."""
    node = shutil.which("node")
    assert node, "Node.js is part of the machine (README, Requirements): the document's regex dialect needs it"
    script = ("const [p, xs] = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "const re = new RegExp(p, 'u'); process.stdout.write(JSON.stringify(xs.map(x => re.test(x))));")
    done = subprocess.run([node, "-e", script], input=json.dumps([pattern, candidates]), capture_output=True,
                          text=True, check=True, timeout=60)
    return json.loads(done.stdout)


def test_the_address_rule_means_the_same_to_the_document_the_server_and_the_mail_headers():
    """Schemathesis sent an address with U+0085 that the document's pattern (ECMA-262 `\\s`)
    allowed and the server's (Rust `\\s`) refused; and one with U+001C passed the server, then
    broke the mail's To: header (Python splits header lines there), so its order's mail was
    dead-lettered. Each character, inside an address: the server, the document and the mail
    agree on it."""
    addresses = [f"a{ch}b@example.com" for ch in ADDRESS_CHARACTERS]
    assert PlaceOrder.model_json_schema()["properties"]["customer_email"]["pattern"] == EMAIL_PATTERN  # the document's

    def by_server(address: str) -> bool:
        try:
            PlaceOrder.model_validate({"customer_id": "c", "customer_email": address, "currency": "EUR",
                                       "lines": [{"sku": "A", "quantity": 1, "unit_price": 1}]})
        except ValidationError:
            return False
        return True

    accepted = [by_server(a) for a in addresses]
    assert accepted == _accepted_by_javascript(EMAIL_PATTERN, addresses)
    refused = {ch for ch, ok in zip(ADDRESS_CHARACTERS, accepted, strict=True) if not ok}
    assert {"@", " ", "\t", "\x1c", "\x85", "\xa0", "\u2028", "\u3000", "\ufeff"} <= refused
    assert {"ë", "例", "+", ".", "\U0001f600"}.isdisjoint(refused)
    for ch, address in zip(ADDRESS_CHARACTERS, addresses, strict=True):
        if ch not in refused:
            assert len(address.splitlines()) == 1, repr(ch)
