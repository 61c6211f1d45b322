"""Details of the outbox relay, the bulk INSERT and the status reason that operators see.

Promises pinned here (no broker, no server: a real SQLite file, a fake PostgreSQL connection that
records what would be sent, the fake producers and the fake clock of `test_outbox_and_bulk_units`):

- `BulkInsert` on PostgreSQL builds its statement once: a later batch, and a later `add_rows` of
  the same outbox table, sends the statement already built and only converts its values;
- `BulkInsert` on SQLite stays under the 999 parameters of SQLite before 3.32 even when one row
  has more than half of them (one row per statement then);
- `OutboxRelay.publish_batch` selects the unpublished rows in `seq` order (also when SQLite would
  hand them back in another order), and producing never waits on the broker: while it is away, a
  batch holds the relay for exactly the flush's 30 s, and the last flush slice ends at the
  deadline even when it is shorter than a second;
- `cleanup` keeps a row published exactly one retention ago ("longer ago" only);
- `run`: the first round samples the backlog gauge and cleans up at once, later cleanups come as
  soon as more than a minute has passed; a standby relay on PostgreSQL tries for the advisory lock
  once a second and leaves when stopped; the warnings an operator reads when the relay starts over
  (database or leadership gone; the error cut at 500 characters) or retries a failed delivery
  (the DeliveryFailed text) say what happened;
- the status fold: a dead-lettered step stored without an error reads "no error recorded" in the
  order's STALLED reason.
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError
from sqlalchemy import Column, Integer, MetaData, String, Table, event, select, update
from sqlalchemy.dialects.postgresql import psycopg
from sqlalchemy.exc import OperationalError

from services.runtime.bulk import BulkInsert
from services.runtime.db import inbox_table, make_engine, outbox_table
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.handler import INBOX_ROW_COLUMNS
from services.runtime.lag import OUTBOX_BACKLOG
from services.runtime.outbox import DeliveryFailed, LeadershipLost, OutboxRelay, add_rows, outbox_row
from streams.order_status.status import OrderStatus, next_status
from test_injected_failures import order_recorded, stage_outbox_row
from test_outbox_and_bulk_units import (  # noqa: F401  (engine, outbox, fake_time are fixtures)
    CODEC,
    AckingBroker,
    RecordingPgConnection,
    SlowBroker,
    Stop,
    backlog_gauge,
    engine,
    fake_time,
    inbox_claim,
    outbox,
)

RELAY_LOG = "services.runtime.outbox"

# -- BulkInsert on PostgreSQL: the statement is built once -------------------------------------------


class QuotingPgConnection(RecordingPgConnection):
    """A recording PostgreSQL connection with a dialect of its own that counts the identifiers it
    quotes: building an INSERT quotes the table and every column, sending one built before none."""

    def __init__(self):
        super().__init__()
        self.dialect = psycopg.dialect()
        self.quoted = 0
        quote = self.dialect.identifier_preparer.quote

        def counting_quote(name):
            self.quoted += 1
            return quote(name)

        self.dialect.identifier_preparer.quote = counting_quote


def test_a_postgresql_bulk_insert_builds_its_statement_once_and_later_batches_only_send_values():
    claims = BulkInsert(inbox_table(MetaData()), INBOX_ROW_COLUMNS, on_conflict_ignore=True, returning="event_id")
    conn = QuotingPgConnection()

    claims.execute(conn, [inbox_claim("e-1", 1)])
    built = conn.quoted
    assert built == 1 + len(INBOX_ROW_COLUMNS) + 1  # the table, its columns, the RETURNING column

    claims.execute(conn, [inbox_claim("e-2", 2), inbox_claim("e-3", 3)])
    assert conn.quoted == built  # nothing built again
    [(first_sql, _), (second_sql, second_params)] = conn.sent
    assert second_sql == first_sql and second_params[1] == ["e-2", "e-3"]


def test_staging_outbox_rows_on_postgresql_builds_the_statement_once_per_outbox_table():
    outbox_ = outbox_table(MetaData())  # a table of its own: add_rows keeps one BulkInsert per table
    rows = [outbox_row(CODEC, order_recorded("o-1"), Envelope(new_event_id(), "OrderRecorded", 1, "o-1"))]
    conn = QuotingPgConnection()

    add_rows(conn, outbox_, rows)
    built = conn.quoted
    assert built > 0
    add_rows(conn, outbox_, rows)
    add_rows(conn, outbox_, rows)

    assert conn.quoted == built
    assert len(conn.sent) == 3 and len({sql for sql, _ in conn.sent}) == 1


# -- BulkInsert on SQLite: the parameter limit ---------------------------------------------------------


@pytest.fixture
def old_sqlite_engine(tmp_path):
    """SQLite limited to 999 parameters per statement, as before 3.32 (the limit the code keeps to)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")

    @event.listens_for(engine, "connect")
    def _limit(dbapi_conn, _record):
        dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    yield engine
    engine.dispose()


def test_rows_wider_than_half_the_parameter_limit_go_one_per_statement(old_sqlite_engine):
    names = ["id", *(f"c{i}" for i in range(1, 500))]  # 500 parameters a row: two rows would be 1000
    wide = Table("wide", MetaData(), Column("id", String(8), primary_key=True),
                 *(Column(name, Integer) for name in names[1:]))
    wide.metadata.create_all(old_sqlite_engine)
    rows = [{"id": key, **{name: n for n, name in enumerate(names[1:])}} for key in ("r-1", "r-2", "r-3")]

    with old_sqlite_engine.begin() as conn:
        inserted = BulkInsert(wide, names, returning="id").execute(conn, rows)

    assert sorted(inserted) == ["r-1", "r-2", "r-3"]
    with old_sqlite_engine.connect() as conn:
        assert conn.execute(select(wide.c.id, wide.c.c499).order_by(wide.c.id)).all() == [
            ("r-1", 498), ("r-2", 498), ("r-3", 498)]


# -- the relay: what a batch selects, and how long it holds the relay -------------------------------


@pytest.fixture
def unordered_engine(tmp_path):
    """SQLite that hands back the rows of a SELECT without ORDER BY in reverse (its own test aid)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'unordered.db'}")

    @event.listens_for(engine, "connect")
    def _reverse(dbapi_conn, _record):
        dbapi_conn.execute("PRAGMA reverse_unordered_selects = ON")

    yield engine
    engine.dispose()


def test_a_batch_takes_the_oldest_unpublished_rows_in_seq_order_whatever_order_sqlite_scans(unordered_engine):
    outbox_ = outbox_table(MetaData())
    outbox_.metadata.create_all(unordered_engine)
    for order in ("o-1", "o-2", "o-3"):
        stage_outbox_row(unordered_engine, outbox_, order)
    broker = AckingBroker()
    relay = OutboxRelay(unordered_engine, outbox_, broker, batch_size=2)

    assert relay.publish_batch() == 2
    assert relay.publish_batch() == 1

    assert [r["key"] for r in broker.produced] == [b"o-1", b"o-2", b"o-3"]


class AwayBroker(SlowBroker):
    """A broker that is away: nothing is acked, a flush waits its whole timeout, and a `poll`
    waits its timeout; without one (None or negative) it blocks until the next delivery report,
    which with the broker away comes when `message.timeout.ms` (300 s by default) expires."""

    MESSAGE_TIMEOUT_S = 300.0

    def poll(self, timeout=None):
        self.clock.now += self.MESSAGE_TIMEOUT_S if timeout is None or timeout < 0 else timeout
        return 0


def test_while_the_broker_is_away_a_batch_holds_the_relay_for_the_30_s_flush_and_no_longer(engine, outbox,
                                                                                           fake_time):
    for order in ("o-1", "o-2", "o-3"):
        stage_outbox_row(engine, outbox, order)
    broker = AwayBroker(fake_time)
    relay = OutboxRelay(engine, outbox, broker)
    started = fake_time.now

    with pytest.raises(DeliveryFailed, match="3 still on their way$"):
        relay.publish_batch()

    assert len(broker.produced) == 3
    assert fake_time.now - started == 30.0  # producing the three rows waited for nothing


def test_the_last_flush_slice_ends_at_the_deadline_even_when_shorter_than_a_second(engine, outbox, fake_time):
    stage_outbox_row(engine, outbox, "o-1")
    broker = SlowBroker(fake_time, overshoot=0.9)  # each 5 s slice overruns: 29.5 s gone after five
    relay = OutboxRelay(engine, outbox, broker)

    with pytest.raises(DeliveryFailed):
        relay.publish_batch()

    assert broker.flushes == [5.0] * 5 + [pytest.approx(0.5)]


# -- cleanup ----------------------------------------------------------------------------------------


def test_cleanup_keeps_a_row_published_exactly_one_retention_ago(engine, outbox, monkeypatch):
    now = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
    monkeypatch.setattr("services.runtime.outbox.utcnow", lambda: now)
    at_retention, just_before = (stage_outbox_row(engine, outbox, o) for o in ("o-at", "o-before"))
    with engine.begin() as conn:
        conn.execute(update(outbox).where(outbox.c.id == at_retention).values(published_at=now - timedelta(hours=24)))
        conn.execute(update(outbox).where(outbox.c.id == just_before).values(
            published_at=now - timedelta(hours=24, microseconds=1)))
    relay = OutboxRelay(engine, outbox, AckingBroker())

    assert relay.cleanup() == 1

    with engine.connect() as conn:
        assert list(conn.execute(select(outbox.c.id)).scalars()) == [at_retention]


# -- run: the first round, the cleanup cadence --------------------------------------------------------


def test_the_first_round_samples_the_backlog_gauge_without_waiting_5_s(engine, outbox, fake_time):
    fake_time.now = 5.5  # a host whose monotonic clock started moments ago
    for order in ("o-1", "o-2"):
        stage_outbox_row(engine, outbox, order)
    relay = OutboxRelay(engine, outbox, AckingBroker(), batch_size=1, name="details-first-sample")
    relay.cleanup = lambda: 0
    OUTBOX_BACKLOG.labels("details-first-sample").set(-1)  # the registry outlives a test

    relay.run(Stop(rounds=2))  # one round: one batch of one row

    assert backlog_gauge("details-first-sample") == 1


def test_a_relay_without_a_name_reports_its_backlog_as_the_outbox(engine, outbox, fake_time):
    stage_outbox_row(engine, outbox, "o-1")
    relay = OutboxRelay(engine, outbox, AckingBroker())
    relay.cleanup = lambda: 0
    OUTBOX_BACKLOG.labels("outbox").set(-1)  # the registry outlives a test

    relay.run(Stop(rounds=2))

    assert backlog_gauge("outbox") == 0


def test_the_first_round_cleans_up_without_waiting_a_minute(engine, outbox, fake_time):
    fake_time.now = 60.5
    relay = OutboxRelay(engine, outbox, AckingBroker())
    cleanups: list[float] = []
    relay.cleanup = lambda: cleanups.append(fake_time.now) or 0

    relay.run(Stop(rounds=2))

    assert cleanups == [60.5]


def test_cleanup_comes_again_as_soon_as_more_than_a_minute_has_passed(engine, outbox, fake_time):
    relay = OutboxRelay(engine, outbox, AckingBroker())
    cleanups: list[float] = []
    relay.cleanup = lambda: cleanups.append(fake_time.now) or 0

    def tick(check: int) -> None:
        fake_time.now += 60.5

    relay.run(Stop(rounds=4, on_check=tick))  # three rounds, 60.5 s apart

    assert [later - earlier for earlier, later in zip(cleanups, cleanups[1:])] == [60.5, 60.5]


# -- run: standing by on PostgreSQL -----------------------------------------------------------------


class StandbyPostgres:
    """Just enough of an Engine on PostgreSQL whose outbox another relay leads: every
    `pg_try_advisory_lock` answers false. Records the statements sent."""

    dialect = SimpleNamespace(name="postgresql")
    url = SimpleNamespace(database="orders")

    def __init__(self):
        self.statements: list[str] = []

    @contextmanager
    def connect(self):
        def execute(statement, params=None):
            self.statements.append(str(statement))
            return SimpleNamespace(scalar=lambda: False)

        yield SimpleNamespace(execute=execute, commit=lambda: None, rollback=lambda: None)


def test_a_standby_relay_tries_for_the_lock_once_a_second_and_leaves_when_stopped(outbox):
    postgres, broker = StandbyPostgres(), AckingBroker()
    relay = OutboxRelay(postgres, outbox, broker)
    stop = Stop(rounds=3)

    relay.run(stop)

    assert postgres.statements == ["SELECT pg_try_advisory_lock(:k)"] * 2
    assert stop.waits == [1.0, 1.0]
    assert broker.produced == [] and broker.flushes == [10]


# -- run: the warnings an operator reads ----------------------------------------------------------------


def relay_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == RELAY_LOG and r.levelno == logging.WARNING]


def failing_once(failure: Exception):
    """A `publish_batch` that raises `failure` the first time and finds nothing to publish after."""
    raised = []

    def publish_batch() -> int:
        if not raised:
            raised.append(failure)
            raise failure
        return 0

    return publish_batch


@pytest.mark.parametrize("failure", [
    OperationalError("SELECT seq FROM outbox", {}, Exception("database is locked " + "x" * 600)),
    LeadershipLost("the relay's advisory lock is no longer held " + "y" * 600),
], ids=["database", "leadership"])
def test_starting_over_warns_with_the_error_cut_at_500_characters(engine, outbox, fake_time, caplog, failure):
    relay = OutboxRelay(engine, outbox, AckingBroker())
    relay.publish_batch = failing_once(failure)
    relay.cleanup = lambda: 0
    caplog.set_level(logging.WARNING, logger=RELAY_LOG)

    relay.run(Stop(rounds=3))

    [warning] = relay_warnings(caplog)
    assert warning.getMessage() == "outbox relay lost its database or its leadership; starting over"
    assert warning.error == str(failure)[:500] and len(str(failure)) > 501


def test_a_failed_delivery_warns_that_it_retries_with_the_delivery_failure(engine, outbox, fake_time, caplog):
    stage_outbox_row(engine, outbox, "o-1")
    timed_out = KafkaError(KafkaError._MSG_TIMED_OUT)
    relay = OutboxRelay(engine, outbox, AckingBroker(errors=[timed_out]), batch_size=1)
    relay.cleanup = lambda: 0
    caplog.set_level(logging.WARNING, logger=RELAY_LOG)

    relay.run(Stop(rounds=2))

    [warning] = relay_warnings(caplog)
    assert warning.getMessage() == "outbox delivery failed; retrying"
    assert warning.error == f"1 outbox rows failed delivery ({[timed_out]}), 0 still on their way"


# -- the status fold: the STALLED reason ----------------------------------------------------------------


def test_a_dead_lettered_step_stored_without_an_error_reads_no_error_recorded():
    t0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
    created = next_status(None, "OrderCreated", {"order_id": "o-1", "created_at": t0}, "ev-created", t0)
    stored = created.to_json()
    stored["steps"]["email"] = {"state": "dead_lettered", "attempts": 3, "failures": 3, "last_error": None,
                                "updated_at": t0.isoformat(), "detail": "orders.created.email.dlt"}

    status = next_status(OrderStatus.from_json(stored), "StockReserved", {"order_id": "o-1"}, "ev-stock",
                         t0 + timedelta(seconds=1))

    assert (status.state, status.reason) == ("STALLED", "email dead-lettered: no error recorded")
