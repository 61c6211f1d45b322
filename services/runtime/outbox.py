"""Transactional outbox: events are written with the state change that caused them, in the same
database transaction, and published afterwards by the relay.

Crash at any line and nothing is lost: a row is marked published only after the broker acked
it (acks=all, idempotent producer), so the worst case is publishing a row twice, which the
consumers' inbox absorbs.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from confluent_kafka import KafkaError, Producer
from sqlalchemy import Table, Update, bindparam, delete, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from services.runtime.bulk import BulkInsert
from services.runtime.codec import Codec
from services.runtime.crashpoints import crash_point
from services.runtime.db import among, read_only, utcnow
from services.runtime.envelope import Envelope
from services.runtime.events import BaseEvent
from services.runtime.kafka import raise_if_denied
from services.runtime.lag import OUTBOX_BACKLOG
from services.runtime.topology import TOPIC_FOR_EVENT

log = logging.getLogger(__name__)


def outbox_row(codec: Codec, event: BaseEvent, envelope: Envelope) -> dict[str, Any]:
    """The outbox row (Debezium's outbox columns plus headers and created_at) for one event;
    its aggregate id, the Kafka key, is `event.key()`: the order id, a StockAdjusted's SKU."""
    return {
        "id": envelope.event_id,
        "aggregatetype": event.aggregate_type,
        "aggregateid": event.key(),
        "type": envelope.event_type,
        "topic": TOPIC_FOR_EVENT[envelope.event_type],
        "payload": codec.encode(envelope.event_type, event.model_dump(), envelope.schema_version),
        "headers": [[k, v] for k, v in envelope.header_items()],
        "created_at": utcnow(),
    }


def add_event(conn: Connection, outbox: Table, codec: Codec, event: BaseEvent, envelope: Envelope) -> None:
    """Stage an event for publication inside the caller's transaction."""
    add_rows(conn, outbox, [outbox_row(codec, event, envelope)])


def add_rows(conn: Connection, outbox: Table, rows: list[dict[str, Any]]) -> None:
    """Stage outbox rows (as `outbox_row` makes them) in one statement, in list order."""
    if not rows:
        return
    insert = _INSERTS.get(outbox)
    if insert is None:
        insert = _INSERTS[outbox] = BulkInsert(outbox, OUTBOX_ROW_COLUMNS)
    insert.execute(conn, rows)


OUTBOX_ROW_COLUMNS = ("id", "aggregatetype", "aggregateid", "type", "topic", "payload", "headers", "created_at")
_INSERTS: dict[Table, BulkInsert] = {}


class DeliveryFailed(RuntimeError):
    pass


class LeadershipLost(RuntimeError):
    pass


class OutboxRelay:
    """Publishes unpublished outbox rows in `seq` order, key = aggregate id (the order id; a
    StockAdjusted's SKU).

    It selects every unpublished row rather than "rows after the last seq I saw", so a row
    whose transaction commits late (a lower seq committing after a higher one) is never skipped.
    """

    def __init__(self, engine: Engine, outbox: Table, producer: Producer, *, batch_size: int = 500,
                 retention: timedelta = timedelta(hours=24), on_published: Callable[[int], None] | None = None,
                 name: str = "outbox", wake: threading.Event | None = None):
        self.engine = engine
        self.outbox = outbox
        self.producer = producer
        self.batch_size = batch_size
        self.retention = retention
        self.on_published = on_published
        self._last_cleanup = -math.inf  # never: the first round cleans up (monotonic may read < 60 s)
        self.name = name  # the `service` label of the backlog gauge
        # Set by the writer of the rows when it runs in this process (a consumer service's loop
        # after a commit): the relay publishes at once instead of at its next poll. Rows written
        # elsewhere (the orders API, `orderpipe stock add`) are found by the poll as before.
        self.wake = wake
        self._last_backlog = -math.inf
        self._acked: list[int] = []  # seqs the broker acknowledged, not yet marked published
        self._failed: list[KafkaError] = []
        self._in_flight = 0  # rows produced whose delivery report has not come yet
        # Built once and executed with parameters: built per batch, SQLAlchemy's cache key walk
        # was an eighth of a relay's CPU (py-spy of the orders relay under load).
        c = outbox.c
        self._unpublished = (select(c.seq, c.topic, c.aggregateid, c.payload, c.headers)
                             .where(c.published_at.is_(None)).order_by(c.seq).limit(bindparam("limit")))

    def publish_batch(self) -> int:
        # Rows of an earlier batch may still be on their way: its flush timed out while the broker
        # was away. Wait for their delivery reports instead of producing them again (that only put
        # duplicates on the topic, one more copy per timed-out flush). librdkafka retries them until
        # `message.timeout.ms` and then reports each as failed, which leaves the row unpublished
        # for the next batch.
        if not self._in_flight:
            # Read-only: on SQLite the poll takes no write lock, so it neither waits for the
            # service's consumer transactions nor holds them up.
            with read_only(self.engine) as conn:
                rows = conn.execute(self._unpublished, {"limit": self.batch_size}).all()
            if not rows:
                return 0
            for row in rows:
                self.producer.produce(
                    row.topic, key=row.aggregateid.encode(), value=row.payload,
                    headers=[(k, v.encode()) for k, v in row.headers],
                    on_delivery=lambda err, msg, seq=row.seq: self._delivered(err, seq),
                )
                self._in_flight += 1
                self.producer.poll(0)
        crash_point("relay.after_produce")
        self._flush(30.0)
        (acked, self._acked), (errors, self._failed) = (self._acked, []), (self._failed, [])
        if acked:
            crash_point("relay.after_ack")
            with self.engine.begin() as conn:
                conn.execute(_mark_published(self.outbox, conn.dialect.name), {"seqs": acked, "at": utcnow()})
        if self.on_published:
            self.on_published(len(acked))
        raise_if_denied(errors, f"publishing the outbox of {self.name}")
        if errors or self._in_flight:
            # Rows not acked stay unpublished; failed ones go out again on the next batch.
            raise DeliveryFailed(f"{len(errors)} outbox rows failed delivery ({errors[:1]}), "
                                 f"{self._in_flight} still on their way")
        return len(acked)

    def _delivered(self, err: KafkaError | None, seq: int) -> None:
        """Delivery report of one row (called on this thread, inside flush and poll)."""
        self._in_flight -= 1
        (self._failed.append(err) if err else self._acked.append(seq))

    def _flush(self, timeout: float) -> int:
        """`producer.flush(timeout)` in slices of 5 s, sampling the backlog gauge in between: while
        the broker is away a flush waits out its whole timeout, and the gauge operators watch
        during an outage stood still for 30 s at a time."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = self.producer.flush(max(0.0, min(5.0, deadline - time.monotonic())))
            if not remaining or time.monotonic() >= deadline:
                return remaining
            self._sample_backlog()

    def _sample_backlog(self) -> None:
        if time.monotonic() - self._last_backlog > 5:  # one COUNT every 5 s, on this thread
            self._last_backlog = time.monotonic()
            OUTBOX_BACKLOG.labels(self.name).set(self.backlog())

    def cleanup(self) -> int:
        """Delete rows published longer ago than the retention (they are in Kafka now)."""
        cutoff = utcnow() - self.retention
        with self.engine.begin() as conn:
            return conn.execute(delete(self.outbox).where(self.outbox.c.published_at < cutoff)).rowcount

    def backlog(self) -> int:
        from sqlalchemy import func

        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).where(self.outbox.c.published_at.is_(None))).scalar_one()

    def run(self, stop: threading.Event, poll_interval: float = 0.05) -> None:
        while not stop.is_set():
            try:
                with relay_leadership(self.engine, stop) as still_leader:
                    self._publish_while_leader(stop, poll_interval, still_leader)
            except (SQLAlchemyError, LeadershipLost) as exc:
                # The database went away, or took our advisory lock with our session (then a standby
                # may lead now): stop publishing and start over, competing for leadership again.
                # Without this the relay thread of a consumer service would die and its events wait.
                log.warning("outbox relay lost its database or its leadership; starting over",
                            extra={"error": str(exc)[:500]})
                stop.wait(1.0)
        self.producer.flush(10)

    def _publish_while_leader(self, stop: threading.Event, poll_interval: float,
                              still_leader: Callable[[], None]) -> None:
        while not stop.is_set():
            still_leader()  # checked before every batch: a relay that lost its lock publishes nothing more
            if self.wake is not None:
                self.wake.clear()  # before the batch reads: a commit after this wakes the wait below
            try:
                published = self.publish_batch()
            except DeliveryFailed as exc:
                log.warning("outbox delivery failed; retrying", extra={"error": str(exc)})
                published = 0
                stop.wait(1.0)
            self._sample_backlog()
            if time.monotonic() - self._last_cleanup > 60:
                self._last_cleanup = time.monotonic()
                self.cleanup()
            if published < self.batch_size:
                (stop if self.wake is None else self.wake).wait(poll_interval)


@functools.cache  # built once per outbox table and dialect
def _mark_published(outbox: Table, dialect_name: str) -> Update:
    return update(outbox).where(among(outbox.c.seq, "seqs", dialect_name)).values(published_at=bindparam("at"))


@contextmanager
def relay_leadership(engine: Engine, stop: threading.Event):
    """On PostgreSQL only one relay per outbox publishes at a time (a session advisory lock);
    others wait as hot standbys. Two relays publishing the same rows concurrently could
    reorder an order's events. SQLite is single-process by design, so nothing to do there.

    Yields `still_leader()`, which raises LeadershipLost once the lock is gone (its session
    ended: the database restarted or cut the connection), so the relay stops before the next batch.
    """
    if engine.dialect.name != "postgresql":
        yield lambda: None
        return
    key = zlib.crc32(f"orderpipe-outbox:{engine.url.database}".encode()) & 0x7FFFFFFF
    held = False
    with engine.connect() as conn:
        while not stop.is_set():
            if conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                conn.commit()
                held = True
                break
            conn.rollback()
            stop.wait(1.0)

        def still_leader() -> None:
            if not held:
                return  # stopped before it ever led: the loop ends without publishing
            # a one-bigint advisory lock shows in pg_locks as classid = high, objid = low 32 bits
            mine = conn.execute(text(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND pid = pg_backend_pid() AND classid = 0 AND objid = :k AND objsubid = 1)"), {"k": key}).scalar()
            conn.rollback()
            if not mine:
                raise LeadershipLost("the relay's advisory lock is no longer held")

        try:
            yield still_leader
        finally:
            if held:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock_all()"))
                    conn.commit()
                except SQLAlchemyError:
                    pass  # the session is gone, and its lock with it
