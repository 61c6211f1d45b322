"""The outbox relay and the bulk INSERT builder, as units (a real SQLite file; no broker, no server).

Promises pinned here:
- `BulkInsert` on PostgreSQL is one `INSERT ... SELECT FROM unnest(...) WITH ORDINALITY` with one
  binary array per column, JSON columns as one JSON array each (expanded server-side), rows in list
  order, `ON CONFLICT DO NOTHING` / `RETURNING` only when asked; the parameters are the columns'
  values in that order;
- `BulkInsert` on SQLite: without `on_conflict_ignore` a duplicate key is an error, never silently
  dropped; the inbox claims return exactly the new keys, also for batches larger than one
  statement's parameter limit; other dialects are refused by name;
- `outbox_row`: Debezium's `aggregatetype` is "order", and the payload is written in the envelope's
  schema version (not the latest); a StockAdjusted is a "stock" aggregate whose id (the Kafka key)
  is its SKU;
- `OutboxRelay.publish_batch`: publishes at most `batch_size` (500) rows per batch with topic, key,
  value and headers from the row; reports the count to `on_published`; a flush waits at most 30 s in
  5 s slices, sampling the backlog gauge at most every 5 s meanwhile; a failed delivery names the
  first error;
- `cleanup` deletes only rows published longer ago than the retention; `backlog` counts unpublished
  rows;
- `run`: publishes until stopped, waits `poll_interval` (0.05 s) when a batch was not full, cleans up
  at most once a minute, starts over after a database error (waiting 1 s), and flushes the producer
  (10 s) when it stops.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import KafkaError
from prometheus_client import REGISTRY
from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, insert, select, update
from sqlalchemy.dialects.postgresql import psycopg
from sqlalchemy.exc import IntegrityError, OperationalError

from kafka_fakes import FakeProducer
from services.runtime.bulk import BulkInsert
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.db import inbox_table, make_engine, outbox_table, utcnow
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.events import OrderCreated, StockAdjusted
from services.runtime.handler import INBOX_ROW_COLUMNS
from services.runtime.outbox import OUTBOX_ROW_COLUMNS, DeliveryFailed, OutboxRelay, outbox_row
from test_injected_failures import order_created, order_recorded, stage_outbox_row

CODEC = Codec(EmbeddedRegistry())

# -- BulkInsert on PostgreSQL: the statement and its parameters -----------------------------------


class RecordingPgConnection:
    """Just enough of a SQLAlchemy Connection on PostgreSQL to see what would be sent."""

    dialect = psycopg.dialect()

    def __init__(self, returned: list[tuple] = ()):
        self.sent: list[tuple[str, tuple]] = []
        self.returned = list(returned)

    def exec_driver_sql(self, sql, params):
        self.sent.append((sql, params))
        return iter(self.returned)


def inbox_claim(event_id: str, offset: int = 0) -> dict:
    return {"group_name": "g", "event_id": event_id, "event_type": "OrderCreated", "topic": "orders",
            "partition": 0, "offset": offset, "processed_at": utcnow()}


def test_postgresql_inbox_claims_are_one_unnest_insert_ignoring_conflicts_and_returning_the_new_keys():
    claims = BulkInsert(inbox_table(MetaData()), INBOX_ROW_COLUMNS, on_conflict_ignore=True, returning="event_id")
    rows = [inbox_claim("e-1", 7), inbox_claim("e-2", 8)]
    conn = RecordingPgConnection(returned=[("e-2",)])

    assert claims.execute(conn, rows) == ["e-2"]

    [(sql, params)] = conn.sent
    assert sql == (
        'INSERT INTO inbox (group_name, event_id, event_type, topic, partition, "offset", processed_at) '
        "SELECT u.c0, u.c1, u.c2, u.c3, u.c4, u.c5, u.c6 "
        "FROM unnest(%b::VARCHAR(64)[], %b::VARCHAR(64)[], %b::VARCHAR(128)[], %b::VARCHAR(249)[], "
        "%b::INTEGER[], %b::BIGINT[], %b::TIMESTAMP WITH TIME ZONE[]) WITH ORDINALITY AS u(c0, c1, c2, c3, c4, c5, c6, n)"
        "  ORDER BY u.n ON CONFLICT DO NOTHING RETURNING event_id")
    assert params == (["g", "g"], ["e-1", "e-2"], ["OrderCreated", "OrderCreated"], ["orders", "orders"], [0, 0],
                      [7, 8], [rows[0]["processed_at"], rows[1]["processed_at"]])


def test_postgresql_outbox_rows_send_json_columns_as_one_json_array_joined_by_position():
    staged = BulkInsert(outbox_table(MetaData()), OUTBOX_ROW_COLUMNS)
    event = order_recorded("o-1")
    rows = [outbox_row(CODEC, event, Envelope(new_event_id(), "OrderRecorded", 1, "o-1")) for _ in range(2)]
    conn = RecordingPgConnection(returned=[("ignored",)])

    assert staged.execute(conn, rows) == []  # nothing asked back

    [(sql, params)] = conn.sent
    assert sql == (
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, topic, payload, headers, created_at) "
        "SELECT u.c0, u.c1, u.c2, u.c3, u.c4, u.c5, j6.value, u.c7 "
        "FROM unnest(%b::VARCHAR(36)[], %b::VARCHAR(64)[], %b::VARCHAR(64)[], %b::VARCHAR(128)[], "
        "%b::VARCHAR(249)[], %b::BYTEA[], %b::TIMESTAMP WITH TIME ZONE[]) "
        "WITH ORDINALITY AS u(c0, c1, c2, c3, c4, c5, c7, n) "
        "JOIN json_array_elements(%b::json) WITH ORDINALITY AS j6(value, n) ON j6.n = u.n ORDER BY u.n")
    ids = [r["id"] for r in rows]
    assert params[0] == ids and params[1] == ["order", "order"] and params[5] == [r["payload"] for r in rows]
    assert params[6] == [r["created_at"] for r in rows]
    assert json.loads(params[7]) == [r["headers"] for r in rows]  # the JSON column last, as one array
    assert len(params) == 8

    staged.execute(conn, rows[:1])  # the statement is the same whatever the row count
    assert conn.sent[1][0] == sql


def test_postgresql_two_json_columns_each_get_their_own_join():
    table = Table("docs", MetaData(), Column("id", Integer, primary_key=True), Column("a", JSON),
                  Column("b", JSON), Column("name", String(10)))
    conn = RecordingPgConnection()
    BulkInsert(table, ("a", "id", "b", "name")).execute(conn, [{"a": {"x": 1}, "id": 1, "b": [2], "name": "n"}])
    [(sql, params)] = conn.sent
    assert sql == ("INSERT INTO docs (a, id, b, name) SELECT j0.value, u.c1, j2.value, u.c3 "
                   "FROM unnest(%b::INTEGER[], %b::VARCHAR(10)[]) WITH ORDINALITY AS u(c1, c3, n) "
                   "JOIN json_array_elements(%b::json) WITH ORDINALITY AS j0(value, n) ON j0.n = u.n "
                   "JOIN json_array_elements(%b::json) WITH ORDINALITY AS j2(value, n) ON j2.n = u.n ORDER BY u.n")
    assert params == ([1], ["n"], '[{"x": 1}]', "[[2]]")


def test_other_dialects_are_refused_by_name_and_an_empty_batch_sends_nothing():
    class MySql(RecordingPgConnection):
        dialect = type("D", (), {"name": "mysql"})()

    insert_ = BulkInsert(inbox_table(MetaData()), INBOX_ROW_COLUMNS)
    with pytest.raises(NotImplementedError, match="^mysql$"):
        insert_.execute(MySql(), [inbox_claim("e-1")])
    conn = RecordingPgConnection()
    assert insert_.execute(conn, []) == [] and conn.sent == []


# -- BulkInsert on SQLite --------------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'units.db'}")
    yield engine
    engine.dispose()


def test_without_on_conflict_ignore_a_duplicate_key_is_an_error(engine):
    inbox = inbox_table(MetaData())
    inbox.metadata.create_all(engine)
    plain = BulkInsert(inbox, INBOX_ROW_COLUMNS)
    with engine.begin() as conn:
        plain.execute(conn, [inbox_claim("e-1")])
    with pytest.raises(IntegrityError), engine.begin() as conn:
        plain.execute(conn, [inbox_claim("e-1")])


def test_claims_return_exactly_the_new_keys_also_beyond_one_statement(engine):
    inbox = inbox_table(MetaData())
    inbox.metadata.create_all(engine)
    claims = BulkInsert(inbox, INBOX_ROW_COLUMNS, on_conflict_ignore=True, returning="event_id")
    with engine.begin() as conn:
        claims.execute(conn, [inbox_claim("e-150")])
    # 300 claims of 7 columns need three statements under SQLite's 999 parameters; one exists
    rows = [inbox_claim(f"e-{i}", i) for i in range(300)]
    with engine.begin() as conn:
        new = claims.execute(conn, rows)
    assert sorted(new) == sorted(f"e-{i}" for i in range(300) if i != 150)
    with engine.connect() as conn:
        assert conn.execute(select(inbox.c.event_id, inbox.c.offset).where(inbox.c.event_id == "e-0")).one() == (
            "e-0", 0)


def test_returning_without_ignoring_conflicts_inserts_every_row_once(engine):
    inbox = inbox_table(MetaData())
    inbox.metadata.create_all(engine)
    claims = BulkInsert(inbox, INBOX_ROW_COLUMNS, returning="event_id")
    rows = [inbox_claim(f"e-{i}", i) for i in range(300)]
    with engine.begin() as conn:
        assert sorted(claims.execute(conn, rows)) == sorted(r["event_id"] for r in rows)
    with engine.connect() as conn:
        assert len(conn.execute(select(inbox.c.event_id)).all()) == 300


# -- outbox rows ------------------------------------------------------------------------------------


def test_an_outbox_row_is_an_order_aggregate_written_in_the_envelope_schema_version():
    event = order_created("o-1")
    row = outbox_row(CODEC, event, Envelope("e-1", "OrderCreated", 1, "o-1"))
    assert (row["id"], row["aggregatetype"], row["aggregateid"], row["type"]) == ("e-1", "order", "o-1", "OrderCreated")
    decoded = CODEC.decode(row["payload"])
    assert decoded.schema_id == CODEC.registry.version("OrderCreated", 1).id
    assert OrderCreated.schema_version == 2  # so the version above is not just the latest


def test_a_stock_adjustment_is_a_stock_aggregate_keyed_by_its_sku():
    event = StockAdjusted(sku="SKU-9", delta=5, available_after=7, reason="delivery", operator="ops",
                          adjusted_at=datetime(2026, 1, 2, tzinfo=UTC))
    row = outbox_row(CODEC, event, Envelope("e-2", "StockAdjusted", 1, "SKU-9"))
    assert (row["aggregatetype"], row["aggregateid"], row["topic"]) == ("stock", "SKU-9", "stock.adjusted")
    assert StockAdjusted.model_validate(CODEC.decode(row["payload"]).record) == event


# -- the relay ----------------------------------------------------------------------------------------


class FakeTime:
    """`time.monotonic` of the outbox module, moved by the fake producer's flush."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now


class SlowBroker(FakeProducer):
    """Accepts records but acks none: each flush waits its whole timeout (plus `overshoot`)."""

    def __init__(self, clock: FakeTime, overshoot: float = 0.0):
        super().__init__()
        self.clock, self.overshoot = clock, overshoot
        self.flushes: list[float] = []

    def flush(self, timeout=None):
        self.flushes.append(timeout)
        self.clock.now += timeout + self.overshoot
        return len(self.produced)


class AckingBroker(FakeProducer):
    def __init__(self, errors: list[KafkaError] = ()):
        super().__init__()
        self.errors = list(errors)
        self.reports: list = []
        self.flushes: list[float] = []

    def produce(self, topic, key=None, value=None, headers=None, on_delivery=None, **_):
        super().produce(topic, key=key, value=value, headers=headers)
        self.reports.append(on_delivery)

    def flush(self, timeout=None):
        self.flushes.append(timeout)
        reports, self.reports = self.reports, []
        for on_delivery in reports:
            on_delivery(self.errors.pop(0) if self.errors else None, None)
        return 0


@pytest.fixture
def outbox(engine):
    table = outbox_table(MetaData())
    table.metadata.create_all(engine)
    return table


@pytest.fixture
def fake_time(monkeypatch) -> FakeTime:
    clock = FakeTime()
    monkeypatch.setattr("services.runtime.outbox.time", clock)
    return clock


def backlog_gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("orderpipe_outbox_backlog", {"service": name})


def test_a_batch_publishes_each_row_as_staged_and_reports_the_count(engine, outbox):
    event_id = stage_outbox_row(engine, outbox, "o-1")
    broker, counts = AckingBroker(), []
    relay = OutboxRelay(engine, outbox, broker, on_published=counts.append)

    assert relay.publish_batch() == 1

    [record] = broker.produced
    assert record["topic"] == "analytics.recorded"
    with engine.connect() as conn:
        row = conn.execute(select(outbox.c.topic, outbox.c.payload, outbox.c.headers)).one()
    assert record["topic"] == row.topic and record["value"] == row.payload and record["key"] == b"o-1"
    assert record["headers"] == {k: v.encode() for k, v in row.headers}
    assert record["headers"]["event_id"] == event_id.encode()
    assert counts == [1]
    assert relay.publish_batch() == 0 and counts == [1]


def test_a_batch_is_at_most_500_rows_by_default(engine, outbox):
    with engine.begin() as conn:
        conn.execute(insert(outbox), [
            {"id": f"id-{i}", "aggregatetype": "order", "aggregateid": f"o-{i}", "type": "OrderRecorded",
             "topic": "t", "payload": b"x", "headers": []} for i in range(501)])
    broker = AckingBroker()
    relay = OutboxRelay(engine, outbox, broker)
    assert relay.publish_batch() == 500
    assert [r["key"] for r in broker.produced[:2]] == [b"o-0", b"o-1"]  # in seq order
    assert relay.publish_batch() == 1


def test_a_failed_delivery_names_the_first_error_and_leaves_the_row_unpublished(engine, outbox):
    for order in ("o-1", "o-2"):
        stage_outbox_row(engine, outbox, order)
    first, second = KafkaError(KafkaError._MSG_TIMED_OUT), KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    relay = OutboxRelay(engine, outbox, AckingBroker(errors=[first, second]))
    with pytest.raises(DeliveryFailed) as caught:
        relay.publish_batch()
    assert str(caught.value) == f"2 outbox rows failed delivery ({[first]}), 0 still on their way"
    assert relay.backlog() == 2


def test_a_flush_waits_at_most_30_s_in_5_s_slices_sampling_the_backlog_every_5_s(engine, outbox, fake_time):
    stage_outbox_row(engine, outbox, "o-1")
    broker = SlowBroker(fake_time)
    relay = OutboxRelay(engine, outbox, broker, name="units-slow")
    samples: list[int] = []
    count = relay.backlog
    relay.backlog = lambda: samples.append(count()) or samples[-1]

    with pytest.raises(DeliveryFailed, match=r"^0 outbox rows failed delivery \(\[\]\), 1 still on their way$"):
        relay.publish_batch()

    assert broker.flushes == [5.0] * 6
    assert samples == [1, 1, 1]  # after 5, 15 and 25 s: never two within 5 s
    assert backlog_gauge("units-slow") == 1


def test_a_slow_flush_is_cut_at_the_deadline_and_samples_whenever_5_s_passed(engine, outbox, fake_time):
    stage_outbox_row(engine, outbox, "o-1")
    broker = SlowBroker(fake_time, overshoot=0.5)
    relay = OutboxRelay(engine, outbox, broker)  # the gauge's default `service` label: "outbox"
    samples: list[int] = []
    count = relay.backlog
    relay.backlog = lambda: samples.append(count()) or samples[-1]

    with pytest.raises(DeliveryFailed):
        relay.publish_batch()

    assert broker.flushes == [5.0, 5.0, 5.0, 5.0, 5.0, pytest.approx(2.5)]
    assert len(samples) == 5
    assert backlog_gauge("outbox") == 1


def test_cleanup_deletes_only_rows_published_before_the_retention(engine, outbox):
    ids = [stage_outbox_row(engine, outbox, o) for o in ("o-old", "o-recent", "o-open")]
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(update(outbox).where(outbox.c.id == ids[0]).values(published_at=now - timedelta(hours=25)))
        conn.execute(update(outbox).where(outbox.c.id == ids[1]).values(published_at=now - timedelta(hours=23)))
    relay = OutboxRelay(engine, outbox, AckingBroker())

    assert relay.cleanup() == 1

    with engine.connect() as conn:
        assert sorted(conn.execute(select(outbox.c.id)).scalars()) == sorted(ids[1:])
    assert relay.backlog() == 1


class Stop:
    """A stop event that is set after `rounds` checks of the loop; records the waits."""

    def __init__(self, rounds: int, on_check=None):
        self.rounds, self.on_check = rounds, on_check
        self.checks = 0
        self.waits: list[float] = []

    def is_set(self) -> bool:
        self.checks += 1
        if self.on_check:
            self.on_check(self.checks)
        return self.checks > self.rounds

    def wait(self, timeout=None) -> bool:
        self.waits.append(timeout)
        return False


def test_run_publishes_until_stopped_waits_the_poll_interval_and_flushes_on_the_way_out(engine, outbox, fake_time):
    stage_outbox_row(engine, outbox, "o-1")
    broker = AckingBroker()
    relay = OutboxRelay(engine, outbox, broker, name="units-run")
    cleanups: list[float] = []
    relay.cleanup = lambda: cleanups.append(fake_time.now) or 0

    def tick(check: int) -> None:
        fake_time.now += 30  # half a minute per round

    stop = Stop(rounds=5, on_check=tick)
    relay.run(stop)

    assert len(broker.produced) == 1 and relay.backlog() == 0
    assert stop.waits == [0.05] * 4  # no batch was full
    assert cleanups == [1060.0, 1150.0]  # at once, then not before a minute has passed
    assert broker.flushes[-1] == 10


class RecordingWake:
    """The relay's wake event as a consumer in its process sets it: records clears and waits."""

    def __init__(self):
        self.calls: list[object] = []

    def clear(self) -> None:
        self.calls.append("clear")

    def wait(self, timeout=None) -> bool:
        self.calls.append(timeout)
        return True


def test_a_relay_with_a_wake_event_waits_on_it_and_clears_it_before_each_batch(engine, outbox, fake_time):
    """Woken by the consumer after each commit, the relay publishes at once; with nothing to wake
    it, it still polls every poll interval (rows written by other processes)."""
    stage_outbox_row(engine, outbox, "o-1")
    broker, wake = AckingBroker(), RecordingWake()
    relay = OutboxRelay(engine, outbox, broker, name="units-wake", wake=wake)
    relay.cleanup = lambda: 0
    stop = Stop(rounds=3)

    relay.run(stop)

    assert len(broker.produced) == 1 and relay.backlog() == 0
    assert stop.waits == []  # it waited on the wake event, not on stop
    assert wake.calls == ["clear", 0.05] * 2  # cleared before every batch, so a commit during one is not lost


def test_run_waits_a_second_after_a_delivery_failure_and_polls_again(engine, outbox, fake_time):
    stage_outbox_row(engine, outbox, "o-1")
    relay = OutboxRelay(engine, outbox, AckingBroker(errors=[KafkaError(KafkaError._MSG_TIMED_OUT)]), batch_size=1)
    relay.cleanup = lambda: 0
    stop = Stop(rounds=3)
    relay.run(stop)
    assert stop.waits == [1.0, 0.05]  # the failed batch published nothing: not a full batch
    assert relay.backlog() == 0  # the next round sent it


def test_run_starts_over_after_a_database_error(engine, outbox, fake_time):
    broker = AckingBroker()
    relay = OutboxRelay(engine, outbox, broker)
    failures = iter([OperationalError("SELECT", {}, Exception("database is locked"))])

    def publish_batch():
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return 0

    relay.publish_batch = publish_batch
    relay.cleanup = lambda: 0
    stop = Stop(rounds=4)
    relay.run(stop)
    assert stop.waits == [1.0, 0.05]
    assert broker.flushes == [10]


def test_run_does_nothing_once_stopped(engine, outbox, fake_time):
    stage_outbox_row(engine, outbox, "o-1")
    broker = AckingBroker()
    OutboxRelay(engine, outbox, broker).run(Stop(rounds=0))
    assert broker.produced == [] and broker.flushes == [10]


def test_a_delivery_the_authorizer_denies_stops_the_relay_naming_the_missing_acl(engine, outbox):
    """A relay without Write on its topic would otherwise retry forever: a silent stall."""
    from services.runtime.errors import KafkaRefused

    stage_outbox_row(engine, outbox, "o-1")
    relay = OutboxRelay(engine, outbox, AckingBroker(errors=[KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)]),
                        name="orders")
    with pytest.raises(KafkaRefused, match="^Kafka denied publishing the outbox of orders: .*kafka-users.yaml"):
        relay.publish_batch()
    assert relay.backlog() == 1
