"""Bad input on a real broker: the consumer dead-letters it, keeps running, and never blocks.

One private topic (two partitions) holds good OrderCreated events interleaved with the four
kinds of bad input, each followed on its partition by a good event:
- bytes not in the wire format,
- an unknown schema id,
- a payload that does not decode with its schema,
- an event that decodes but fails validation (an order line with quantity 0).
A `ServiceConsumer` with a small test service (SQLite) runs over it. Then `orderpipe tail`
reads the same topic and its dead-letter topic.
"""

from __future__ import annotations

import json
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from io import StringIO

import pytest
import typer
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import Column, Integer, MetaData, String, Table, select
from typer.testing import CliRunner

from conftest import settings_for, unique_name
from reading import delivered, read_all, wait_until
from services.cli.tail_cmd import app as tail_app
from services.cli.tail_cmd import run_tail
from services.runtime.admin import ensure_topics
from services.tools.brokers import free_port, quirks
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.consumer import ServiceConsumer
from services.runtime.db import make_engine
from services.runtime.envelope import EVENT_ID, Envelope, new_event_id
from services.runtime.events import OrderCreated
from services.runtime.handler import Service, UnitOfWork
from services.runtime.kafka import make_consumer, make_producer
from services.runtime.topology import ConsumerGroup, TopicSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CODEC = Codec(EmbeddedRegistry())
AT = datetime(2026, 3, 14, 9, 26, 53, 589000, tzinfo=UTC)
WAIT_S = 30.0


def order_record(order_id: str, quantity: int = 2) -> dict:
    return {"order_id": order_id, "customer_id": "c-1", "customer_email": "ada@example.com", "currency": "EUR",
            "lines": [{"sku": "SKU-1", "quantity": quantity, "unit_price": Decimal("24.90")}],
            "total": Decimal("49.80"), "created_at": AT}


def wire(schema_id: int, payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", schema_id) + payload


# What each bad kind looks like in the dead-letter headers: (exception type, message fragments).
BAD_KINDS = {
    "not-wire-format": ("services.runtime.codec.DecodeError", ["not in the Confluent wire format", "magic byte 123"]),
    "unknown-schema-id": ("services.runtime.codec.DecodeError", ["unknown schema id 999"]),
    "does-not-decode": ("services.runtime.codec.DecodeError", ["payload does not decode with schema id 1"]),
    "fails-validation": ("pydantic_core._pydantic_core.ValidationError", ["quantity", "greater than 0"]),
}


def bad_value(kind: str, order_id: str) -> bytes:
    valid_v1 = CODEC.encode("OrderCreated", order_record(order_id), version=1)
    return {
        "not-wire-format": json.dumps(order_record(order_id), default=str).encode(),
        "unknown-schema-id": wire(999, valid_v1[5:]),
        "does-not-decode": valid_v1[:12],
        "fails-validation": CODEC.encode("OrderCreated", order_record(order_id, quantity=0), version=1),
    }[kind]


@dataclass(frozen=True)
class Sent:
    kind: str  # "good" or a BAD_KINDS key
    order_id: str
    event_id: str
    value: bytes
    partition: int
    offset: int


@dataclass
class Scenario:
    bootstrap: str
    group: ConsumerGroup
    sent: list[Sent]

    @property
    def source(self) -> str:
        return self.group.inputs[0]

    @property
    def dlt(self) -> str:
        return self.group.dlt_topic(self.source)

    def good(self) -> list[Sent]:
        return [s for s in self.sent if s.kind == "good"]

    def bad(self) -> list[Sent]:
        return [s for s in self.sent if s.kind != "good"]


def produce(producer: Producer, topic: str, partition: int, kind: str) -> Sent:
    order_id = unique_name("order")
    event_id = new_event_id()
    value = CODEC.encode("OrderCreated", order_record(order_id), version=1) if kind == "good" else \
        bad_value(kind, order_id)
    headers = Envelope(event_id, "OrderCreated", 1, order_id).to_headers()
    acked = []
    producer.produce(topic, key=order_id.encode(), value=value, headers=headers, partition=partition,
                     on_delivery=lambda err, msg: acked.append((err, msg)))
    delivered(producer)
    [(err, msg)] = acked
    assert err is None, err
    return Sent(kind, order_id, event_id, value, msg.partition(), msg.offset())


# Every bad message is followed by a good one on the same partition.
LAYOUT = {
    0: ["good", "not-wire-format", "good", "unknown-schema-id", "good"],
    1: ["does-not-decode", "good", "fails-validation", "good"],
}


@pytest.fixture(scope="module")
def scenario(kafka_bootstrap: str) -> Scenario:
    name = unique_name("badinput")
    group = ConsumerGroup(name, inputs=(f"{name}.in",), retry_delays_s=(1.0,))
    source = group.inputs[0]
    ensure_topics({"bootstrap.servers": kafka_bootstrap},
                  [TopicSpec(t, partitions=2) for t in (source, *group.retry_topics(source), group.dlt_topic(source))])
    producer = make_producer(settings_for(kafka_bootstrap))
    sent = [produce(producer, source, partition, kind) for partition, kinds in LAYOUT.items() for kind in kinds]
    return Scenario(kafka_bootstrap, group, sent)


# -- the consumer ------------------------------------------------------------------------------------


def make_service(group: ConsumerGroup) -> tuple[Service, Table]:
    metadata = MetaData()
    effects = Table("effects", metadata, Column("id", Integer, primary_key=True, autoincrement=True),
                    Column("event_id", String(64), nullable=False), Column("order_id", String(64), nullable=False))

    def record(event: OrderCreated, uow: UnitOfWork) -> None:
        uow.conn.execute(effects.insert().values(event_id=uow.envelope.event_id, order_id=event.order_id))

    return Service(group, metadata, {OrderCreated: [record]}, batch_size=100), effects


@dataclass
class Outcome:
    effects: Counter  # event id -> how many effect rows
    dead: list  # the dead-letter topic's messages
    later: list[Sent]  # good events produced after every bad one was dead-lettered
    consumer: ServiceConsumer
    alive_after_bad_input: bool
    committed: dict[int, int]


@pytest.fixture(scope="module")
def consumed(scenario: Scenario, tmp_path_factory) -> Outcome:
    """Run the test service over the scenario until every message is handled, then stop it."""
    service, effects = make_service(scenario.group)
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('bad-input') / 'service.db'}")
    service.metadata.create_all(engine)
    settings = settings_for(scenario.bootstrap)
    consumer = ServiceConsumer(service, engine, make_consumer(settings, scenario.group.name),
                               make_producer(settings), CODEC)
    stop, crashed = threading.Event(), []

    def run():
        try:
            consumer.run(stop, poll_timeout=0.1)
        except BaseException as exc:
            crashed.append(exc)

    def effect_event_ids() -> list[str]:
        with engine.connect() as conn:
            return [r.event_id for r in conn.execute(select(effects.c.event_id))]

    thread = threading.Thread(target=run, name="bad-input-consumer", daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(effect_event_ids()) >= len(scenario.good()), what="every good event")
        wait_until(lambda: len(read_all(scenario.bootstrap, scenario.dlt)) >= len(scenario.bad()),
                   what="every bad message in the dead-letter topic")
        # Still running: one more good event on each partition is processed.
        producer = make_producer(settings)
        later = [produce(producer, scenario.source, p, "good") for p in LAYOUT]
        wait_until(lambda: {s.event_id for s in later} <= set(effect_event_ids()), what="events after the bad ones")
        alive = thread.is_alive() and not crashed
    finally:
        stop.set()
        thread.join(WAIT_S)
    assert not thread.is_alive() and not crashed, crashed

    check = Consumer({"bootstrap.servers": scenario.bootstrap, "group.id": scenario.group.name, "log_level": 0})
    try:
        committed = {tp.partition: tp.offset
                     for tp in check.committed([TopicPartition(scenario.source, p) for p in LAYOUT], timeout=10)}
    finally:
        check.close()
    outcome = Outcome(Counter(effect_event_ids()), read_all(scenario.bootstrap, scenario.dlt), later, consumer,
                      alive, committed)
    engine.dispose()
    return outcome


def test_every_good_event_is_processed_exactly_once(scenario: Scenario, consumed: Outcome):
    assert consumed.effects == Counter(s.event_id for s in scenario.good() + consumed.later)
    assert consumed.consumer.totals.processed == len(scenario.good()) + len(consumed.later)
    assert consumed.consumer.totals.retried == 0


def test_the_consumer_keeps_running_and_no_partition_is_blocked(scenario: Scenario, consumed: Outcome):
    assert consumed.alive_after_bad_input
    # The committed offsets are past every message, bad ones included, on both partitions.
    last = {}
    for s in scenario.sent + consumed.later:
        last[s.partition] = max(last.get(s.partition, -1), s.offset)
    assert consumed.committed == {p: offset + 1 for p, offset in last.items()}


def test_each_bad_message_is_in_the_dead_letter_topic_with_its_reason(scenario: Scenario, consumed: Outcome):
    assert len(consumed.dead) == len(scenario.bad())
    by_origin = {(int(h["x-original-partition"]), int(h["x-original-offset"])): (key, value, h)
                 for _, _, key, value, h in consumed.dead}
    for bad in scenario.bad():
        key, value, headers = by_origin[(bad.partition, bad.offset)]
        exc_type, fragments = BAD_KINDS[bad.kind]
        assert (key, value) == (bad.order_id, bad.value), bad.kind
        assert headers["x-reason"] == "not retryable", bad.kind
        assert headers["x-exception-type"] == exc_type, bad.kind
        for fragment in fragments:
            assert fragment in headers["x-exception-message"], (bad.kind, headers["x-exception-message"])
        assert (headers["x-group"], headers["x-original-topic"], headers["x-attempt"]) == (
            scenario.group.name, scenario.source, "1")
        assert headers[EVENT_ID] == bad.event_id  # the envelope travels with the dead letter
    assert read_all(scenario.bootstrap, scenario.group.retry_topic(scenario.source, 1)) == []


# -- orderpipe tail ---------------------------------------------------------------------------------


def tail(bootstrap: str, *args: str):
    app = typer.Typer()
    app.add_typer(tail_app)  # as services/cli/main.py registers it

    @app.command()
    def _other() -> None:  # a second command, so `tail` is a sub-command as in main.py
        pass

    return CliRunner().invoke(app, ["tail", *args], env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap})


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_tail_prints_good_and_bad_messages_as_json_lines(scenario: Scenario):
    result = tail(scenario.bootstrap, scenario.source, "--from-beginning", "--json", "--max", "3")
    assert result.exit_code == 0, result.output
    assert len(json_lines(result.stdout)) == 3

    # Without --max (and without --follow) it stops at the end offsets seen at start.
    result = tail(scenario.bootstrap, scenario.source, "--from-beginning", "--json")
    assert result.exit_code == 0, result.output
    lines = {(r["partition"], r["offset"]): r for r in json_lines(result.stdout)}
    assert set(lines) >= {(s.partition, s.offset) for s in scenario.sent}

    for sent in scenario.sent:
        line = lines[(sent.partition, sent.offset)]
        assert (line["topic"], line["key"], line["headers"][EVENT_ID]) == (
            scenario.source, sent.order_id, sent.event_id)
        datetime.fromisoformat(line["timestamp"])
        if sent.kind in ("good", "fails-validation"):  # tail shows what was written, valid or not
            assert "error" not in line, line
            assert (line["event_type"], line["schema_id"]) == ("OrderCreated", 1)
            assert line["value"]["total"] == "49.80"  # decimals as exact strings
            assert line["value"]["lines"][0]["unit_price"] == "24.90"
            assert datetime.fromisoformat(line["value"]["created_at"]) == AT
            assert line["value"]["lines"][0]["quantity"] == (0 if sent.kind == "fails-validation" else 2)
        else:
            assert line["event_type"] is None and line["value_size"] == len(sent.value)
            assert BAD_KINDS[sent.kind][1][0] in line["error"], line


def test_tail_reads_a_dead_letter_topic(scenario: Scenario, consumed: Outcome):
    result = tail(scenario.bootstrap, scenario.dlt, "--from-beginning", "--json")

    assert result.exit_code == 0, result.output
    lines = json_lines(result.stdout)
    assert len(lines) == len(scenario.bad())
    assert all(line["headers"]["x-reason"] == "not retryable" for line in lines)
    assert sum("error" in line for line in lines) == 3  # the invalid order decodes: its fault was validation


def test_tail_human_format_and_nothing_new(scenario: Scenario):
    result = tail(scenario.bootstrap, scenario.source, "--from-beginning", "--max", "1")
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    assert f"{scenario.source}[" in line and "key=" in line

    result = tail(scenario.bootstrap, scenario.source)  # from the end, not following: nothing to show
    assert result.exit_code == 0 and result.stdout == ""
    assert "no new messages" in result.stderr


def test_tail_follow_prints_new_messages(scenario: Scenario, monkeypatch: pytest.MonkeyPatch):
    # tail starts at the end offsets it sees at start: produce once it has seen them
    seen_ends: dict = {}
    ends_read = threading.Event()

    def end_offsets(*args, **kwargs):
        marks = real_end_offsets(*args, **kwargs)
        seen_ends.update(marks)
        ends_read.set()
        return marks

    real_end_offsets = quirks.end_offsets
    monkeypatch.setattr(quirks, "end_offsets", end_offsets)
    out = StringIO()
    printed: list[int] = []
    settings = settings_for(scenario.bootstrap)
    thread = threading.Thread(target=lambda: printed.append(
        run_tail(settings, scenario.source, follow=True, as_json=True, max_messages=1, out=out)), daemon=True)
    thread.start()
    assert ends_read.wait(WAIT_S), "tail did not read the end offsets"
    sent = produce(make_producer(settings), scenario.source, 1, "good")
    thread.join(WAIT_S)

    assert not thread.is_alive() and printed == [1]
    assert sent.offset >= seen_ends[(scenario.source, 1)][1], "produced before the end tail started at"
    [line] = json_lines(out.getvalue())
    assert (line["partition"], line["offset"], line["key"]) == (1, sent.offset, sent.order_id)


def test_tail_unknown_topic_is_one_clear_line(scenario: Scenario):
    result = tail(scenario.bootstrap, unique_name("no-such-topic"))

    assert result.exit_code == 1
    assert result.stderr.startswith("error: topic") and "does not exist" in result.stderr
    assert "Traceback" not in result.output


def test_tail_unreachable_broker_is_one_clear_line():
    result = tail(f"127.0.0.1:{free_port()}", "orders.created", "--timeout", "1")

    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach Kafka at 127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
