"""Database engines and the two tables every service shares: the outbox and the inbox.

SQLite is the embedded default, PostgreSQL the production target; both run the same Core
statements. SQLite needs two adjustments so that our transactions mean what they say:
`BEGIN IMMEDIATE` takes the write lock at the start (a consumer and its relay thread write the
same file; upgrading a read lock later would deadlock), and WAL lets the relay read while the
consumer writes.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON, BigInteger, Column, DateTime, Index, Integer, LargeBinary, MetaData, String, Table, UniqueConstraint,
    any_, bindparam, create_engine, event,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(at: datetime) -> datetime:
    """A time read back from a database, with its zone: SQLite returns the stored UTC times naive."""
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _switch_to_wal(cursor: Any, timeout_s: float = 30.0) -> None:
    """`PRAGMA journal_mode=WAL`, asked again while the database is locked. When connections
    open a new database together (the orders API and relay start at once), SQLite answers the
    switch with "database is locked" at once, without waiting out the busy timeout: 6 in 60
    fresh databases failed so with three connections, and one CI run with it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


_READ_ONLY = "orderpipe_read_only"  # execution option: see read_only()


def read_only(engine: Engine) -> Connection:
    """A connection for reads only (use it as a context manager). On SQLite its transactions
    begin DEFERRED and take no write lock, so reads do not queue behind (or hold up) a writer;
    a write through it may fail at once with "database is locked" instead of waiting."""
    return engine.connect().execution_options(**{_READ_ONLY: True})


def make_engine(url: str, **kwargs) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # let SQLAlchemy emit BEGIN itself (savepoints work)
            cur = dbapi_conn.cursor()
            _switch_to_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")  # durable at each WAL checkpoint; fine for the embedded mode
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # IMMEDIATE: a transaction that writes takes the write lock when it begins, so two
            # writers never deadlock upgrading their locks; read_only() ones need none.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True, **kwargs)


# Integer on SQLite so the column is the rowid and autoincrements; BIGINT elsewhere.
_Seq = BigInteger().with_variant(Integer(), "sqlite")


def outbox_table(metadata: MetaData) -> Table:
    """Debezium's outbox columns (id, aggregatetype, aggregateid, type, payload) plus ours.

    `seq` orders publication; `payload` is already the Avro wire-format value, so the relay
    never needs the schema; `headers` carries the envelope (event id, causation, traceparent).
    """
    return Table(
        "outbox", metadata,
        Column("seq", _Seq, primary_key=True, autoincrement=True),
        Column("id", String(36), nullable=False, unique=True),
        Column("aggregatetype", String(64), nullable=False),
        Column("aggregateid", String(64), nullable=False),
        Column("type", String(128), nullable=False),
        Column("topic", String(249), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("headers", JSON, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
        Column("published_at", DateTime(timezone=True), nullable=True, index=True),
    )


def inbox_table(metadata: MetaData) -> Table:
    """The dedup key (group, event id): a row here means the event's effect is committed."""
    return Table(
        "inbox", metadata,
        Column("group_name", String(64), primary_key=True),
        Column("event_id", String(64), primary_key=True),
        Column("event_type", String(128), nullable=False),
        Column("topic", String(249), nullable=False),
        Column("partition", Integer, nullable=False),
        Column("offset", BigInteger, nullable=False),
        Column("processed_at", DateTime(timezone=True), nullable=False, default=utcnow),
    )


def held_keys_table(metadata: MetaData) -> Table:
    """Keys whose events wait for an earlier one in the retry chain (services/runtime/held.py)."""
    return Table(
        "held_keys", metadata,
        Column("group_name", String(64), primary_key=True),
        Column("key", String(255), primary_key=True),
        Column("head_event_id", String(64), nullable=False),  # the event the key waits for
        Column("state", String(16), nullable=False),  # retrying | dead-lettered | releasing
        Column("reason", String(500), nullable=False),
        Column("topic", String(249), nullable=False),  # where the key's events come from: who releases
        Column("partition", Integer, nullable=False),
        Column("since", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )


def held_events_table(metadata: MetaData) -> Table:
    """The events of held keys, in the order they arrived (`seq`), as they came from Kafka."""
    return Table(
        "held_events", metadata,
        Column("seq", _Seq, primary_key=True, autoincrement=True),
        Column("group_name", String(64), nullable=False),
        Column("key", String(255), nullable=False),
        Column("event_id", String(64), nullable=False),
        Column("topic", String(249), nullable=False),
        Column("partition", Integer, nullable=False),
        Column("offset", BigInteger, nullable=False),
        Column("timestamp_ms", BigInteger, nullable=False),
        Column("value", LargeBinary, nullable=True),
        Column("headers", JSON, nullable=False),
        Column("held_at", DateTime(timezone=True), nullable=False),
        # set once its own retry copy is acked, when it failed on release (it is then the head)
        Column("copy_sent_at", DateTime(timezone=True), nullable=True),
        UniqueConstraint("group_name", "event_id", name="uq_held_events_group_event"),
        Index("ix_held_events_group_key_seq", "group_name", "key", "seq"),
    )



def worker_state_table(metadata: MetaData) -> Table:
    """What each running consumer worker reports about itself (services/runtime/worker_state.py):
    one row per (group, instance), rewritten on change and as a heartbeat, deleted on a clean stop."""
    return Table(
        "worker_state", metadata,
        Column("group_name", String(64), primary_key=True),
        Column("instance", String(128), primary_key=True),  # host:pid:random, new for every start
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("breaker", String(16), nullable=True),  # closed | open | half_open; none without a breaker
        Column("paused", JSON, nullable=False),  # [{topic, partition, reason, since, until}]
        Column("alerts", JSON, nullable=False),  # the conditions open now: [{kind, since, message}]
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),  # the heartbeat
    )


_INSERT_IGNORE: dict[tuple[str, Table], Any] = {}


def _insert_ignore_stmt(conn: Connection, table: Table) -> Any:
    # Built once per dialect and table and executed with parameters: building it per row with
    # `.values(**row)` made SQLAlchemy walk every bound value for its cache key, on every message.
    key = (conn.dialect.name, table)
    stmt = _INSERT_IGNORE.get(key)
    if stmt is None:
        dialect = {"sqlite": sqlite, "postgresql": postgresql}.get(conn.dialect.name)
        if dialect is None:  # pragma: no cover - other databases are not supported
            raise NotImplementedError(conn.dialect.name)
        # RETURNING rather than rowcount: psycopg 3 reports -1 for INSERTs through SQLAlchemy 2.
        stmt = _INSERT_IGNORE[key] = (
            dialect.insert(table).on_conflict_do_nothing().returning(*table.primary_key.columns))
    return stmt


def insert_ignore(conn: Connection, table: Table, values: dict) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when the row is new.

    A conflict on the inbox key means "already done", never an error.
    """
    return conn.execute(_insert_ignore_stmt(conn, table), values).first() is not None


def upsert_add(conn: Connection, table: Table, keys: dict, increments: dict) -> None:
    """INSERT the row, or add `increments` to the existing one (atomic on both databases)."""
    cache_key = (conn.dialect.name, table, tuple(keys), tuple(increments))
    stmt = _UPSERT_ADD.get(cache_key)
    if stmt is None:
        # Built once and executed with parameters, as _insert_ignore_stmt: building it per call
        # (.values(), .excluded, the + expressions) cost more than the database's work.
        dialect = {"sqlite": sqlite, "postgresql": postgresql}[conn.dialect.name]
        stmt = dialect.insert(table)
        stmt = _UPSERT_ADD[cache_key] = stmt.on_conflict_do_update(
            index_elements=list(keys), set_={col: table.c[col] + stmt.excluded[col] for col in increments})
    conn.execute(stmt, {**keys, **increments})


_UPSERT_ADD: dict[tuple, Any] = {}


def among(column: Column, param: str, dialect_name: str) -> ColumnElement[bool]:
    """`column IN (the list bound as `param`)`, for a batch's hundreds of values. On PostgreSQL
    the list travels as one array (`= ANY(...)`): an expanding IN of 500 values cost ~3.5 ms of
    CPU per statement to render and bind, the array ~1 ms. SQLite has no arrays; its expanding
    IN costs ~0.7 ms, in-process."""
    if dialect_name == "postgresql":
        return column == any_(bindparam(param, type_=postgresql.ARRAY(column.type)))
    return column.in_(bindparam(param, expanding=True))
