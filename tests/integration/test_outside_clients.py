"""Clients from outside the pipeline, on the session's broker.

- kcat (librdkafka's command-line client) reads `orders.created` as the orders relay published
  it: every placed order once, with its key, event id and murmur2 partition (Apache Kafka only:
  kcat cannot complete its handshake with the embedded broker);
- the README's analyst recipe, extracted from README.md and run as written, prints every event
  of a topic and stops at its end, on both brokers (subscribing with a new group used to wait
  out the rebalance on the embedded broker and print nothing for minutes);
- `orderpipe lag` shows the order-status worker's group (`order-status`, Faust) with its
  committed offsets and lag, on both brokers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import select
from typer.testing import CliRunner

from conftest import in_ci, settings_for, unique_name
from reading import read_all, wait_until
from services import registry
from services.cli.main import app
from services.ops.lag import order_status_group
from services.orders.model import LineItem, PlaceOrder
from services.orders.place import place_order
from services.orders.tables import outbox
from services.runtime import topology
from services.runtime.admin import ensure_topics
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.db import make_engine
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.failure_notices import FailureNotice
from services.runtime.kafka import make_producer
from services.runtime.migrate import upgrade_database
from services.runtime.outbox import OutboxRelay
from services.runtime.topology import DEFAULT_PARTITIONS, ORDER_STATUS_APP, ORDERS_CREATED, STOCK_RESERVED, TopicSpec
from streams.order_status.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
CODEC = Codec(EmbeddedRegistry())


def partition_of(key: str, partitions: int = DEFAULT_PARTITIONS) -> int:
    """murmur2, as every producer of the pipeline places a key."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def order_id_on(partition: int, partitions: int = DEFAULT_PARTITIONS) -> str:
    while partition_of(order_id := unique_name("order"), partitions) != partition:
        pass
    return order_id


def order_created(order_id: str, version: int | None = None) -> bytes:
    record = {"order_id": order_id, "customer_id": "c-1", "customer_email": "ada@example.com", "currency": "EUR",
              "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": Decimal("24.90")}], "total": Decimal("49.80"),
              "created_at": datetime.now(UTC).replace(microsecond=0)}
    if version != 1:
        record["channel"] = "web"
    return CODEC.encode("OrderCreated", record, version=version)


def produce(bootstrap: str, messages: list[tuple[str, str, bytes, list[tuple[str, bytes]]]]) -> None:
    """(topic, key, value, headers) with the pipeline's producer settings, in one flush after a
    linger: a partition's last batch holds several records (the embedded broker's ListOffsets
    answer then falls short of the end)."""
    producer = make_producer(settings_for(bootstrap), **{"linger.ms": 100})
    for topic, key, value, headers in messages:
        producer.produce(topic, key=key.encode(), value=value, headers=headers)
    assert producer.flush(30) == 0


def invoke(bootstrap: str, *args: str):
    return CliRunner().invoke(app, list(args), env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "COLUMNS": "200"})


def cli(bootstrap: str, *args: str) -> str:
    result = invoke(bootstrap, *args)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


# -- 1. kcat --------------------------------------------------------------------------------------


@pytest.fixture
def kcat() -> str:
    path = shutil.which("kcat")
    if path is None:
        message = "kcat is not installed (Debian: apt-get install kcat; CI installs it in .ci/setup-machine)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def test_kcat_reads_every_order_the_relay_published(kafka_bootstrap: str, apache_kafka_only, kcat: str,
                                                     tmp_path: Path):
    n = 40
    engine = make_engine(f"sqlite:///{tmp_path / 'orders.db'}")
    producer = make_producer(settings_for(kafka_bootstrap))
    try:
        upgrade_database(engine, registry.service("orders"))
        request = PlaceOrder(customer_id="c-1", customer_email="ada@example.com", currency="EUR",
                             lines=[LineItem(sku="SKU-1", quantity=2, unit_price=Decimal("24.90"))])
        placed = [place_order(engine, CODEC, request).order_id for _ in range(n)]
        relay = OutboxRelay(engine, outbox, producer, batch_size=15)
        assert sum(iter(relay.publish_batch, 0)) == n
        with engine.connect() as conn:
            expected = dict(conn.execute(select(outbox.c.aggregateid, outbox.c.id)).all())
    finally:
        engine.dispose()
    assert sorted(expected) == sorted(placed)

    started = time.monotonic()
    result = subprocess.run([kcat, "-C", "-J", "-q", "-b", kafka_bootstrap, "-t", ORDERS_CREATED, "-o", "beginning",
                             "-e"], capture_output=True, timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    # -J escapes control characters but passes other payload bytes through: not always UTF-8, and
    # one record per b"\n" only (str.splitlines also splits at U+0085 and U+2028, which an Avro
    # payload can hold: a CI run cut a record in two that way)
    records = [json.loads(line.decode(errors="replace")) for line in result.stdout.split(b"\n") if line.strip()]

    # kcat saw exactly what the topic holds (other tests of the session may have written to it too) ...
    on_topic = {(p, o) for p, o, *_ in read_all(kafka_bootstrap, ORDERS_CREATED)}
    assert {(r["partition"], r["offset"]) for r in records} == on_topic, f"kcat took {took:.1f}s"
    assert len(records) == len(on_topic) and {r["topic"] for r in records} == {ORDERS_CREATED}
    # ... and every order the relay published, once, with its event id, on its murmur2 partition
    mine = [r for r in records if r["key"] in expected]
    assert len(mine) == n
    for r in mine:
        headers = dict(zip(r["headers"][::2], r["headers"][1::2]))
        assert headers["event_id"] == expected[r["key"]], r
        assert headers["event_type"] == "OrderCreated" and headers["correlation_id"] == r["key"], r
        assert r["partition"] == partition_of(r["key"]), r
        assert r["payload"].startswith("\u0000\u0000\u0000\u0000"), r  # magic byte 0, schema id < 2**24


# -- 2. the README's analyst recipe ---------------------------------------------------------------


def readme_recipe() -> tuple[str, str]:
    """The analyst recipe's Python block, as README.md has it, and the command line it documents."""
    readme = (REPO / "README.md").read_text()
    at = readme.index("Reading a topic as an analyst")
    block = re.compile(r"```python\n(.*?)\n```", re.S).search(readme, at)
    assert block is not None, "no ```python block after 'Reading a topic as an analyst' in README.md"
    documented = re.compile(r"`KAFKA_BOOTSTRAP_SERVERS=\S+ (python read_events\.py [^`]+)`")
    command = documented.search(readme, at, block.start())
    assert command is not None, "the recipe's command line is no longer documented before its code"
    return block.group(1) + "\n", command.group(1)


def test_readme_analyst_recipe_prints_every_event(kafka_bootstrap: str, tmp_path: Path):
    code, command = readme_recipe()
    assert command == "python read_events.py orders.created"
    topic = unique_name("analyst")
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, [TopicSpec(topic, partitions=DEFAULT_PARTITIONS)])
    # Events of both OrderCreated versions (schema ids 1 and 8) on every partition but the last,
    # which stays empty: the recipe must stop at the end of an empty partition too.
    events = {}
    for i in range(30):
        order_id = order_id_on(i % (DEFAULT_PARTITIONS - 1))
        version = 1 if i % 3 == 0 else 2
        envelope = Envelope(new_event_id(), "OrderCreated", version, order_id)
        events[order_id] = (envelope.event_id, version, order_created(order_id, version), envelope.to_headers())
    produce(kafka_bootstrap, [(topic, k, value, headers) for k, (_, _, value, headers) in events.items()])

    script = tmp_path / "read_events.py"
    script.write_text(code)
    argv = command.split()[1:]  # the documented command, with our topic
    argv[-1] = topic
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(tmp_path / argv[0]), *argv[1:]], cwd=REPO, capture_output=True,
                            text=True, timeout=90, env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap})
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr

    lines = result.stdout.splitlines()
    assert len(lines) == len(events), (took, result.stdout[-2000:])
    printed = {}
    for line in lines:
        partition, offset, key, event_id, record = line.split(" ", 4)
        printed[key] = (int(partition), int(offset), event_id, json.loads(record))
    assert set(printed) == set(events)
    assert {(p, o) for p, o, *_ in printed.values()} == {(p, o) for p, o, *_ in read_all(kafka_bootstrap, topic)}
    for key, (partition, _, event_id, record) in printed.items():
        expected_id, version, _, _ = events[key]
        assert (event_id, partition) == (expected_id, partition_of(key))
        assert (record["order_id"], record["total"], record["lines"][0]["unit_price"]) == (key, "49.80", "24.90")
        assert ("channel" in record) == (version == 2), record
    assert took < 30, f"the recipe took {took:.1f}s"


# -- 3. `orderpipe lag` and the order-status worker's group ---------------------------------------


def status_rows(bootstrap: str, *args: str) -> dict[tuple[str, int], dict]:
    return rows_of(cli(bootstrap, "lag", *args, "--json"))


def rows_of(output: str) -> dict[tuple[str, int], dict]:
    rows = [json.loads(line) for line in output.splitlines() if line.strip()]
    return {(r["topic"], r["partition"]): r for r in rows if r["group"] == ORDER_STATUS_APP}


# What a broker answers for a while after it started or created the topics (a session's first
# test): not yet leader of a new partition, group coordinator still loading. Worth asking again.
TRANSIENT = ("Not leader for partition", "Coordinator load in progress", "Not coordinator")


def caught_up(rows: dict[tuple[str, int], dict], produced: set[tuple[str, int]]) -> bool:
    """The worker committed the end of every partition it has anything to read on."""
    return produced <= set(rows) and all(
        r["committed"] == r["end"] and r["lag"] == 0 for r in rows.values() if r["end"] > r["low"])


def test_lag_covers_the_order_status_group(kafka_bootstrap: str, tmp_path: Path):
    from services.runtime.topology import sla_topic_name

    group = order_status_group()
    assert group.name == ORDER_STATUS_APP
    assert set(group.inputs) == {*topology.STATUS_INPUTS, topology.FAILURES}  # what the worker subscribes to
    assert group.internal == (sla_topic_name(ORDER_STATUS_APP),)

    # Orders for the worker to fold: OrderCreated, StockReserved, and an e-mail failure's notice.
    orders = [unique_name("order") for _ in range(8)]
    messages = []
    for order_id in orders:
        created = Envelope(new_event_id(), "OrderCreated", 2, order_id).to_headers()
        messages.append((ORDERS_CREATED, order_id, order_created(order_id), created))
        messages.append((STOCK_RESERVED, order_id, CODEC.encode("StockReserved", {
            "order_id": order_id, "lines": [{"sku": "SKU-1", "quantity": 2}], "reserved_at": datetime.now(UTC)}),
            Envelope(new_event_id(), "StockReserved", 1, order_id).to_headers()))
    notice = FailureNotice(orders[0], "email", ORDERS_CREATED, registry.group("email").retry_topic(ORDERS_CREATED, 1),
                           "retry", 1, new_event_id(), "smtplib.SMTPServerDisconnected",
                           "Connection unexpectedly closed", None, datetime.now(UTC).isoformat())
    messages.append((topology.FAILURES, orders[0], notice.to_bytes(), []))
    produce(kafka_bootstrap, messages)
    produced = {(topic, partition_of(key)) for topic, key, *_ in messages}

    worker = WorkerProcess(kafka_bootstrap, tmp_path / "order-status", tmp_path / "worker.log", store="memory://")
    try:
        def running_and_caught_up():
            assert worker.proc.poll() is None, f"the worker exited:\n{worker.log_tail()}"
            result = invoke(kafka_bootstrap, "lag", "--group", ORDER_STATUS_APP, "--json")
            if result.exit_code != 0:
                assert any(t in result.output for t in TRANSIENT), result.output
                return None
            rows = rows_of(result.stdout)
            return rows if caught_up(rows, produced) else None

        rows = wait_until(running_and_caught_up, timeout=120, what="the order-status group to commit every end offset")
        for key in produced:
            assert rows[key]["committed"] is not None and rows[key]["committed"] >= 1, rows[key]
    finally:
        returncode = worker.stop()
    assert returncode == 0, worker.log_tail()

    # A just-run group: its committed offsets stay; new events are its lag.
    before = status_rows(kafka_bootstrap, "--group", ORDER_STATUS_APP, "--all")
    assert caught_up(before, produced)
    topics = {t for t, _ in before}
    assert topics == {*group.inputs, *group.internal}, "every topic the worker reads, its SLA topic included"
    assert {k: v["kind"] for k, v in before.items()} == {k: "input" for k in before}
    # The changelog (restored by assignment) holds the folded statuses but no committed offset: no row.
    changelog = f"{ORDER_STATUS_APP}-order-status-changelog"
    assert {key for _, _, key, _, _ in read_all(kafka_bootstrap, changelog)} >= set(orders)
    client = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": ORDER_STATUS_APP, "log_level": 0})
    try:
        committed = client.committed([TopicPartition(changelog, p) for p in range(DEFAULT_PARTITIONS)], timeout=10)
    finally:
        client.close()
    assert all(tp.offset < 0 for tp in committed), committed

    partition = partition_of(orders[0])
    late = [order_id_on(partition) for _ in range(3)]
    produce(kafka_bootstrap, [(ORDERS_CREATED, k, order_created(k), Envelope(new_event_id(), "OrderCreated", 2,
                                                                                 k).to_headers()) for k in late])
    after = status_rows(kafka_bootstrap)  # every group, this one among them
    row, was = after[(ORDERS_CREATED, partition)], before[(ORDERS_CREATED, partition)]
    assert (row["committed"], row["end"], row["lag"]) == (was["committed"], was["end"] + 3, 3), row
    assert sum(r["lag"] for r in after.values()) == 3
    shown_before = {k: r for k, r in before.items() if r["end"] > 0 or r["committed"]}  # what --all adds
    assert {k: r for k, r in after.items() if k != (ORDERS_CREATED, partition)} == \
        {k: r for k, r in shown_before.items() if k != (ORDERS_CREATED, partition)}

    table = cli(kafka_bootstrap, "lag")
    assert f"{ORDER_STATUS_APP}: lag 3 on input" in table
    row_shown = (rf"│ {ORDER_STATUS_APP} +│ {re.escape(ORDERS_CREATED)} +│ +{partition} │ "
                 rf"+{was['committed']} │ +{was['end'] + 3} │ +3 │")
    assert re.search(row_shown, table), table
