"""`orderpipe stock add|list|history` on inventory's own database, SQLite and PostgreSQL:

- stock added by hand is what the inventory handler reserves from: an order for a SKU no one
  stocked is rejected before, reserved after;
- every addition has its audit row (who, host, why, the level after), in the same transaction;
- many additions at once to a new SKU add up exactly (no lost update, no duplicate SKU row);
- a bad SKU, quantity or reason is one line, exit 1 or 2, and changes nothing.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from services import registry
from services.cli.main import main
from services.inventory.adjust import add_stock, adjustments, stock_levels
from services.inventory.handlers import reserve_stock
from services.inventory.tables import stock_adjustments
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.events import OrderCreated, OrderLine, StockRejected, StockReserved
from services.runtime.handler import UnitOfWork
from services.runtime.migrate import upgrade_database

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def inventory(database_url: str, test_engine, monkeypatch) -> Engine:
    monkeypatch.setenv("ORDERPIPE_INVENTORY_DATABASE_URL", database_url)
    monkeypatch.setenv("ORDERPIPE_OPERATOR", "ops-alice")
    engine = test_engine(database_url)
    upgrade_database(engine, registry.service("inventory"))
    return engine


def orderpipe(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["orderpipe", *args])
    with pytest.raises(SystemExit) as done:
        main()
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def order_for(sku: str, quantity: int) -> OrderCreated:
    return OrderCreated(order_id=f"o-{sku}-{quantity}", customer_id="c", customer_email="a@b.c", currency="EUR",
                        lines=[OrderLine(sku=sku, quantity=quantity, unit_price=Decimal("1.00"))],
                        total=Decimal(quantity), created_at=datetime.now(UTC))


def reserve(engine: Engine, order: OrderCreated):
    with engine.begin() as conn:
        [result] = reserve_stock(order, UnitOfWork(conn, Envelope(new_event_id(), "OrderCreated", 2, order.order_id), "inventory"))
    return result


def test_stock_added_by_hand_is_reserved_from_and_audited(inventory, monkeypatch, capsys):
    assert isinstance(reserve(inventory, order_for("MY-SKU", 3)), StockRejected)

    code, out, err = orderpipe(monkeypatch, capsys, "stock", "add", "MY-SKU", "5", "--reason", "delivery 4711")
    assert code == 0, err
    assert out.strip() == "MY-SKU: +5, 5 available (recorded for ops-alice: 'delivery 4711')"
    assert isinstance(reserve(inventory, order_for("MY-SKU", 3)), StockReserved)
    assert stock_levels(inventory, "MY-SKU") == [{"sku": "MY-SKU", "available": 2, "reserved": 3}]

    code, out, _ = orderpipe(monkeypatch, capsys, "stock", "add", "MY-SKU", "10", "-r", "second pallet")
    assert code == 0 and "12 available" in out
    [first, second] = adjustments(inventory, "MY-SKU")
    assert (first["delta"], first["available_after"], first["reason"], first["operator"]) == \
        (5, 5, "delivery 4711", "ops-alice")
    assert (second["delta"], second["available_after"], second["reason"]) == (10, 12, "second pallet")
    assert first["host"] and first["adjusted_at"] <= second["adjusted_at"]

    code, out, _ = orderpipe(monkeypatch, capsys, "stock", "history", "--sku", "MY-SKU", "--json")
    assert code == 0 and [line.count('"delta"') for line in out.splitlines()] == [1, 1]
    code, out, _ = orderpipe(monkeypatch, capsys, "stock", "list", "--json")
    assert code == 0 and '{"sku": "MY-SKU", "available": 12, "reserved": 3}' in out.splitlines()


def test_additions_at_once_to_a_new_sku_add_up_exactly(inventory):
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: add_stock(inventory, "NEW-SKU", n, reason="race", operator="t", host="h"),
                      range(1, 21)))
    assert stock_levels(inventory, "NEW-SKU") == [{"sku": "NEW-SKU", "available": 210, "reserved": 0}]
    assert sorted(a["available_after"] for a in adjustments(inventory, "NEW-SKU")) == \
        sorted({a["available_after"] for a in adjustments(inventory, "NEW-SKU")})  # each level once: serialized


@pytest.mark.parametrize("args, expected", [
    (("bad sku", "5", "-r", "x"), "error: SKU 'bad sku' is not one an order can name"),
    (("SKU-001", "5", "-r", " "), "error: --reason must say why"),
    (("SKU-001", "2000000000", "-r", "x"), "error: at most 1,000,000,000 units at a time"),
])
def test_a_bad_addition_is_one_line_and_changes_nothing(inventory, monkeypatch, capsys, args, expected):
    code, _, err = orderpipe(monkeypatch, capsys, "stock", "add", *args)
    assert code == 1 and err.startswith(expected) and len(err.strip().splitlines()) == 1, err
    with inventory.connect() as conn:
        assert conn.execute(select(func.count()).select_from(stock_adjustments)).scalar_one() == 0
