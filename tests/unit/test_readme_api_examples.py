"""The README's "Try the API by hand" stays true: its example order is valid as pasted, its SKU
table is the catalog inventory seeds, and the messages it quotes are the ones the API gives."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

from services.inventory.catalog import CATALOG
from services.orders.idempotency import KeyReused
from services.orders.model import CancelOrder, OrderCancelAccepted, PlaceOrder

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SECTION = README.split("### Try the API by hand", 1)[1].split("\n### ", 1)[0]


def test_the_example_order_is_valid_as_pasted():
    body = re.search(r"-d '(\{.*?\})'", SECTION, re.S)[1]
    order = PlaceOrder.model_validate(json.loads(body))
    assert order.total == Decimal("61.80")
    assert "61.80" in SECTION  # the total the example answer shows
    assert {line.sku for line in order.lines} <= {item.sku for item in CATALOG if item.stocked}


def test_the_sku_table_is_the_catalog():
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([0-9.]+)(, never stocked)? \|$", SECTION, re.M)
    assert [(sku, name.strip(), Decimal(price), not never) for sku, name, price, never in rows] == \
        [(item.sku, item.name, item.unit_price, item.stocked) for item in CATALOG]


def test_the_quoted_refusal_is_the_apis():
    quoted = str(KeyReused("3f1c9a2e-order-1"))
    assert quoted.replace(" ", "") in re.sub(r"\s+", "", SECTION)


def test_the_cancel_example_is_valid_and_its_answer_has_the_apis_fields():
    body = re.search(r"/cancel \\\n.*?-d '(\{.*?\})'", SECTION, re.S)[1]
    assert CancelOrder.model_validate(json.loads(body)).reason == "ordered the wrong size"
    answer = json.loads(re.search(r'^(\{"order_id":.*"already_cancelled":false\})$', SECTION, re.M)[1])
    assert OrderCancelAccepted.model_validate(answer).already_cancelled is False
    assert set(answer) == set(OrderCancelAccepted.model_fields)
