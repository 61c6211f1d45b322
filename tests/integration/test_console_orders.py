"""The console's order page (services/console/orders.py) on the real broker, without the pipeline:
messages keyed by an order id in its topics' partitions (an event the codec cannot read, a retry
copy and a dead letter with the runtime's failure headers) make its timeline; everything else it
reads is away (no order-status view, no databases), and each part says so in one line while the
timeline still shows. The whole pipeline's story is tests/e2e/test_console_orders.py.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import httpx
import pytest

from conftest import settings_for
from console_server import serve_console, users
from reading import delivered
from services import registry
from services.ops.broker import OpsKafka
from services.runtime.failure_headers import (H_ATTEMPT, H_DUE_AT, H_EXC_MESSAGE, H_EXC_TYPE, H_GROUP, H_REASON)
from streams.order_status.fold import partition_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PASSWORD = "battery staple"


@pytest.fixture
def console(kafka_bootstrap, tmp_path):
    settings = settings_for(kafka_bootstrap, data_dir=tmp_path / "data")  # no database there
    with serve_console(settings, users(vic=("viewer", PASSWORD))) as url:  # no view there
        yield SimpleNamespace(url=url, settings=settings)


def test_the_timeline_shows_retries_and_dead_letters_and_each_missing_part_says_why(console):
    order_id = str(uuid.uuid4())
    group = registry.group("email")
    source = "orders.created"
    due = time.time() + 30
    # Whole seconds an hour ago: inside every topic's retention. Stamped in 1970 they were, and
    # Apache Kafka's retention check (every 5 minutes) deleted them before the page read them
    # when the test ran late in a loaded pass.
    base = (int(time.time()) - 3600) * 1000
    with OpsKafka(console.settings) as kafka:
        producer = kafka.producer()
        producer.produce(source, key=order_id.encode(), value=b"not avro", timestamp=base + 1_000)
        producer.produce(group.retry_topic(source, 1), key=order_id.encode(), value=b"not avro", timestamp=base + 2_000,
                         headers=[(H_GROUP, b"email"), (H_ATTEMPT, b"1"), (H_EXC_TYPE, b"SMTPServerDisconnected"),
                                  (H_EXC_MESSAGE, b"<script>alert(1)</script>"), (H_DUE_AT, f"{due:.3f}".encode())])
        producer.produce(group.dlt_topic(source), key=order_id.encode(), value=b"not avro", timestamp=base + 3_000,
                         headers=[(H_GROUP, b"email"), (H_ATTEMPT, b"4"), (H_EXC_TYPE, b"SMTPRecipientsRefused"),
                                  (H_EXC_MESSAGE, b"550 no such user"),
                                  (H_REASON, b"retries exhausted after 4 attempts")])
        producer.produce(source, key=b"another-order", value=b"x", timestamp=base + 1_500)  # maybe the same partition
        delivered(producer)
    assert partition_of(order_id.encode(), 6) in range(6)

    with httpx.Client(base_url=console.url, timeout=60) as client:
        assert client.get(f"/orders/{order_id}").status_code == 303
        login = client.post("/login", data={"name": "vic", "password": PASSWORD, "next": "/"})
        assert login.status_code == 303
        page = client.get(f"/orders/{order_id}")
        assert page.status_code == 200, page.text
        text = page.text
        problems = re.findall(r'<p class="error">(.*?)</p>', text)
        assert any(p.startswith("orders database:") for p in problems), problems
        assert any(p.startswith("order-status view:") and "not answering" in p for p in problems), problems
        assert any(p.startswith("invoice database:") for p in problems), problems
        assert any(p.startswith("email database:") for p in problems), problems
        assert not any(p.startswith("Kafka") for p in problems), problems

        timeline = text.split("<h2>Timeline</h2>", 1)[1].split("</section>", 1)[0]
        rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>",
                          timeline)
        assert [topic for _, topic, *_ in rows] == [source, group.retry_topic(source, 1), group.dlt_topic(source)]
        assert all(event == "undecodable" for _, _, event, _, _ in rows)
        assert rows[0][0] == datetime.fromtimestamp(base / 1000 + 1, UTC).strftime("%Y-%m-%d %H:%M:%S.000")
        assert rows[1][4].startswith("retry 1 in email: SMTPServerDisconnected: &lt;script&gt;alert(1)&lt;/script&gt;, due ")
        assert "<script>alert" not in text
        assert rows[2][4] == ("dead-lettered in email: retries exhausted after 4 attempts: "
                              "SMTPRecipientsRefused: 550 no such user")
        assert "another-order" not in timeline

        assert client.get(f"/orders/{order_id}/documents/INV-000001.pdf").status_code == 404
        search = client.get("/orders", params={"state": "CANCELLED"})
        assert search.status_code == 200 and "order-status view:" in search.text
        bad = client.get("/orders", params={"customer_id": "c-1", "since": "soon"})
        assert bad.status_code == 200 and 'class="error"' in bad.text and "since must be" in bad.text


def test_the_timeline_reads_from_the_order_s_placing_time_on_and_misses_nothing_after_it(kafka_bootstrap):
    """An order page reads each topic from the order's `created_at` less the clock-skew margin
    (the broker's time index), not the topic's whole history: on Apache Kafka a message stamped
    before that is not read at all; on any broker none at or after it is missed (Tansu's time
    index answers the first offset, so there the whole partition is read, as before)."""
    from conftest import broker_plan
    from services.console.orders import CLOCK_SKEW_MARGIN, read_timeline

    order_id = str(uuid.uuid4())
    # Placed 20 minutes ahead (Kafka accepts timestamps up to an hour ahead), so every message
    # other tests wrote to these shared partitions is stamped before the margin: the time index
    # answers the first message at or after a time, and one of theirs, stamped now, would
    # otherwise be that answer for a partition where it precedes this test's older-stamped one.
    placed = datetime.now(UTC) + timedelta(minutes=20)
    placed_ms = int(placed.timestamp() * 1000)
    before_margin = placed_ms - int(CLOCK_SKEW_MARGIN.total_seconds() * 1000) - 60_000
    inside_margin = placed_ms - 60_000  # a relay whose clock is a minute behind the API's
    settings = settings_for(kafka_bootstrap)
    group = registry.group("inventory")
    stamped = {("orders.created", before_margin), ("orders.created", inside_margin),
               ("orders.cancelled", placed_ms + 5_000), (group.retry_topic("orders.created", 1), placed_ms + 9_000)}
    with OpsKafka(settings) as kafka:
        producer = kafka.producer()
        for topic, ts in sorted(stamped, key=lambda s: s[1]):
            producer.produce(topic, key=order_id.encode(), value=b"not avro", timestamp=ts)
        delivered(producer)
        whole, _ = read_timeline(kafka, None, order_id)
        since_placed, missing = read_timeline(kafka, None, order_id, placed_at=placed)
    assert not missing
    assert {(e.topic, e.timestamp_ms) for e in whole} == stamped
    got = {(e.topic, e.timestamp_ms) for e in since_placed}
    assert stamped - {("orders.created", before_margin)} <= got, "a message at or after the margin was missed"
    if broker_plan().is_apache_kafka:
        assert ("orders.created", before_margin) not in got, "a message older than the order was read"
