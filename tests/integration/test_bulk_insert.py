"""The consumer's bulk statements (services/runtime/bulk.py) on real SQLite and PostgreSQL:
they must store exactly what a Core insert() stores, keep list order for the auto-increment
key, and report only the rows they really inserted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import JSON, Column, MetaData, String, Table, select

from services.runtime.bulk import BulkInsert
from services.runtime.db import inbox_table, outbox_table
from services.runtime.handler import INBOX_ROW_COLUMNS
from services.runtime.outbox import OUTBOX_ROW_COLUMNS

T0 = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)


def _as_read(value):
    """What reading a stored value back gives: SQLite keeps no time zone (Core's insert() the
    same, which the Core-inserted reference row below shows)."""
    return value.astimezone(UTC).replace(tzinfo=None) if isinstance(value, datetime) else value


def _read_back(row: dict, dialect_name: str) -> dict:
    return {k: _as_read(v) for k, v in row.items()} if dialect_name == "sqlite" else row


def _outbox_row(i: int) -> dict:
    return {"id": f"event-{i:05d}", "aggregatetype": "order", "aggregateid": f"order-{i % 7}",
            "type": "OrderRecorded", "topic": "analytics.recorded", "payload": bytes([0, i % 256, 1, 2]) * 3,
            "headers": [["event_id", f"event-{i:05d}"], ["quote", 'a "quoted", [bracketed] value ✓']],
            "created_at": T0 + timedelta(microseconds=i)}


def _inbox_row(i: int, group: str = "g") -> dict:
    return {"group_name": group, "event_id": f"event-{i:05d}", "event_type": "OrderCreated", "topic": "orders.created",
            "partition": i % 3, "offset": 10**12 + i, "processed_at": T0}


def test_outbox_rows_read_back_as_core_insert_stores_them(database_url, test_engine):
    engine = test_engine(database_url)
    metadata = MetaData()
    outbox = outbox_table(metadata)
    metadata.create_all(engine)
    bulk = [_outbox_row(i) for i in range(1200)]  # beyond one SQLite statement's parameter budget
    core = _outbox_row(5000)
    with engine.begin() as conn:
        assert BulkInsert(outbox, OUTBOX_ROW_COLUMNS).execute(conn, bulk) == []
        conn.execute(outbox.insert(), core)
    with engine.connect() as conn:
        stored = conn.execute(select(outbox).order_by(outbox.c.seq)).mappings().all()
    assert len(stored) == 1201
    # list order is seq order: the relay publishes an order's events in the order they were staged
    assert [r["id"] for r in stored] == [r["id"] for r in bulk] + [core["id"]]
    for expected, row in zip([*bulk, core], stored):
        assert {k: row[k] for k in OUTBOX_ROW_COLUMNS} == _read_back(expected, engine.dialect.name)
        assert row["published_at"] is None


def test_inbox_claims_return_only_new_keys(database_url, test_engine):
    engine = test_engine(database_url)
    metadata = MetaData()
    inbox = inbox_table(metadata)
    metadata.create_all(engine)
    claims = BulkInsert(inbox, INBOX_ROW_COLUMNS, on_conflict_ignore=True, returning="event_id")
    with engine.begin() as conn:
        first = claims.execute(conn, [_inbox_row(i) for i in range(0, 400)])
    assert sorted(first) == [f"event-{i:05d}" for i in range(400)]
    with engine.begin() as conn:
        # 200 seen before, 200 new, one new key twice in the batch, one key of another group
        batch = [_inbox_row(i) for i in range(200, 600)] + [_inbox_row(599), _inbox_row(3, group="other")]
        second = claims.execute(conn, batch)
    assert sorted(second) == [f"event-{i:05d}" for i in range(3, 4)] + [f"event-{i:05d}" for i in range(400, 600)]
    with engine.connect() as conn:
        stored = conn.execute(select(inbox).where(inbox.c.event_id == "event-00599", inbox.c.group_name == "g")
                              ).mappings().one()
        assert dict(stored) == _read_back(_inbox_row(599), engine.dialect.name)
        assert len(conn.execute(select(inbox.c.event_id)).all()) == 601


def test_nothing_to_insert(database_url, test_engine):
    engine = test_engine(database_url)
    metadata = MetaData()
    inbox = inbox_table(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        assert BulkInsert(inbox, INBOX_ROW_COLUMNS, on_conflict_ignore=True, returning="event_id").execute(conn, []) == []


def test_rows_whose_key_exists_get_the_named_columns_replaced_and_keep_the_others(database_url, test_engine):
    engine = test_engine(database_url)
    metadata = MetaData()
    table = Table("replaced", metadata, Column("k", String(8), primary_key=True), Column("doc", JSON, nullable=True),
                  Column("note", String(16), nullable=True))
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"k": "a", "doc": {"v": 1}, "note": "kept"}, {"k": "b", "doc": None, "note": "kept"}])
        BulkInsert(table, ("k", "doc"), on_conflict_set=("doc",)).execute(
            conn, [{"k": "b", "doc": {"v": [2, "two"]}}, {"k": "c", "doc": {"v": 3}}, {"k": "a", "doc": None}])
    with engine.connect() as conn:
        stored = {r.k: (r.doc, r.note) for r in conn.execute(select(table))}
    assert stored == {"a": (None, "kept"), "b": ({"v": [2, "two"]}, "kept"), "c": ({"v": 3}, None)}


def test_a_conflict_has_one_policy():
    with pytest.raises(ValueError, match="one of them"):
        BulkInsert(inbox_table(MetaData()), INBOX_ROW_COLUMNS, on_conflict_ignore=True, on_conflict_set=("topic",))
