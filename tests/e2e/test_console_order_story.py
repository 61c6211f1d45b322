"""The console's orders pages (services/console/orders.py) over real HTTP, on the whole pipeline as
`orderpipe up` starts it: one order placed, completed, then cancelled and compensated by every
service; the console reads it where it lives (the view, the services' databases, every topic,
the invoice folder, the SMTP sink's maildir).

- search by state (the view) and by customer (the orders database) list the order;
- the order's page shows its events in time order, from every topic: OrderCreated, StockReserved,
  OrderCancelled and one StepCompensated per compensating service;
- its invoice and credit note PDFs are served; a path outside its documents is 404;
- the confirmation and cancellation mails are shown from the maildir;
- a bad `since` is a one-line problem, not a 500; without a session every page goes to the login.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import httpx
import pytest

from console_server import serve_console, users
from services.pipeline.demo import _final_state
from services.pipeline.stack import Stack
from services.runtime.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PASSWORD = "battery staple"


def _wait(client: httpx.Client, order_id: str, done, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    view: dict = {}
    while time.monotonic() < deadline:
        answer = client.get(f"/orders/{order_id}")
        if answer.status_code == 200:
            view = answer.json()
            if done(view):
                return view
        time.sleep(0.3)
    raise AssertionError(f"order {order_id} did not settle in {timeout:g} s: {view}")


def test_an_orders_search_and_its_page_show_everything_the_pipeline_knows(tmp_path: Path, stack_broker: str):
    data_dir = tmp_path / "data"
    customer = f"customer-{uuid.uuid4().hex[:8]}"
    email = f"{customer}@example.com"
    with Stack(Settings(data_dir=data_dir), data_dir=data_dir, broker=stack_broker) as info:
        with httpx.Client(base_url=info.api_url, timeout=10) as api:
            placed = api.post("/orders", json={"customer_id": customer, "customer_email": email, "currency": "EUR",
                                               "lines": [{"sku": "SKU-001", "quantity": 2, "unit_price": "24.90"}]})
            assert placed.status_code == 202, placed.text
            order_id = placed.json()["order_id"]
            # completed first (invoice and confirmation mail issued), then cancelled: every service undoes its part
            _wait(api, order_id, lambda v: _final_state(order_id, v, None) == "COMPLETED")
            assert api.post(f"/orders/{order_id}/cancel", json={"reason": "changed my mind"}).status_code == 202
            _wait(api, order_id, lambda v: _final_state(order_id, v, None) == "CANCELLED")

        settings = Settings(KAFKA_BOOTSTRAP_SERVERS=info.bootstrap_servers, data_dir=info.data_dir,
                            status_url=info.status_url, log_json=False)
        with serve_console(settings, users(vic=("viewer", PASSWORD)), settings.status_url) as url:
            with httpx.Client(base_url=url, timeout=60) as anonymous:
                for path in ("/orders", f"/orders/{order_id}", f"/orders/{order_id}/documents/INV-000001.pdf"):
                    answer = anonymous.get(path)
                    assert answer.status_code == 303 and answer.headers["location"] == f"/login?next={path}"

            with httpx.Client(base_url=url, timeout=60) as client:
                login = client.post("/login", data={"name": "vic", "password": PASSWORD, "next": "/"})
                assert login.status_code == 303 and login.headers["location"] == "/"

                by_state = client.get("/orders", params={"state": "CANCELLED", "since": "1h"})
                assert by_state.status_code == 200 and f'href="/orders/{order_id}"' in by_state.text
                by_customer = client.get("/orders", params={"customer_id": customer})
                assert f'href="/orders/{order_id}"' in by_customer.text and "CANCELLED" in by_customer.text
                bad = client.get("/orders", params={"since": "yesterday-ish"})
                assert bad.status_code == 200 and 'class="error"' in bad.text and "since" in bad.text
                to_page = client.get("/orders", params={"order_id": order_id})
                assert to_page.status_code == 303 and to_page.headers["location"] == f"/orders/{order_id}"

                started = time.monotonic()
                page = client.get(f"/orders/{order_id}")
                took = time.monotonic() - started
                assert page.status_code == 200, page.text
                text = page.text
                assert 'class="error"' not in text, re.findall(r'<p class="error">(.*?)</p>', text)
                assert customer in text and email in text and "changed my mind" in text
                timeline = text.split("<h2>Timeline</h2>", 1)[1].split("</section>", 1)[0]
                events = re.findall(r"<tr><td>[^<]*</td><td>([^<]*)</td><td>([^<]*)</td>", timeline)
                kinds = [event for topic, event in events if topic != "orders.status"]
                for event in ("OrderCreated", "StockReserved", "OrderCancelled"):
                    assert kinds.count(event) == 1, kinds
                assert kinds.count("StepCompensated") == 4, kinds
                assert kinds.index("OrderCreated") < kinds.index("StockReserved") < kinds.index("OrderCancelled") \
                    < kinds.index("StepCompensated"), kinds
                assert "OrderStatus" in [event for _, event in events]  # the view's own records, too
                times = re.findall(r"<tr><td>(\d{4}-\d\d-\d\d [\d:.]+)</td>", timeline)
                assert times == sorted(times) and len(times) == len(events)

                links = re.findall(rf'href="(/orders/{order_id}/documents/[^"]+)"', text)
                assert len(links) == 2, links  # the invoice and the credit note
                for link in links:
                    pdf = client.get(link)
                    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
                    assert pdf.headers["content-type"] == "application/pdf"
                assert f"Your order {order_id}</h3>" in text
                assert f"Your order {order_id} is cancelled</h3>" in text

                for evil in (f"/orders/{order_id}/documents/..%2F..%2Fcluster.json",
                             f"/orders/{order_id}/documents/cluster.json",
                             f"/orders/{order_id}/documents/..%2Forders.db",
                             f"/orders/not-{order_id}/documents/{links[0].rsplit('/', 1)[1]}"):
                    assert client.get(evil).status_code == 404, evil

                unknown = client.get("/orders/no-such-order")
                assert unknown.status_code == 200 and "has no order no-such-order" in unknown.text
                assert took < 20, f"the order page took {took:.1f} s"
