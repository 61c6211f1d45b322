"""`orderpipe stock add|list|history` on inventory's own database, SQLite and PostgreSQL:

- stock added by hand is what the inventory handler reserves from: an order for a SKU no one
  stocked is rejected before, reserved after;
- every addition has its audit row (who, host, why, the level after) and its StockAdjusted in
  inventory's outbox (the table its relay publishes, key = the SKU), in the same transaction: a
  failing write leaves neither, nor the new level; the relay publishes it to stock.adjusted;
- a Schema Registry that refuses or does not answer is one line, exit 1, and changes nothing;
- many additions at once to a new SKU add up exactly (no lost update, no duplicate SKU row);
- a bad SKU, quantity or reason is one line, exit 1 or 2, and changes nothing.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from sqlalchemy import Column, MetaData, Table, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from conftest import settings_for, unique_name
from services import registry
from services.cli.main import main
from services.inventory import adjust
from services.inventory.adjust import add_stock, adjustments, stock_levels
from services.inventory.handlers import HANDLERS, reserve_stock
from services.inventory.tables import metadata, outbox, stock_adjustments
from services.runtime import codec as codec_module
from services.runtime.codec import Codec, EmbeddedRegistry, RegistryRefused
from services.runtime.envelope import Envelope, headers_to_dict, new_event_id
from services.runtime.events import OrderCreated, OrderLine, StockAdjusted, StockRejected, StockReserved
from services.runtime.handler import Service, UnitOfWork
from services.runtime.kafka import make_producer
from services.runtime.migrate import service_metadata, upgrade_database
from services.runtime.outbox import OutboxRelay
from services.runtime.topology import STOCK_ADJUSTED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CODEC = Codec(EmbeddedRegistry())


@pytest.fixture
def inventory(database_url: str, test_engine, monkeypatch) -> Engine:
    monkeypatch.setenv("ORDERPIPE_INVENTORY_DATABASE_URL", database_url)
    monkeypatch.setenv("ORDERPIPE_OPERATOR", "ops-alice")
    for name in ("SCHEMA_REGISTRY_URL", "ORDERPIPE_SCHEMA_REGISTRY_URL"):  # the embedded registry
        monkeypatch.delenv(name, raising=False)
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


def count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def staged(engine: Engine) -> list[tuple[dict, StockAdjusted]]:
    """Inventory's outbox rows, in order, each with its payload decoded."""
    with engine.connect() as conn:
        rows = conn.execute(select(outbox).order_by(outbox.c.seq)).mappings().all()
    return [(dict(row), StockAdjusted.model_validate(CODEC.decode(row["payload"]).record)) for row in rows]


def utc(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)  # SQLite hands timestamps back naive


def test_stock_added_by_hand_is_reserved_from_and_audited(inventory, monkeypatch, capsys):
    assert isinstance(reserve(inventory, order_for("MY-SKU", 3)), StockRejected)

    code, out, err = orderpipe(monkeypatch, capsys, "stock", "add", "MY-SKU", "5", "--reason", "delivery 4711")
    assert code == 0, err
    assert out.strip() == ("MY-SKU: +5, 5 available (recorded for ops-alice: 'delivery 4711'); StockAdjusted queued "
                           "in inventory's outbox, published to stock.adjusted by inventory's relay")
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
        list(pool.map(lambda n: add_stock(inventory, "NEW-SKU", n, reason="race", operator="t", host="h", codec=CODEC),
                      range(1, 21)))
    assert stock_levels(inventory, "NEW-SKU") == [{"sku": "NEW-SKU", "available": 210, "reserved": 0}]
    assert sorted(a["available_after"] for a in adjustments(inventory, "NEW-SKU")) == \
        sorted({a["available_after"] for a in adjustments(inventory, "NEW-SKU")})  # each level once: serialized
    # one event per addition, staged in the order the additions committed: the levels rise with the seq
    events = [event for _, event in staged(inventory)]
    assert sorted((e.delta, e.available_after) for e in events) == \
        sorted((a["delta"], a["available_after"]) for a in adjustments(inventory, "NEW-SKU"))
    assert [e.available_after for e in events] == sorted(e.available_after for e in events)


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


# -- StockAdjusted, through inventory's outbox -------------------------------------------------


def test_an_addition_stages_its_stock_adjusted_in_the_outbox_inventorys_relay_publishes(inventory, monkeypatch,
                                                                                         capsys):
    # The table `stock add` writes is the one the inventory process's Service (and so its relay) reads.
    inventory_service = registry.service("inventory")
    assert Service(inventory_service.group, metadata, HANDLERS).outbox is outbox
    assert service_metadata(inventory_service).tables["outbox"] is outbox

    code, _, err = orderpipe(monkeypatch, capsys, "stock", "add", "MY-SKU", "5", "-r", "delivery 4711")
    assert code == 0, err
    [audit] = adjustments(inventory, "MY-SKU")
    [(row, event)] = staged(inventory)
    assert event == StockAdjusted(sku="MY-SKU", delta=5, available_after=5, reason="delivery 4711",
                                  operator="ops-alice", adjusted_at=event.adjusted_at)
    assert timedelta(0) <= utc(audit["adjusted_at"]) - event.adjusted_at < timedelta(milliseconds=1)  # millis
    assert (row["aggregatetype"], row["aggregateid"], row["type"], row["topic"], row["published_at"]) == \
        ("stock", "MY-SKU", "StockAdjusted", STOCK_ADJUSTED, None)
    headers = dict(row["headers"])
    assert (headers["event_type"], headers["schema_version"], headers["correlation_id"]) == \
        ("StockAdjusted", "1", "MY-SKU")


class InjectedFailure(OperationalError):
    """What a database that fails mid-transaction raises (a lost connection, a lock timeout)."""

    def __init__(self, statement: str):
        super().__init__(statement, None, RuntimeError(f"{statement} failed (injected)"))


@pytest.mark.parametrize("failing", ["audit row", "outbox row"])
def test_a_failing_write_leaves_neither_the_new_level_nor_its_audit_row_nor_its_event(inventory, monkeypatch,
                                                                                        failing):
    add_stock(inventory, "MY-SKU", 5, reason="first", operator="t", host="h", codec=CODEC)
    audit_rows_seen: list[int] = []
    with monkeypatch.context() as patch:
        if failing == "audit row":  # a real statement failing in the database: its table is missing
            patch.setattr(adjust, "stock_adjustments", Table("no_such_table", MetaData(),
                                                              *(Column(c.name, c.type) for c in stock_adjustments.c)))
        else:
            def fail(conn, table, codec, event, envelope):
                audit_rows_seen.append(conn.execute(select(func.count()).select_from(stock_adjustments)).scalar_one())
                raise InjectedFailure("INSERT INTO outbox")

            patch.setattr(adjust, "add_event", fail)
        with pytest.raises(DBAPIError):
            add_stock(inventory, "MY-SKU", 7, reason="second", operator="t", host="h", codec=CODEC)
    assert audit_rows_seen == ([] if failing == "audit row" else [2]), "the outbox write must come after the audit row"
    assert stock_levels(inventory, "MY-SKU") == [{"sku": "MY-SKU", "available": 5, "reserved": 0}]
    assert count(inventory, stock_adjustments) == 1
    assert [event.reason for _, event in staged(inventory)] == ["first"]

    # Control: unpatched, the same call stores all three, so the above is the rollback's doing.
    add_stock(inventory, "MY-SKU", 7, reason="second", operator="t", host="h", codec=CODEC)
    assert stock_levels(inventory, "MY-SKU")[0]["available"] == 12
    assert [(e.reason, e.available_after) for _, e in staged(inventory)] == [("first", 5), ("second", 12)]


@pytest.mark.parametrize("refused", [True, False], ids=["refused", "not-answering"])
def test_a_schema_registry_that_refuses_or_does_not_answer_is_one_line_and_changes_nothing(
        inventory, monkeypatch, capsys, refused):
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", "http://registry.example:8081")

    class NotAnswering:
        def version(self, event_type, version):
            raise ConnectionError("connection refused")

    def codec_from_settings(settings):
        assert settings.schema_registry_url == "http://registry.example:8081"
        if refused:
            raise RegistryRefused("the Schema Registry at http://registry.example:8081 refused the login: "
                                  "Unauthorized (HTTP 401; check SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO)")
        return Codec(NotAnswering())

    monkeypatch.setattr(codec_module, "codec_from_settings", codec_from_settings)
    code, _, err = orderpipe(monkeypatch, capsys, "stock", "add", "MY-SKU", "5", "-r", "delivery 4711")
    expected = ("error: the Schema Registry at http://registry.example:8081 refused the login" if refused else
                "error: the Schema Registry at http://registry.example:8081 did not register StockAdjusted "
                "(ConnectionError); nothing was changed")
    assert code == 1 and err.startswith(expected) and len(err.strip().splitlines()) == 1, err
    assert "nothing was changed" in err
    assert stock_levels(inventory, "MY-SKU") == []
    assert count(inventory, stock_adjustments) == count(inventory, outbox) == 0


def test_inventorys_relay_publishes_the_addition_to_stock_adjusted_keyed_by_sku(kafka_bootstrap, inventory,
                                                                                monkeypatch, capsys):
    sku = unique_name("SKU")  # the broker is the session's: other runs' additions may be on the topic
    code, _, err = orderpipe(monkeypatch, capsys, "stock", "add", sku, "3", "-r", "delivery 4712")
    assert code == 0, err
    [(row, event)] = staged(inventory)

    # What the inventory process's relay thread runs (services/runtime/service_main.py: start_relay).
    relay = OutboxRelay(inventory, outbox, make_producer(settings_for(kafka_bootstrap)), name="inventory")
    assert relay.publish_batch() == 1 and relay.backlog() == 0

    message = read_published(kafka_bootstrap, STOCK_ADJUSTED, row["id"])
    assert message.key() == sku.encode()
    decoded = CODEC.decode(message.value())
    assert decoded.event_type == "StockAdjusted" and StockAdjusted.model_validate(decoded.record) == event
    headers = headers_to_dict(message.headers())
    assert (headers["event_type"], headers["correlation_id"]) == ("StockAdjusted", sku)


def read_published(bootstrap: str, topic: str, event_id: str, timeout_s: float = 30.0):
    """The message of `topic` whose event_id header is `event_id` (read from the beginning, no group joined)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("reader"),
                         "enable.auto.commit": False, "isolation.level": "read_committed", "log_level": 0})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in consumer.consume(500, 0.2):
                if not message.error() and headers_to_dict(message.headers()).get("event_id") == event_id:
                    return message
    finally:
        consumer.close()
    raise AssertionError(f"no message with event_id {event_id} on {topic} within {timeout_s} s")
