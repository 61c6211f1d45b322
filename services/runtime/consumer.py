"""The one Kafka consumer loop every service runs.

Read top to bottom, per batch:
1. poll a batch from the group's input topics and its own retry topics;
2. hold back retried messages that are not due yet (pause their partition, seek back);
3. decode each message; what cannot be decoded is a dead letter, never an exception;
4. in ONE database transaction: per message a savepoint with the inbox row (the dedup key),
   the handler's effect and the events it emits into the outbox; a duplicate is a no-op;
5. commit; then route the failed messages to retry or dead-letter topics and wait for acks;
6. only then store the offsets (auto-commit sends them to the broker in the background).

A crash anywhere before step 6 redelivers the batch: committed messages find their inbox row
and do nothing, failed ones run again. Nothing is skipped and no effect happens twice.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from sqlalchemy import MetaData, Table
from sqlalchemy.engine import Connection, Engine

from services.runtime import envelope as env
from services.runtime.codec import Codec, DecodeError
from services.runtime.db import inbox_table, insert_ignore, outbox_table, utcnow
from services.runtime.errors import MissingHandler, PermanentError, is_retryable
from services.runtime.events import EVENT_TYPES, Event
from services.runtime.outbox import add_event
from services.runtime.topology import ConsumerGroup

log = logging.getLogger(__name__)

# Headers the runtime sets on retry and dead-letter copies. They are replaced on every hop
# (never piled up); key, value and the envelope headers travel unchanged.
H_ORIGINAL_TOPIC = "x-original-topic"
H_ORIGINAL_PARTITION = "x-original-partition"
H_ORIGINAL_OFFSET = "x-original-offset"
H_ORIGINAL_TIMESTAMP = "x-original-timestamp"
H_GROUP = "x-group"
H_ATTEMPT = "x-attempt"
H_FIRST_FAILURE = "x-first-failure-at"
H_LAST_FAILURE = "x-last-failure-at"
H_DUE_AT = "x-due-at"
H_EXC_TYPE = "x-exception-type"
H_EXC_MESSAGE = "x-exception-message"
H_EXC_TRACEBACK = "x-exception-traceback"
H_REASON = "x-reason"
TRACEBACK_LIMIT = 4000

# Consumers read every event as the schema version their model was built on (Avro resolution),
# so a producer moving to a newer compatible version does not break them.
READER_VERSIONS = {name: cls.schema_version for name, cls in EVENT_TYPES.items()}


@dataclass
class UnitOfWork:
    """What a handler gets: the open transaction, the incoming envelope and the service's deps."""

    conn: Connection
    envelope: env.Envelope
    group: str
    deps: Any
    now: datetime = field(default_factory=utcnow)


Handler = Callable[[Event, UnitOfWork], Iterable[Event] | None]


@dataclass
class Service:
    """A consumer service: its group, its tables, its handlers and its dependencies."""

    group: ConsumerGroup
    metadata: MetaData
    handlers: Mapping[type[Event], list[Handler]]
    deps: Any = None
    retryable: tuple[type[BaseException], ...] = ()
    permanent: tuple[type[BaseException], ...] = ()
    batch_size: int = 500
    outbox: Table = field(init=False)
    inbox: Table = field(init=False)

    def __post_init__(self):
        tables = self.metadata.tables  # reuse them when build() runs twice on one MetaData
        self.outbox = tables["outbox"] if "outbox" in tables else outbox_table(self.metadata)
        self.inbox = tables["inbox"] if "inbox" in tables else inbox_table(self.metadata)

    @property
    def name(self) -> str:
        return self.group.name


@dataclass
class Failure:
    message: Message
    exc: BaseException
    tb: str


@dataclass
class BatchResult:
    processed: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    deferred: int = 0


def _header(msg: Message, name: str) -> str | None:
    for key, value in msg.headers() or ():
        if key == name and value is not None:
            return value.decode("utf-8", "replace")
    return None


def _number_header(msg: Message, name: str, parse: Callable[[str], float]) -> float | None:
    """A header we set ourselves, parsed; a malformed one reads as absent rather than raising
    (raising would fail the whole batch and block the partition forever)."""
    raw = _header(msg, name)
    try:
        value = parse(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def incoming_envelope(msg: Message, event_type: str, schema_version: int) -> env.Envelope:
    event_id = _header(msg, env.EVENT_ID)
    if not event_id:
        raise PermanentError("message has no event_id header (the dedup key)")
    key = msg.key().decode("utf-8", "replace") if msg.key() else ""
    return env.Envelope(
        event_id=event_id,
        event_type=event_type,
        schema_version=schema_version,
        correlation_id=_header(msg, env.CORRELATION_ID) or key,
        causation_id=_header(msg, env.CAUSATION_ID),
        traceparent=_header(msg, env.TRACEPARENT) or env.new_traceparent(),
    )


class ServiceConsumer:
    def __init__(self, service: Service, engine: Engine, consumer: Consumer, producer: Producer, codec: Codec,
                 *, clock: Callable[[], float] = time.time):
        self.service = service
        self.group = service.group
        self.engine = engine
        self.consumer = consumer
        self.producer = producer
        self.codec = codec
        self.clock = clock
        self.paused: dict[tuple[str, int], float] = {}  # partition -> when its head message is due
        self.totals = BatchResult()

    # -- the loop ---------------------------------------------------------------------------

    def topics(self) -> list[str]:
        return [t for source in self.group.inputs for t in (source, *self.group.retry_topics(source))]

    def run(self, stop: threading.Event, poll_timeout: float = 0.5) -> None:
        self.consumer.subscribe(self.topics(), on_revoke=self._on_revoke)
        try:
            while not stop.is_set():
                self.run_once(poll_timeout)
        finally:
            self.consumer.close()  # commits stored offsets and leaves the group promptly

    def run_once(self, poll_timeout: float = 0.5) -> BatchResult:
        self._resume_due_partitions()
        timeout = poll_timeout
        if self.paused:
            timeout = max(0.0, min(timeout, min(self.paused.values()) - self.clock()))
        messages = self.consumer.consume(self.service.batch_size, timeout)
        batch = [m for m in messages if self._check_error(m)]
        if not batch:
            return BatchResult()
        try:
            return self.handle_batch(batch)
        except Exception:
            # The database or the broker failed mid-batch. Nothing of this batch has its offset
            # stored, so rewind to its first messages: they are redelivered, and the inbox makes
            # whatever did commit a no-op. Without the rewind the next batch could store offsets
            # past these messages and skip them.
            log.exception("batch failed; rewinding and retrying", extra={"group": self.group.name})
            self._rewind(batch)
            time.sleep(1.0)
            return BatchResult()

    def handle_batch(self, messages: list[Message]) -> BatchResult:
        result = BatchResult()
        ready, held = self._hold_back_not_due(messages)
        result.deferred = held
        failures: list[Failure] = []
        done: list[Message] = []
        with self.engine.begin() as conn:
            for msg in ready:
                outcome = self._handle_one(conn, msg, failures)
                if outcome == "duplicate":
                    result.duplicates += 1
                elif outcome == "processed":
                    result.processed += 1
                done.append(msg)
        # The transaction is committed: effects are durable. Now the failures get their copy in
        # a retry or dead-letter topic, and only once that copy is acked do we store offsets.
        for failure in failures:
            if self._route_failure(failure):
                result.retried += 1
            else:
                result.dead_lettered += 1
        if failures:
            remaining = self.producer.flush(30)
            if remaining:
                raise RuntimeError(f"{remaining} retry/dead-letter copies not acked; not storing offsets")
        if done:
            self.consumer.store_offsets(offsets=_next_offsets(done))
        self._add_totals(result)
        return result

    # -- one message ------------------------------------------------------------------------

    def _handle_one(self, conn: Connection, msg: Message, failures: list[Failure]) -> str:
        try:
            decoded = self.codec.decode(msg.value(), reader_version=READER_VERSIONS)
            cls = EVENT_TYPES.get(decoded.event_type)
            handlers = self.service.handlers.get(cls) if cls else None
            if not handlers:
                raise MissingHandler(f"group {self.group.name} has no handler for event type {decoded.event_type}")
            envelope = incoming_envelope(msg, decoded.event_type, cls.schema_version)
            event = cls.model_validate(decoded.record)
        except Exception as exc:  # decode/validation: permanent, the message is a dead letter
            failures.append(Failure(msg, exc, traceback.format_exc()))
            return "failed"
        savepoint = conn.begin_nested()
        try:
            fresh = insert_ignore(conn, self.service.inbox, {
                "group_name": self.group.name, "event_id": envelope.event_id, "event_type": decoded.event_type,
                "topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
            })
            if not fresh:
                savepoint.commit()
                return "duplicate"
            uow = UnitOfWork(conn, envelope, self.group.name, self.service.deps)
            for handler in handlers:
                for out in handler(event, uow) or ():
                    add_event(conn, self.service.outbox, self.codec, out,
                              envelope.child(out.event_type(), out.schema_version))
            savepoint.commit()
            return "processed"
        except Exception as exc:
            savepoint.rollback()  # only this message's effect is undone; the batch goes on
            failures.append(Failure(msg, exc, traceback.format_exc()))
            log.warning("handler failed", extra={"group": self.group.name, "event_id": envelope.event_id,
                                                 "order_id": envelope.correlation_id, "error": repr(exc)})
            return "failed"

    # -- retries and dead letters -----------------------------------------------------------

    def _route_failure(self, failure: Failure) -> bool:
        """Produce the failed message to its next retry tier or the dead-letter topic.
        Returns True when it was retried."""
        msg, exc = failure.message, failure.exc
        source = _header(msg, H_ORIGINAL_TOPIC) or msg.topic()
        attempt = int(_number_header(msg, H_ATTEMPT, int) or 0) + 1
        now = datetime.now(UTC)
        retryable = not isinstance(exc, DecodeError) and is_retryable(
            exc, self.service.retryable, self.service.permanent)
        delays = self.group.retry_delays_s
        retry = retryable and attempt <= len(delays)
        headers = {
            H_ORIGINAL_TOPIC: source,
            H_ORIGINAL_PARTITION: _header(msg, H_ORIGINAL_PARTITION) or str(msg.partition()),
            H_ORIGINAL_OFFSET: _header(msg, H_ORIGINAL_OFFSET) or str(msg.offset()),
            H_ORIGINAL_TIMESTAMP: _header(msg, H_ORIGINAL_TIMESTAMP) or str(msg.timestamp()[1]),
            H_GROUP: self.group.name,
            H_ATTEMPT: str(attempt),
            H_FIRST_FAILURE: _header(msg, H_FIRST_FAILURE) or now.isoformat(),
            H_LAST_FAILURE: now.isoformat(),
            H_EXC_TYPE: f"{type(exc).__module__}.{type(exc).__qualname__}",
            H_EXC_MESSAGE: str(exc)[:1000],
            H_EXC_TRACEBACK: failure.tb[-TRACEBACK_LIMIT:],
        }
        if retry:
            due = self.clock() + delays[attempt - 1]
            headers[H_DUE_AT] = f"{due:.3f}"
            target = self.group.retry_topic(source, attempt)
        else:
            headers[H_REASON] = "not retryable" if not retryable else f"retries exhausted after {attempt} attempts"
            target = self.group.dlt_topic(source)
        kept = [(k, v) for k, v in msg.headers() or () if not k.startswith("x-")]
        self.producer.produce(target, key=msg.key(), value=msg.value(),
                              headers=kept + [(k, v.encode()) for k, v in headers.items()])
        self.producer.poll(0)
        log.log(logging.INFO if retry else logging.ERROR,
                "message retried" if retry else "message dead-lettered",
                extra={"group": self.group.name, "topic": target, "attempt": attempt,
                       "order_id": msg.key().decode("utf-8", "replace") if msg.key() else None,
                       "event_id": _header(msg, env.EVENT_ID), "error": headers[H_EXC_MESSAGE]})
        return retry

    def _hold_back_not_due(self, messages: list[Message]) -> tuple[list[Message], int]:
        """A retried message is never processed before its due time: pause its partition, seek
        back to it, and resume when due. Polling goes on for the other partitions, so the group
        membership is kept and other orders are not held up."""
        ready: list[Message] = []
        held = 0
        now = self.clock()
        for msg in messages:
            tp = (msg.topic(), msg.partition())
            if tp in self.paused:
                held += 1
                continue
            due = _number_header(msg, H_DUE_AT, float)
            if due is not None and due > now:
                self.paused[tp] = due
                part = TopicPartition(msg.topic(), msg.partition(), msg.offset())
                self.consumer.pause([part])
                self.consumer.seek(part)
                held += 1
                continue
            ready.append(msg)
        return ready, held

    def _resume_due_partitions(self) -> None:
        now = self.clock()
        due = [tp for tp, at in self.paused.items() if at <= now]
        if due:
            self.consumer.resume([TopicPartition(t, p) for t, p in due])
            for tp in due:
                del self.paused[tp]

    def _rewind(self, messages: list[Message]) -> None:
        first: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic(), m.partition())
            first[key] = min(first.get(key, m.offset()), m.offset())
        for (topic, partition), offset in first.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except Exception:  # partition revoked meanwhile: its new owner starts from the committed offset
                pass

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            self.paused.pop((p.topic, p.partition), None)

    def _check_error(self, msg: Message) -> bool:
        if msg.error():
            log.warning("consumer error", extra={"group": self.group.name, "error": str(msg.error())})
            return False
        return True

    def _add_totals(self, r: BatchResult) -> None:
        t = self.totals
        t.processed += r.processed
        t.duplicates += r.duplicates
        t.retried += r.retried
        t.dead_lettered += r.dead_lettered
        t.deferred += r.deferred


def _next_offsets(messages: list[Message]) -> list[TopicPartition]:
    highest: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic(), m.partition())
        highest[key] = max(highest.get(key, -1), m.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]
