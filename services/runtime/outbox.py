"""Transactional outbox: events are written with the state change that caused them, in the same
database transaction, and published afterwards by the relay.

Crash at any line and nothing is lost: a row is marked published only after the broker acked
it (acks=all, idempotent producer), so the worst case is publishing a row twice, which the
consumers' inbox absorbs.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta

from confluent_kafka import KafkaError, Producer
from sqlalchemy import Table, delete, select, text, update
from sqlalchemy.engine import Connection, Engine

from services.runtime.codec import Codec
from services.runtime.db import utcnow
from services.runtime.envelope import Envelope
from services.runtime.events import Event
from services.runtime.topology import TOPIC_FOR_EVENT

log = logging.getLogger(__name__)


def add_event(conn: Connection, outbox: Table, codec: Codec, event: Event, envelope: Envelope) -> None:
    """Stage an event for publication inside the caller's transaction."""
    conn.execute(outbox.insert().values(
        id=envelope.event_id,
        aggregatetype="order",
        aggregateid=event.order_id,
        type=envelope.event_type,
        topic=TOPIC_FOR_EVENT[envelope.event_type],
        payload=codec.encode(envelope.event_type, event.model_dump(), envelope.schema_version),
        headers=[[k, v.decode()] for k, v in envelope.to_headers()],
        created_at=utcnow(),
    ))


class DeliveryFailed(RuntimeError):
    pass


class OutboxRelay:
    """Publishes unpublished outbox rows in `seq` order, key = aggregate id (the order id).

    It selects every unpublished row rather than "rows after the last seq I saw", so a row
    whose transaction commits late (a lower seq committing after a higher one) is never skipped.
    """

    def __init__(self, engine: Engine, outbox: Table, producer: Producer, *, batch_size: int = 500,
                 retention: timedelta = timedelta(hours=24), on_published: Callable[[int], None] | None = None):
        self.engine = engine
        self.outbox = outbox
        self.producer = producer
        self.batch_size = batch_size
        self.retention = retention
        self.on_published = on_published
        self._last_cleanup = 0.0

    def publish_batch(self) -> int:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(self.outbox.c.seq, self.outbox.c.topic, self.outbox.c.aggregateid,
                       self.outbox.c.payload, self.outbox.c.headers)
                .where(self.outbox.c.published_at.is_(None))
                .order_by(self.outbox.c.seq)
                .limit(self.batch_size)
            ).all()
        if not rows:
            return 0
        acked: list[int] = []
        errors: list[KafkaError] = []

        def on_delivery(err, _msg, seq):
            (errors.append(err) if err else acked.append(seq))

        for row in rows:
            self.producer.produce(
                row.topic, key=row.aggregateid.encode(), value=row.payload,
                headers=[(k, v.encode()) for k, v in row.headers],
                on_delivery=lambda err, msg, seq=row.seq: on_delivery(err, msg, seq),
            )
            self.producer.poll(0)
        remaining = self.producer.flush(30)
        if acked:
            with self.engine.begin() as conn:
                conn.execute(update(self.outbox).where(self.outbox.c.seq.in_(acked)).values(published_at=utcnow()))
        if self.on_published:
            self.on_published(len(acked))
        if errors or remaining:
            # Rows not acked stay unpublished and go out again on the next batch.
            raise DeliveryFailed(f"{len(errors)} outbox rows failed delivery ({errors[:1]}), {remaining} unacked")
        return len(acked)

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
        with relay_leadership(self.engine, stop):
            while not stop.is_set():
                try:
                    published = self.publish_batch()
                except DeliveryFailed as exc:
                    log.warning("outbox delivery failed; retrying", extra={"error": str(exc)})
                    published = 0
                    stop.wait(1.0)
                if time.monotonic() - self._last_cleanup > 60:
                    self._last_cleanup = time.monotonic()
                    self.cleanup()
                if published < self.batch_size:
                    stop.wait(poll_interval)
            self.producer.flush(10)


@contextmanager
def relay_leadership(engine: Engine, stop: threading.Event):
    """On PostgreSQL only one relay per outbox publishes at a time (a session advisory lock);
    others wait as hot standbys. Two relays publishing the same rows concurrently could
    reorder an order's events. SQLite is single-process by design, so nothing to do there."""
    if engine.dialect.name != "postgresql":
        yield
        return
    key = zlib.crc32(f"orderpipe-outbox:{engine.url.database}".encode()) & 0x7FFFFFFF
    with engine.connect() as conn:
        while not stop.is_set():
            if conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                conn.commit()
                break
            conn.rollback()
            stop.wait(1.0)
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock_all()"))
            conn.commit()
