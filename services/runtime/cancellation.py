"""What every consumer service does with an OrderCancelled: undo its part once, and never do
later what the cancellation came before.

Each service that compensates keeps a `cancelled_orders` table (`cancelled_orders_table`) in its
own database: the order ids it has compensated, with what it did. The row is written in the
transaction of the compensation and its StepCompensated outbox row, so the compensation happens
exactly once. Its handlers of the order's other events ask `is_cancelled` first and skip the
work when the cancellation was here before them: OrderCancelled travels on its own topic
(orders.cancelled), so a service may read it before the order's OrderCreated, or before the
StockReserved its invoice waits for. Within one topic and key the order holds (and a retried
event holds back the key's later ones, services/runtime/held.py), across topics this row is
what keeps the outcome the same in any order.
"""

from __future__ import annotations

import functools
import hashlib

from collections.abc import Iterable

from sqlalchemy import Column, DateTime, MetaData, String, Select, Table, bindparam, func, select

from services.runtime.db import among, insert_ignore
from services.runtime.events import StepCompensated
from services.runtime.handler import BatchUnitOfWork, UnitOfWork

ACTION_LIMIT = 500


def cancelled_orders_table(metadata: MetaData) -> Table:
    return Table(
        "cancelled_orders", metadata,
        Column("order_id", String(64), primary_key=True),
        Column("compensation", String(ACTION_LIMIT), nullable=False),  # what the service did, in words
        Column("document", String(255), nullable=True),  # what it issued: a credit note's number, a mail's Message-ID
        Column("compensated_at", DateTime(timezone=True), nullable=False),
    )


def is_cancelled(uow: UnitOfWork, table: Table, order_id: str) -> bool:
    """Whether the service compensated the order already: its other events then do nothing.

    First takes the order's lock for the rest of the transaction: the order's OrderCreated and
    its OrderCancelled come from different topics, and two instances of the group may run them
    at the same moment; without the lock each read the other's work as not done yet (PostgreSQL,
    READ COMMITTED), and the stock reserved by one stayed reserved although the other released
    "nothing". On SQLite the transaction holds the database's write lock already."""
    if uow.conn.dialect.name == "postgresql":
        uow.conn.execute(_TAKE_ORDER_LOCK, {"lock_key": _order_lock(order_id)})
    return uow.conn.execute(_is_cancelled_query(table), {"order_id": order_id}).first() is not None


# Built once and executed with parameters: building them per call was a sixth of the invoice
# service's CPU per order and an eighth of the e-mail service's (py-spy, bench section d).
_TAKE_ORDER_LOCK = select(func.pg_advisory_xact_lock(bindparam("lock_key")))


@functools.cache  # built once per table
def _is_cancelled_query(table: Table) -> Select:
    return select(table.c.order_id).where(table.c.order_id == bindparam("order_id"))


def cancelled_among(uow: BatchUnitOfWork, table: Table, order_ids: Iterable[str]) -> set[str]:
    """`is_cancelled` for a batch handler's run: which of the orders the service compensated
    already. On PostgreSQL it first takes every order's lock in one statement, in ascending
    lock order (two instances taking overlapping sets then wait for each other instead of
    deadlocking)."""
    order_ids = set(order_ids)
    if not order_ids:
        return set()
    if uow.conn.dialect.name == "postgresql":
        # A function scan yields the array's elements in order: the locks are taken in that order.
        uow.conn.exec_driver_sql("SELECT pg_advisory_xact_lock(k) FROM unnest(%b::bigint[]) AS k",
                                 (sorted({_order_lock(o) for o in order_ids}),))
    found = uow.conn.execute(_cancelled_among_query(table, uow.conn.dialect.name), {"ids": sorted(order_ids)})
    return {row[0] for row in found}


@functools.cache  # built once per table and dialect
def _cancelled_among_query(table: Table, dialect_name: str) -> Select:
    return select(table.c.order_id).where(among(table.c.order_id, "ids", dialect_name))


def _order_lock(order_id: str) -> int:
    """The order's PostgreSQL advisory lock key (a signed 64-bit hash of its id)."""
    digest = hashlib.blake2b(order_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def was_cancelled_before(uow: UnitOfWork, table: Table, order_id: str) -> bool:
    """`is_cancelled` for a handler whose slow work (an SMTP send) must come before its
    transaction begins: a short read of its own, without the lock. Two instances running the
    order's two events at the same moment may then both send their mail (confirmation and
    cancellation); nothing else is at stake for such a handler."""
    return uow.read(_is_cancelled_query(table), {"order_id": order_id}).first() is not None


def compensated(uow: UnitOfWork, table: Table, order_id: str, action: str,
                document: str | None = None) -> list[StepCompensated]:
    """Record the compensation in the handler's transaction and return its StepCompensated;
    nothing when it was recorded before (then it had already been done)."""
    action = action[:ACTION_LIMIT]
    if not insert_ignore(uow.conn, table, {"order_id": order_id, "compensation": action, "document": document,
                                           "compensated_at": uow.now}):
        return []
    return [StepCompensated(order_id=order_id, step=uow.group, action=action, document=document,
                            compensated_at=uow.now)]
