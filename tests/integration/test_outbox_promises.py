"""README promises about the orders outbox that no other test pins down, on SQLite and PostgreSQL.

- "one transaction: orders row + outbox row" / "an order answered with 202 is never lost": when
  the outbox write fails after the order row was inserted, neither row stays, and the HTTP API
  does not answer 202.
- `ORDERPIPE_OUTBOX_RETENTION_HOURS`: "Published outbox rows are deleted this long after
  publication ... Unpublished rows are never deleted."

No broker is needed: the order is never published, and retention only touches the database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Table, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from services import registry
from services.orders import place
from services.orders.api import StatusClient, create_app
from services.orders.model import LineItem, PlaceOrder
from services.orders.tables import orders, outbox
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.events import OrderRecorded
from services.runtime.migrate import upgrade_database
from services.runtime.outbox import OutboxRelay, add_event

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CODEC = Codec(EmbeddedRegistry())
REQUEST = PlaceOrder(customer_id="c-1", customer_email="ada@example.com", currency="EUR",
                     lines=[LineItem(sku="SKU-1", quantity=2, unit_price=Decimal("24.90"))])


class InjectedOutboxFailure(OperationalError):
    """What a database that fails mid-transaction raises (a lost connection, a lock timeout)."""

    def __init__(self, message: str):
        super().__init__("INSERT INTO outbox ...", None, RuntimeError(message))


def count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


@pytest.fixture
def orders_engine(database_url: str, test_engine) -> Engine:
    """The orders database, migrated as `orders-api` migrates it on start."""
    engine = test_engine(database_url)
    upgrade_database(engine, registry.service("orders"))
    return engine


@pytest.fixture
def failing_outbox_write(monkeypatch) -> list[int]:
    """Makes the outbox write of `place_order` fail. Before it raises it notes how many order
    rows its own transaction sees, which proves the order insert had already happened."""
    seen_orders: list[int] = []

    def fail(conn, table, codec, event, envelope):
        seen_orders.append(conn.execute(select(func.count()).select_from(orders)).scalar_one())
        raise InjectedOutboxFailure("outbox insert failed (injected)")

    monkeypatch.setattr(place, "add_event", fail)
    return seen_orders


# -- 1. the order row and its OrderCreated outbox row are written atomically -------------------


def test_an_order_whose_outbox_write_fails_is_not_stored(orders_engine: Engine, failing_outbox_write, monkeypatch):
    """Promise: the order row and its OrderCreated outbox row are one transaction ("Either both
    are committed ... or neither is"). The outbox write fails after the order insert: the error
    reaches the caller and neither table keeps a row."""
    with pytest.raises(InjectedOutboxFailure):
        place.place_order(orders_engine, CODEC, REQUEST)
    assert failing_outbox_write == [1], "the injected failure must come after the order insert"
    assert count(orders_engine, orders) == 0, "the order row outlived its failed outbox write"
    assert count(orders_engine, outbox) == 0

    # Control: with the real outbox write the same call stores exactly one of each, so the
    # empty tables above are the rollback's doing, not a test that looks in the wrong place.
    monkeypatch.undo()
    event = place.place_order(orders_engine, CODEC, REQUEST)
    with orders_engine.connect() as conn:
        assert conn.execute(select(orders.c.order_id)).scalars().all() == [event.order_id]
        assert conn.execute(select(outbox.c.aggregateid, outbox.c.type)).all() == [(event.order_id, "OrderCreated")]


def test_post_orders_does_not_accept_an_order_whose_outbox_write_fails(orders_engine: Engine, failing_outbox_write):
    """Promise: `POST /orders` answers 202 only once the order and its outbox row are durably
    recorded. When the outbox write fails the API must not answer 202, and nothing is stored."""
    app = create_app(orders_engine, CODEC, StatusClient("http://127.0.0.1:9", timeout=1))
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/orders", json=REQUEST.model_dump(mode="json"))
    assert answer.status_code != 202
    assert "Location" not in answer.headers
    # What the client gets: 503 with what happened and that retrying is safe, no traceback
    assert answer.status_code == 503
    assert answer.json()["detail"].startswith("the order could not be stored (database unavailable)")
    assert answer.headers["Retry-After"] == "1"
    assert "Traceback" not in answer.text and "outbox insert failed" not in answer.text
    assert failing_outbox_write == [1]
    assert count(orders_engine, orders) == 0
    assert count(orders_engine, outbox) == 0


# -- 2. outbox retention never deletes unpublished rows ----------------------------------------


def stage(engine: Engine, table: Table, *, created_at: datetime | None = None,
          published_at: datetime | None = None) -> str:
    """One OrderRecorded in the outbox as a handler's transaction writes it, then given the
    creation and publication times of an older row."""
    order_id = f"o-{new_event_id()[:8]}"
    event = OrderRecorded(order_id=order_id, units=1, revenue=Decimal("1.00"), currency="EUR",
                          recorded_at=datetime.now(UTC))
    envelope = Envelope(new_event_id(), "OrderRecorded", OrderRecorded.schema_version, order_id)
    with engine.begin() as conn:
        add_event(conn, table, CODEC, event, envelope)
        values = {k: v for k, v in {"created_at": created_at, "published_at": published_at}.items() if v is not None}
        if values:
            conn.execute(update(table).where(table.c.id == envelope.event_id).values(**values))
    return envelope.event_id


def test_outbox_retention_deletes_only_rows_published_before_the_retention(runtime_outbox):
    """Promise (ORDERPIPE_OUTBOX_RETENTION_HOURS): published outbox rows are deleted once they were
    published longer ago than the retention; rows published more recently stay, and unpublished
    rows are never deleted, however old."""
    engine, table = runtime_outbox
    now = datetime.now(UTC)
    long_ago = now - timedelta(days=30)
    old_published = [stage(engine, table, created_at=now - timedelta(hours=26), published_at=now - timedelta(hours=25))
                     for _ in range(3)]
    recent_published = [stage(engine, table, created_at=long_ago, published_at=now - timedelta(hours=1))
                        for _ in range(2)]
    unpublished = [stage(engine, table, created_at=long_ago) for _ in range(3)] + [stage(engine, table)]

    relay = OutboxRelay(engine, table, producer=None, retention=timedelta(hours=24))
    assert relay.cleanup() == len(old_published)

    with engine.connect() as conn:
        left = dict(conn.execute(select(table.c.id, table.c.published_at)).all())
    assert sorted(left) == sorted(recent_published + unpublished)
    assert all(left[i] is None for i in unpublished)
    assert relay.backlog() == len(unpublished)

    assert relay.cleanup() == 0, "a second cleanup found more to delete"
    with engine.connect() as conn:
        assert sorted(conn.execute(select(table.c.id)).scalars()) == sorted(recent_published + unpublished)
