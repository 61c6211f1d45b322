"""The console's consumer-group page on the real broker: every group (the services' and the
order-status worker's) with its state, members and per partition the committed offset, the end
offset and the lag, read as `orderpipe lag` reads them."""

from __future__ import annotations

import re

import pytest
from confluent_kafka import Consumer, TopicPartition

from conftest import settings_for
from reading import delivered
from services.runtime.kafka import make_producer
from test_dlt_cli import Scenario, scenario  # noqa: F401 - scenario is a fixture
from test_ops_console import console, logged_in  # noqa: F401 - console is a fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def web(scenario: Scenario, monkeypatch, request):  # noqa: F811
    return request.getfixturevalue("console")


def row(page: str, *cells: str) -> bool:
    return re.search(r"<tr>" + "".join(f"<td[^>]*>{re.escape(c)}</td>" for c in cells), page) is not None


def test_the_groups_page_shows_positions_and_lag(web, scenario: Scenario):  # noqa: F811
    s = scenario
    producer = make_producer(settings_for(s.bootstrap), **{"linger.ms": 100})
    for i in range(5):
        producer.produce(s.source, key=f"k{i}".encode(), value=b"x", partition=0)
    delivered(producer)
    client = Consumer({"bootstrap.servers": s.bootstrap, "group.id": s.group.name, "log_level": 0})
    client.commit(offsets=[TopicPartition(s.source, 0, 2)], asynchronous=False)
    client.close()

    with logged_in(web, "vic") as browser:
        page = browser.get("/groups")
    assert page.status_code == 200, page.text
    text = page.text
    assert f'id="{s.group.name}"' in text and 'id="order-status"' in text
    # topic, kind, partition, committed, end, lag
    assert row(text, s.source, "input", "0", "2", "5", "3")
    assert row(text, s.source, "input", "1", "-", "0", "0")
    assert row(text, s.dlt, "dead letters", "0", "-", "4")  # lag 4 follows, marked
    assert '<span class="bad">4</span>' in text and '<span class="bad">2</span>' in text
    # the summary: lag 3 on input, 0 in retry topics, 6 unhandled dead letters
    assert re.search(rf'>{re.escape(s.group.name)}</a></td><td>[A-Z?]+</td><td class=num>\d+</td>'
                     r"<td class=num>3</td><td class=num>0</td><td class=num>6</td>", text), text
    # no worker of the group runs here; the order-status worker is no worker of the consumer runtime
    assert "paused partitions: no worker of this group reports its state" in text
    assert "paused partitions: not reported: a Faust stream worker" in text
    assert "<th>member id</th>" in text or "no members reported by the broker" in text
