"""Many rows in one statement: the consumer's inbox claims and outbox rows for a whole batch.

SQLAlchemy's executemany paths cost more than the database itself here: per row it builds
and processes a parameter dict, and on PostgreSQL an executemany is one INSERT per row. These
statements go to the driver with values already in the driver's form:
- PostgreSQL: one `INSERT ... SELECT FROM unnest(array, array, ...)`, one array per column,
  whatever the row count, sent in binary (`%b`: half the time of psycopg's text arrays, which
  quote every element); JSON columns travel as one JSON array, expanded server-side (a
  text-to-json cast per element was slower than the insert itself);
- SQLite: the driver's executemany; for inbox claims (`on_conflict_ignore` + `returning`) in a
  savepoint, falling back to a multi-row `VALUES ... ON CONFLICT DO NOTHING RETURNING` (in
  chunks under SQLite's parameter limit) only when some key already exists.

Values are converted by the columns' own SQLAlchemy bind processors, so what is stored is
exactly what a Core `insert()` would store, and reads through the `Table` see no difference.
Only SQLite and PostgreSQL are supported, as everywhere in the runtime.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import JSON, Column, Table
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import IntegrityError

# SQLite's default SQLITE_MAX_VARIABLE_NUMBER was 999 before 3.32: stay under it everywhere.
_SQLITE_MAX_PARAMS = 999


class BulkInsert:
    """INSERT of many rows of `table` with the given `columns` (every row has all of them;
    the others take their server defaults). On a row whose primary key exists:
    `on_conflict_ignore` skips it; `on_conflict_add` names columns added to the stored row's
    (a batch of `db.upsert_add`); `on_conflict_set` names columns that replace the stored
    row's. With either of the last two the rows' keys must be distinct (PostgreSQL updates a
    row once per statement). `returning` names a column whose values of the inserted rows
    `execute` returns, in no particular order. Rows are inserted in list order (auto-increment
    keys follow it)."""

    def __init__(self, table: Table, columns: Sequence[str], *, on_conflict_ignore: bool = False,
                 on_conflict_add: Sequence[str] = (), on_conflict_set: Sequence[str] = (),
                 returning: str | None = None):
        if sum(map(bool, (on_conflict_ignore, on_conflict_add, on_conflict_set))) > 1:
            raise ValueError("a conflict is either ignored, added to or replaced: one of them")
        self.table = table
        self.columns: list[Column] = [table.c[name] for name in columns]
        self.on_conflict_ignore = on_conflict_ignore
        self.on_conflict_add: list[Column] = [table.c[name] for name in on_conflict_add]
        self.on_conflict_set: list[Column] = [table.c[name] for name in on_conflict_set]
        self.returning = table.c[returning] if returning else None
        self._by_dialect: dict[str, Any] = {}

    def execute(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> list:
        if not rows:
            return []
        dialect = conn.dialect
        if dialect.name == "postgresql":
            return self._postgresql(conn, rows)
        if dialect.name == "sqlite":
            return self._sqlite(conn, rows)
        raise NotImplementedError(dialect.name)  # pragma: no cover - as in db.py

    # -- PostgreSQL -------------------------------------------------------------------------

    def _postgresql(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> list:
        sql = self._by_dialect.get("postgresql")
        if sql is None:
            sql = self._by_dialect["postgresql"] = self._postgresql_sql(conn.dialect)
        params = []
        json_columns = []
        for col in self.columns:
            values = [row[col.name] for row in rows]
            if isinstance(col.type, JSON):
                json_columns.append(json.dumps(values))
            else:
                params.append(values)
        result = conn.exec_driver_sql(sql, tuple(params + json_columns))
        return [r[0] for r in result] if self.returning is not None else []

    def _postgresql_sql(self, dialect: Dialect) -> str:
        quote = dialect.identifier_preparer.quote
        arrays, selected, joins = [], [], []
        for i, col in enumerate(self.columns):
            if isinstance(col.type, JSON):
                alias = f"j{i}"
                joins.append(f"JOIN json_array_elements(%b::json) WITH ORDINALITY AS {alias}(value, n) "
                             f"ON {alias}.n = u.n")
                selected.append(f"{alias}.value")
            else:
                arrays.append(f"%b::{col.type.compile(dialect=dialect)}[]")
                selected.append(f"u.c{i}")
        names = [f"c{i}" for i, col in enumerate(self.columns) if not isinstance(col.type, JSON)]
        sql = (f"INSERT INTO {quote(self.table.name)} ({', '.join(quote(c.name) for c in self.columns)}) "
               f"SELECT {', '.join(selected)} FROM unnest({', '.join(arrays)}) WITH ORDINALITY AS u({', '.join(names)}, n) "
               + " ".join(joins) + " ORDER BY u.n")  # the order keys (the outbox's seq) are drawn in
        if self.on_conflict_ignore:
            sql += " ON CONFLICT DO NOTHING"
        sql += self._add_on_conflict(dialect)
        if self.returning is not None:
            sql += f" RETURNING {quote(self.returning.name)}"
        return sql

    def _add_on_conflict(self, dialect: Dialect) -> str:
        """The ON CONFLICT ... DO UPDATE clause of `on_conflict_add` or `on_conflict_set`."""
        if not (self.on_conflict_add or self.on_conflict_set):
            return ""
        quote = dialect.identifier_preparer.quote
        keys = ", ".join(quote(c.name) for c in self.table.primary_key.columns)
        updates = [f"{quote(c.name)} = {quote(self.table.name)}.{quote(c.name)} + excluded.{quote(c.name)}"
                   for c in self.on_conflict_add]
        updates += [f"{quote(c.name)} = excluded.{quote(c.name)}" for c in self.on_conflict_set]
        return f" ON CONFLICT ({keys}) DO UPDATE SET {', '.join(updates)}"

    # -- SQLite -----------------------------------------------------------------------------

    def _sqlite(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> list:
        processors = self._by_dialect.get("sqlite")
        if processors is None:
            processors = self._by_dialect["sqlite"] = [c.type._cached_bind_processor(conn.dialect)
                                                       for c in self.columns]
        # Column by column: map() over a column is much cheaper than a dict per row.
        columns = []
        for col, process in zip(self.columns, processors):
            values = [row[col.name] for row in rows]
            columns.append(list(map(process, values)) if process else values)
        tuples = list(zip(*columns))
        one_row = "(" + ", ".join("?" * len(self.columns)) + ")"
        if self.returning is None:
            conn.exec_driver_sql(self._sqlite_executemany_sql(conn.dialect, plain=False), tuples)
            return []
        if self.on_conflict_ignore:
            # Nearly every claim is new: a plain executemany in a savepoint is twice as fast as
            # the multi-row RETURNING statement below. The first conflict aborts it, the
            # savepoint undoes what it did, and the RETURNING statement says which rows are new.
            plain = self._sqlite_executemany_sql(conn.dialect, plain=True)
            try:
                with conn.begin_nested():
                    conn.exec_driver_sql(plain, tuples)
                at = self.columns.index(self.returning)
                return [row[at] for row in tuples]
            except IntegrityError:
                pass
        out: list = []
        per_statement = max(1, _SQLITE_MAX_PARAMS // len(self.columns))
        for start in range(0, len(tuples), per_statement):
            chunk = tuples[start:start + per_statement]
            flat = tuple(value for row in chunk for value in row)
            out += [r[0] for r in conn.exec_driver_sql(self._sqlite_sql(conn.dialect, [one_row] * len(chunk)), flat)]
        return out

    def _sqlite_executemany_sql(self, dialect: Dialect, *, plain: bool) -> str:
        """The one-row statement executemany runs (`plain`: without ON CONFLICT and RETURNING),
        built once: the per-message lanes run it for every message."""
        sql = self._by_dialect.get(("sqlite", plain))
        if sql is None:
            one_row = "(" + ", ".join("?" * len(self.columns)) + ")"
            sql = self._by_dialect[("sqlite", plain)] = self._sqlite_sql(
                dialect, [one_row], on_conflict=not plain, returning=not plain)
        return sql

    def _sqlite_sql(self, dialect: Dialect, value_rows: list[str], *, on_conflict: bool = True,
                    returning: bool = True) -> str:
        quote = dialect.identifier_preparer.quote
        sql = (f"INSERT INTO {quote(self.table.name)} ({', '.join(quote(c.name) for c in self.columns)}) "
               f"VALUES {', '.join(value_rows)}")
        if self.on_conflict_ignore and on_conflict:
            sql += " ON CONFLICT DO NOTHING"
        sql += self._add_on_conflict(dialect)
        if self.returning is not None and returning:
            sql += f" RETURNING {quote(self.returning.name)}"
        return sql
