"""Cancelling an order from the console (POST /orders/{id}/cancel, services/console/orders.py) on
the real broker and a real orders database (SQLite, then PostgreSQL), migrated as orders-api does:

- a viewer is not shown the form, and a viewer's POST is 403 with nothing cancelled;
- an operator without the confirmation gets 400, nothing cancelled;
- with it: 303 to the order's page, which shows "cancelled" at once; the `cancellations` row and
  exactly one OrderCancelled in the orders outbox (the same code as the orders API); the audit
  topic holds one "cancel" record with the console user's name, source "console", which
  `orderpipe dlt audit` and the console's audit log both show;
- a second cancel says "already cancelled" and writes no second OrderCancelled;
- an unknown order is 404.
"""

from __future__ import annotations

import json
import re
import uuid
from contextlib import contextmanager
from decimal import Decimal
from types import SimpleNamespace

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from conftest import settings_for
from console_server import csrf_of, serve_console, users
from console_server import logged_in as log_in
from services.cli.main import app as cli_app
from services.ops.audit import AuditLog, runs
from services.ops.broker import OpsKafka
from services.orders.model import LineItem, PlaceOrder
from services.orders.place import place_order
from services.orders.service import SERVICE
from services.orders.tables import cancellations, outbox
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.migrate import upgrade_database

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PASSWORDS = {"ada": "correct horse", "vic": "battery staple"}
CODEC = Codec(EmbeddedRegistry())
REQUEST = PlaceOrder(customer_id="c-1", customer_email="ada@example.com", currency="EUR",
                     lines=[LineItem(sku="SKU-1", quantity=2, unit_price=Decimal("24.90"))])


@pytest.fixture
def orders_engine(database_url, test_engine):
    engine = test_engine(database_url)
    upgrade_database(engine, SERVICE)
    return engine


@pytest.fixture
def console(kafka_bootstrap, database_url, orders_engine, tmp_path):
    settings = settings_for(kafka_bootstrap, data_dir=tmp_path / "data", orders_database_url=database_url)
    assert settings.database_url("orders") == database_url
    people = users(ada=("operator", PASSWORDS["ada"]), vic=("viewer", PASSWORDS["vic"]))
    with serve_console(settings, people) as url:  # no order-status view there
        yield SimpleNamespace(url=url, settings=settings, engine=orders_engine)


@contextmanager
def logged_in(console, name: str):
    with log_in(console.url, name, PASSWORDS[name]) as client:
        yield client


def cancelled_rows(engine) -> list:
    with engine.connect() as conn:
        return conn.execute(select(cancellations.c.order_id, cancellations.c.reason)).all()


def order_cancelled_events(engine, order_id: str) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.payload).where(outbox.c.aggregateid == order_id,
                                                           outbox.c.type == "OrderCancelled")).all()
    out = []
    for row in rows:
        decoded = CODEC.decode(row.payload)
        assert decoded.event_type == "OrderCancelled"
        out.append(decoded.record)
    return out


def cancel_records(settings, order_id: str) -> list[dict]:
    with OpsKafka(settings) as kafka:
        return [r for r in AuditLog(kafka).read() if r.get("action") == "cancel" and r.get("order_id") == order_id]


def test_an_operator_cancels_an_order_once_and_it_is_audited(console):
    order_id = place_order(console.engine, CODEC, REQUEST).order_id
    page_path = f"/orders/{order_id}"

    with logged_in(console, "vic") as viewer:
        page = viewer.get(page_path)
        assert page.status_code == 200 and "Cancel this order" not in page.text
        refused = viewer.post(f"{page_path}/cancel", data={"csrf": csrf_of(page.text), "confirm": "yes",
                                                           "reason": "viewer tries"})
        assert refused.status_code == 403 and "only operators may change anything" in refused.text
    assert cancelled_rows(console.engine) == [] and order_cancelled_events(console.engine, order_id) == []

    with logged_in(console, "ada") as operator:
        page = operator.get(page_path)
        assert page.status_code == 200 and "Cancel this order" in page.text
        form = page.text.split("<h2>Cancel this order</h2>", 1)[1].split("</form>", 1)[0]
        assert f'action="/orders/{order_id}/cancel"' in form and 'name="confirm" value="yes"' in form
        token = csrf_of(form)

        assert operator.post(f"{page_path}/cancel", data={"confirm": "yes"}).status_code == 403  # no CSRF token
        unconfirmed = operator.post(f"{page_path}/cancel", data={"csrf": token, "reason": "changed my mind"})
        assert unconfirmed.status_code == 400 and "not confirmed" in unconfirmed.text
        too_long = operator.post(f"{page_path}/cancel", data={"csrf": token, "confirm": "yes", "reason": "x" * 201})
        assert too_long.status_code == 400 and "reason" in too_long.text
        assert cancelled_rows(console.engine) == [] and order_cancelled_events(console.engine, order_id) == []
        assert cancel_records(console.settings, order_id) == []

        done = operator.post(f"{page_path}/cancel", data={"csrf": token, "confirm": "yes",
                                                          "reason": "  changed my mind  "})
        assert done.status_code == 303 and done.headers["location"] == page_path, done.text
        assert cancelled_rows(console.engine) == [(order_id, "changed my mind")]
        [event] = order_cancelled_events(console.engine, order_id)
        assert event["order_id"] == order_id and event["reason"] == "changed my mind"
        assert event["customer_email"] == "ada@example.com"

        after = operator.get(page_path)
        assert after.status_code == 200
        order_part = after.text.split("<h2>Order</h2>", 1)[1].split("</section>", 1)[0]
        assert "<td>cancelled</td>" in order_part and "(changed my mind)" in order_part
        assert "Cancel this order" not in after.text, "the form shows only while the order is not cancelled"

        [record] = cancel_records(console.settings, order_id)
        assert record["user"] == "ada" and record["source"] == "console" and record["outcome"] == "completed"
        assert record["reason"] == "changed my mind" and record["count"] == 1 and not record["already_cancelled"]
        assert record["host"] and record["at"]

        again = operator.post(f"{page_path}/cancel", data={"csrf": token, "confirm": "yes", "reason": "twice"})
        assert again.status_code == 200 and "already cancelled" in again.text and "nothing was done again" in again.text
        assert len(order_cancelled_events(console.engine, order_id)) == 1
        assert cancelled_rows(console.engine) == [(order_id, "changed my mind")]
        first, second = cancel_records(console.settings, order_id)
        assert second["already_cancelled"] and second["count"] == 0 and second["user"] == "ada"

        unknown = str(uuid.uuid4())
        missing = operator.post(f"/orders/{unknown}/cancel", data={"csrf": token, "confirm": "yes"})
        assert missing.status_code == 404 and f"has no order {unknown}" in missing.text
        assert cancel_records(console.settings, unknown) == []

        # The console's audit log shows the cancel as a run of its own, with the order id.
        audit_page = operator.get("/audit")
        assert audit_page.status_code == 200
        row = next(r for r in re.findall(r"<tr>(.*?)</tr>", audit_page.text) if first["run_id"] in r)
        assert "<td>cancel</td>" in row and "ada@" in row and "<td>console</td>" in row and order_id in row
        assert operator.get("/audit?all=1").status_code == 200

    with OpsKafka(console.settings) as kafka:
        shown = [r for r in runs(AuditLog(kafka).read()) if r.get("order_id") == order_id]
    assert [r["outcome"] for r in shown] == ["completed", "completed"]

    # `orderpipe dlt audit`, as an operator runs it: the table and --json.
    env = {"KAFKA_BOOTSTRAP_SERVERS": console.settings.kafka_bootstrap_servers, "COLUMNS": "250"}
    table = CliRunner().invoke(cli_app, ["dlt", "audit"], env=env)
    assert table.exit_code == 0, table.output
    assert first["run_id"] in table.stdout and "cancel" in table.stdout
    as_json = CliRunner().invoke(cli_app, ["dlt", "audit", "--json"], env=env)
    assert as_json.exit_code == 0, as_json.output
    lines = [json.loads(line) for line in as_json.stdout.splitlines() if line.strip()]
    assert {r["run_id"] for r in lines} >= {first["run_id"], second["run_id"]}


def test_the_cancel_of_an_order_the_orders_database_cannot_reach_is_a_one_line_503(console, monkeypatch):
    order_id = place_order(console.engine, CODEC, REQUEST).order_id
    from sqlalchemy.exc import OperationalError

    from services.console import orders as console_orders

    def down(*args, **kwargs):
        raise OperationalError("SELECT ...", None, RuntimeError("connection refused\n  (the server is down)"))

    monkeypatch.setattr(console_orders, "cancel_order", down)
    with logged_in(console, "ada") as operator:
        token = csrf_of(operator.get(f"/orders/{order_id}").text)
        answer = operator.post(f"/orders/{order_id}/cancel", data={"csrf": token, "confirm": "yes"})
    assert answer.status_code == 503
    problems = re.findall(r'<p class="error">(.*?)</p>', answer.text)
    assert problems == ["orders database: connection refused (the server is down)"], problems
    assert "Traceback" not in answer.text
    assert cancelled_rows(console.engine) == []
    [record] = cancel_records(console.settings, order_id)
    assert record["outcome"].startswith("failed: orders database") and record["count"] == 0


def test_a_customer_search_lists_every_order_with_one_line_when_the_view_is_away(console):
    """The customer search reads the orders database and asks the view for each order's state;
    with no view, each order is still listed (state "-") under one line that says why."""
    placed = [place_order(console.engine, CODEC, REQUEST).order_id for _ in range(3)]
    with logged_in(console, "vic") as viewer:
        page = viewer.get("/orders", params={"customer_id": "c-1"})
    assert page.status_code == 200
    assert set(re.findall(r'href="/orders/([0-9a-f-]{36})"', page.text)) == set(placed)
    problems = re.findall(r'<p class="error">(.*?)</p>', page.text)
    assert len(problems) == 1 and problems[0].startswith("order-status view:"), problems
