"""A consumer service that lives only in the test tree joins the pipeline with no edit outside its
own folder (tests/extra_service/loyalty/): `ORDERPIPE_EXTRA_SERVICES=extra_service.loyalty.service`
puts it in the registry, and from its declaration alone it gets

- its migrations: its database migrated to its own head (the revision `orderpipe db revision
  loyalty` wrote) by its process on start;
- its consumer group on `orders.created` (the key of its handlers), and its retry and
  dead-letter topics, created with every other topic;
- its place in `orderpipe up`: the stack starts `orderpipe run loyalty` beside the others, and
  its effect (points per customer) lands for every order;
- its retry chain: an order it cannot handle ends in `orders.created.loyalty.dlt` with the
  runtime's failure headers, and in no other group's topics;
- an event type of its own (`PointsAwarded`: model, topic `loyalty.points` and schema with an id
  from its own registry.json, all in its folder): published through its outbox, one per order;
- its place in the order-status view: the view's steps derive from the same registry, so every
  order shows a `loyalty` step, done with the points awarded, and the order it dead-lettered is
  STALLED naming it.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from rich.console import Console
from rich.progress import Progress
from sqlalchemy import text

from services import registry
from services.runtime import contracts
from services.runtime.codec import Codec, EmbeddedRegistry
from services.pipeline.demo import place_all, sample_orders, wait_for_final
from services.pipeline.stack import Stack
from services.runtime.db import make_engine
from services.runtime.migrate import head_revision
from services.runtime.settings import Settings
from services.runtime.topology import DEFAULT_PARTITIONS

pytestmark = pytest.mark.e2e

TESTS = Path(__file__).resolve().parents[1]
EXTRA = "extra_service.loyalty.service"
BROKEN = "customer-broken"  # the loyalty handler raises a PermanentError for this customer


@pytest.fixture
def loyalty(monkeypatch):
    """The registry as a process started with ORDERPIPE_EXTRA_SERVICES sees it (this test
    process imported it before the variable was set)."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv(registry.EXTRA_SERVICES_ENV, EXTRA)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    extra = registry._extra_services()
    monkeypatch.setattr(registry, "SERVICES", (*registry.SERVICES, *extra))
    monkeypatch.setattr(registry, "GROUPS", registry.groups())
    [service] = extra
    contracts.register(*service.events)  # again, in case an earlier test imported it and unregistered
    yield service
    contracts.unregister(*service.events)


def test_a_service_from_the_test_tree_gets_topics_migrations_a_process_and_a_retry_chain(
        loyalty, tmp_path: Path, stack_broker: str) -> None:
    group = loyalty.group
    assert group.inputs == ("orders.created",)
    dlt = group.dlt_topic("orders.created")
    assert {group.retry_topic("orders.created", 1), dlt} <= {t.name for t in registry.all_topics()}
    assert "loyalty" in registry.processes()
    assert group.outputs == ("loyalty.points",) and "loyalty.points" in {t.name for t in registry.all_topics()}

    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir)
    samples = sample_orders(12, seed=5)
    samples[0].body["customer_id"] = BROKEN
    with Stack(settings, data_dir=data_dir, broker=stack_broker) as info:
        assert "loyalty" in info.processes
        quiet = Console(file=open(os.devnull, "w"))
        with httpx.Client(base_url=info.api_url, timeout=10) as client, Progress(console=quiet) as progress:
            placed = place_all(client, samples, progress)
            final = wait_for_final(client, placed, 150, progress)
        broken = next(oid for oid, o in placed.items() if o.body["customer_id"] == BROKEN)
        # the broken order is STALLED by its loyalty dead letter, unless it failed for good anyway
        expected = {oid: ("STALLED" if oid == broken and o.expected != "FAILED" else o.expected)
                    for oid, o in placed.items()}
        assert {oid: view["state"] for oid, view in final.items()} == expected
        assert final[broken]["steps"]["loyalty"]["state"] == "dead_lettered"
        if expected[broken] == "STALLED":
            assert "loyalty dead-lettered" in final[broken]["reason"]
        units = {oid: sum(line["quantity"] for line in o.body["lines"]) for oid, o in placed.items()}
        assert {oid: (view["steps"]["loyalty"]["state"], view["steps"]["loyalty"]["detail"])
                for oid, view in final.items() if oid != broken} == \
               {oid: ("done", str(units[oid])) for oid in placed if oid != broken}

        codec = Codec(EmbeddedRegistry())  # the loyalty schema's id comes from its own registry.json
        awarded = [codec.decode(m.value()) for m in _read(info.bootstrap_servers, "loyalty.points",
                                                          expected=len(placed) - 1)]
        assert {d.schema_id for d in awarded} == {1001}
        assert sorted(d.record["order_id"] for d in awarded) == sorted(oid for oid in placed if oid != broken)
        dead = _read(info.bootstrap_servers, dlt, expected=1)
        assert [m.key().decode() for m in dead] == [broken]
        headers = dict(dead[0].headers())
        assert headers["x-group"] == b"loyalty" and headers["x-reason"] == b"not retryable"
        assert headers["x-exception-type"].endswith(b"PermanentError")

        expected_points = Counter()
        for order in placed.values():
            if order.body["customer_id"] != BROKEN:
                expected_points[order.body["customer_id"]] += sum(line["quantity"] for line in order.body["lines"])
        engine = make_engine(settings.database_url("loyalty"))
        try:
            with engine.connect() as conn:
                points = dict(conn.execute(text("SELECT customer_id, points FROM loyalty_points")).all())
                revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
                handled = conn.execute(text("SELECT count(*) FROM inbox WHERE group_name = 'loyalty'")).scalar_one()
        finally:
            engine.dispose()
        assert revision == head_revision(loyalty)
        assert points == dict(expected_points)
        assert handled == len(placed) - 1  # the dead-lettered one left no inbox row


def _read(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0) -> list:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"extra-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "log_level": 0})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(DEFAULT_PARTITIONS)])
    found: list = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(found) < expected:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                found.append(msg)
        # a little longer: a second copy would show here
        end = time.monotonic() + 3
        while time.monotonic() < end:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                found.append(msg)
    finally:
        consumer.close()
    return found
