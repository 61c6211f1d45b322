"""The one Kafka consumer loop every service runs.

Read top to bottom, per batch (`run_once`):
1. ask the circuit breaker and the rate limit how many messages may run now; when none may,
   pause every partition and poll anyway, so the group membership is kept;
2. poll a batch from the group's input topics and its own retry topics;
3. hold back retried messages that are not due yet (pause their partition, seek back);
4. split the rest by key into lanes (`concurrency`; one lane by default) and handle them. Per
   message: decode (what cannot be decoded is a dead letter, never an exception), then the
   inbox row (the dedup key), the handler's effect and the events it emits into the outbox, in
   one database transaction; a duplicate is a no-op. One lane: one transaction per batch;
   consecutive messages of one event type whose handlers have batch forms (handler.py) run
   set-based in one savepoint, redone one by one if the batch form fails; any other message
   runs alone in a savepoint. Several lanes: one transaction per message, begun at the
   handler's first database statement, so slow I/O before it (an SMTP send) runs in parallel
   even on SQLite, whose writers take turns;
5. after the commits, route the failed messages to retry or dead-letter topics (and a notice of
   each to the order-status view's failures topic) and wait for acks;
6. only then store offsets: per partition, up to the first message that is not done (a lane
   that stopped early); that message is where the partition is rewound to.

A crash anywhere before step 6 redelivers the batch: committed messages find their inbox row
and do nothing, failed ones run again. Nothing is skipped and no effect happens twice.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from sqlalchemy import Select, Table, bindparam, delete, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from services.runtime import alerts, metrics
from services.runtime import envelope as env
from services.runtime.alerts import Alerter
from services.runtime.circuit import HALF_OPEN, OPEN, CircuitBreaker
from services.runtime.codec import Codec, DecodeError
from services.runtime.concurrency import done_prefix, run_lanes, split_by_key
from services.runtime.crashpoints import crash_point
from services.runtime.db import among, insert_ignore, read_only, utcnow
from services.runtime.errors import (
    ConsumerMisconfigured,
    KafkaRefused,
    MissingHandler,
    PermanentError,
    is_retryable,
)
from services.runtime.events import EVENT_TYPES, READER_VERSIONS, Event
from services.runtime.failure_headers import (
    H_ATTEMPT,
    H_DUE_AT,
    H_EXC_MESSAGE,
    H_EXC_TRACEBACK,
    H_EXC_TYPE,
    H_FIRST_FAILURE,
    H_GROUP,
    H_LAST_FAILURE,
    H_ORIGINAL_OFFSET,
    H_ORIGINAL_PARTITION,
    H_ORIGINAL_TIMESTAMP,
    H_ORIGINAL_TOPIC,
    H_REASON,
    MESSAGE_LIMIT,
    RUNTIME_HEADERS,
    format_traceback,
    header,
    header_texts,
    number_header,
)
from services.runtime.failure_notices import FailureNotice, keyed_by_order
from services.runtime.handler import (
    BatchHandler, BatchUnitOfWork, Handler, RunNotSetBased, Service, UnitOfWork, batch_form,
)
from services.runtime.held import DEAD_LETTERED, RELEASING, Hold, HeldKeys, StoredMessage, key_text
from services.runtime.kafka import raise_if_denied
from services.runtime.outbox import add_event, add_rows, outbox_row
from services.runtime.ratelimit import RateLimiter
from services.runtime.topology import FAILURES
from services.runtime.worker_state import WorkerState

log = logging.getLogger(__name__)

# How often a consumer looks for held keys to release that it did not release itself (another
# instance released them, or it restarted): a query of the group's database, not per batch.
RELEASE_CHECK_S = 5.0



# Refusals that asking again cannot change, and what to fix.
_MISCONFIGURED = {
    KafkaError.INVALID_SESSION_TIMEOUT: "set ORDERPIPE_SESSION_TIMEOUT_MS within the broker's "
                                        "group.min.session.timeout.ms and group.max.session.timeout.ms",
}


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
    deferred: int = 0   # retried messages held back until their due time
    held: int = 0       # stored behind their key's head in the retry chain (ordered retries)
    put_back: int = 0   # not run (breaker opened, a lane's database failed): rewound, run later


@dataclass
class Prepared:
    event: Event
    envelope: env.Envelope
    handlers: list[Handler]


@dataclass
class Lane:
    """What one lane did. `done` holds (topic, partition, offset) of every message whose outcome
    is settled: committed, a duplicate, or failed and about to be routed."""

    done: set[tuple[str, int, int]] = field(default_factory=set)
    failures: list[Failure] = field(default_factory=list)
    processed: int = 0
    duplicates: int = 0
    held: int = 0
    ran: int = 0
    error: BaseException | None = None


@dataclass(frozen=True)
class _Released:
    """What releasing one held event did: its outcome (for the breaker), whether a handler ran
    (for the rate limit), whether its key is done (none left, or it became the new head)."""

    outcome: str | Failure
    ran: int
    key_done: bool


class _AlreadyDone(Exception):
    """The inbox row appeared between the dedup check and the transaction (another consumer)."""


class _DatabaseUnavailable(Exception):
    """The runtime's own transaction could not begin: not the handler's failure."""


class _LazyTransaction:
    """A transaction that begins at first use, with `first_statement` (the inbox row; False
    means "already there") as its first statement; rolled back on exit unless committed."""

    def __init__(self, engine: Engine, first_statement: Callable[[Connection], bool]):
        self._connection = engine.connect()
        self._first = first_statement
        self._transaction = None

    def begin(self) -> Connection:
        try:
            self._transaction = self._connection.begin()
            fresh = self._first(self._connection)
        except Exception as exc:
            raise _DatabaseUnavailable(str(exc)) from exc
        if not fresh:
            raise _AlreadyDone()
        crash_point("consumer.after_inbox_claim")
        return self._connection

    def commit(self) -> None:
        try:
            self._transaction.commit()
        except Exception:
            # A failed COMMIT can leave the database's transaction open (SQLite busy or full):
            # given back to the pool, the connection kept its write lock and stalled every lane.
            self._connection.invalidate()
            raise

    def __enter__(self) -> _LazyTransaction:
        return self

    def __exit__(self, *exc) -> None:
        if self._transaction is not None and self._transaction.is_active:
            self._transaction.rollback()
        self._connection.close()


@functools.cache  # built once per inbox table and dialect
def _inbox_ids_among(inbox: Table, dialect_name: str) -> Select:
    return select(inbox.c.event_id).where(inbox.c.group_name == bindparam("group"),
                                          among(inbox.c.event_id, "ids", dialect_name))


def _position(msg: Message) -> tuple[str, int, int]:
    return msg.topic(), msg.partition(), msg.offset()


def incoming_envelope(msg: Message, event_type: str, schema_version: int) -> env.Envelope:
    headers = header_texts(msg)  # once per message: the hot path reads four of them
    event_id = headers.get(env.EVENT_ID)
    if not event_id:
        raise PermanentError("message has no event_id header (the dedup key)")
    key = msg.key().decode("utf-8", "replace") if msg.key() else ""
    return env.Envelope(
        event_id=event_id,
        event_type=event_type,
        schema_version=schema_version,
        correlation_id=headers.get(env.CORRELATION_ID) or key,
        causation_id=headers.get(env.CAUSATION_ID),
        traceparent=headers.get(env.TRACEPARENT) or env.new_traceparent(),
    )


class ServiceConsumer:
    def __init__(self, service: Service, engine: Engine, consumer: Consumer, producer: Producer, codec: Codec,
                 *, clock: Callable[[], float] = time.time, alerter: Alerter | None = None,
                 on_commit: Callable[[], None] | None = None):
        self.service = service
        self.group = service.group
        self.engine = engine
        self.consumer = consumer
        self.producer = producer
        self.codec = codec
        self.clock = clock
        self.controls = service.controls
        self.retry_policy = self.controls.retry_policy(self.group.retry_delays_s)
        self.alerter = alerter or Alerter(self.group.name)
        self.on_commit = on_commit  # after a batch committed processed events (their outbox rows): wake the relay
        self.limiter = RateLimiter(self.controls.rate_limit) if self.controls.rate_limit else None
        self.breaker = (CircuitBreaker(self.controls.breaker, on_transition=self._breaker_changed)
                        if self.controls.breaker else None)
        self.pool = (ThreadPoolExecutor(self.controls.concurrency, thread_name_prefix=f"{self.group.name}-lane")
                     if self.controls.concurrency > 1 else None)
        self.not_due: dict[tuple[str, int], float] = {}  # retry partition -> when its head message is due
        # Delivery errors of this batch's retry and dead-letter copies. A refused copy (no
        # rights on the topic, too large, expired) leaves the producer's queue, so flush() alone
        # reports it as done, and the offsets went past a message neither handled nor routed.
        self._copy_errors: list[KafkaError] = []
        # Each failed message whose offset is not stored yet and whose copy is on its way or acked:
        # True for a retry copy, False for a dead letter. A flush that timed out leaves a copy queued in the producer while its
        # batch is rewound; when the message runs and fails again it must not get a second copy
        # (both were delivered once the broker was back). Entries go when their offset is stored
        # (or their partition is revoked), or when the broker refuses the copy: then it is made again.
        self._copies: dict[tuple[str, int, int], bool] = {}
        self._paused: set[tuple[str, int]] = set()        # what we asked librdkafka to pause
        self._holding_all = ""  # why every partition is paused now ("circuit breaker", "rate limit"), else ""
        # what this worker reports to the operators (paused partitions, breaker, open alerts)
        self.worker_state = WorkerState(engine, service.worker_state, self.group.name, clock)
        self.alerter.listeners.append(self.worker_state.on_alert)
        # Only copies in our retry topics carry a due time; the inputs' messages skip that check.
        self._retry_topics = frozenset(t for source in self.group.inputs for t in self.group.retry_topics(source))
        # The event types whose handlers all have a batch form (handler.py), with those forms.
        self._batch_forms: dict[type[Event], list[BatchHandler]] = {}
        for event_type, handlers in service.handlers.items():
            forms = [batch_form(handler) for handler in handlers]
            if forms and all(forms):
                self._batch_forms[event_type] = forms
        # Ordered retries per key (held.py): the holds of the batch's keys, read once per batch;
        # lanes touch only their own keys, so they share the dict.
        self.held = (HeldKeys.of(service, self.controls.held_dead_letter_policy)
                     if self.controls.ordered_retries else None)
        self._holds: dict[str, Hold] = {}
        self._release_check_at = 0.0  # when to look for keys to release that this consumer did not release itself
        self._maybe_releasing = True
        self.polls = 0
        self.assignments = 0
        self.totals = BatchResult()
        g = self.group.name
        self._metrics = {name: m.labels(g) for name, m in (
            ("processed", metrics.PROCESSED), ("duplicates", metrics.DUPLICATES), ("retried", metrics.RETRIED),
            ("dead_lettered", metrics.DEAD_LETTERED), ("handler_s", metrics.HANDLER_SECONDS),
            ("lateness_s", metrics.RETRY_LATENESS), ("throttled_s", metrics.THROTTLED_SECONDS))}
        metrics.BREAKER_STATE.labels(g).set(0)

    # -- the loop ---------------------------------------------------------------------------

    def topics(self) -> list[str]:
        return [t for source in self.group.inputs for t in (source, *self.group.retry_topics(source))]

    def run(self, stop: threading.Event, poll_timeout: float = 0.5) -> None:
        self.consumer.subscribe(self.topics(), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        self.worker_state.start()
        try:
            while not stop.is_set():
                self.run_once(poll_timeout)
        finally:
            self.worker_state.stop()  # a clean stop deletes its row
            if self.pool:
                self.pool.shutdown(wait=True)
            self.alerter.close()
            self.consumer.close()  # commits stored offsets and leaves the group promptly

    def run_once(self, poll_timeout: float = 0.5) -> BatchResult:
        allowed, timeout = self._admit(poll_timeout)
        messages = self._poll(max(allowed, 1), timeout)
        self.polls += 1
        batch = [m for m in messages if self._check_error(m)]
        result = self._run_batch(batch, allowed)
        if allowed and self.held is not None:
            try:
                self._release_held()  # also when idle: a key an operator released waits for no message
            except KafkaRefused:
                raise
            except Exception:  # the database or the broker failed: the held events stay, tried again later
                log.exception("releasing held keys failed; trying again", extra={"group": self.group.name})
                time.sleep(1.0)
        self.worker_state.observe(self._paused, self.not_due, self._holding_all,
                                  self.breaker.state if self.breaker else None)
        return result

    def _run_batch(self, batch: list[Message], allowed: int) -> BatchResult:
        if not batch:
            return BatchResult()
        if allowed == 0:  # from a partition assigned during this poll, not paused yet
            self._rewind(batch)
            return BatchResult(put_back=len(batch))
        try:
            return self.handle_batch(batch)
        except KafkaRefused:
            raise  # the credentials or the certificate: no rewind can help
        except Exception:
            # The broker failed mid-batch (retry copies not acked). Nothing of this batch has its
            # offset stored, so rewind to its first messages: they are redelivered, and the inbox
            # makes whatever did commit a no-op. Without the rewind the next batch could store
            # offsets past these messages and skip them.
            log.exception("batch failed; rewinding and retrying", extra={"group": self.group.name})
            self._rewind(batch)
            time.sleep(1.0)
            return BatchResult()

    def handle_batch(self, messages: list[Message]) -> BatchResult:
        result = BatchResult()
        ready, result.deferred = self._hold_back_not_due(messages)
        self._holds = self._read_holds(ready)
        lanes = split_by_key(ready, self.controls.concurrency, key=lambda m: m.key())
        run_lane = self._run_lane_in_one_transaction if self.pool is None else self._run_lane_per_message
        outcomes = run_lanes(self.pool, lanes, run_lane)

        failures: list[Failure] = [f for lane in outcomes for f in lane.failures]
        done = set().union(*(lane.done for lane in outcomes))
        result.processed = sum(lane.processed for lane in outcomes)
        result.duplicates = sum(lane.duplicates for lane in outcomes)
        result.held = sum(lane.held for lane in outcomes)
        # The transactions are committed: effects are durable. Now the failures get their copy in
        # a retry or dead-letter topic, and only once that copy is acked do we store offsets.
        crash_point("consumer.after_commit")
        if result.processed and self.on_commit is not None:
            self.on_commit()
        result.retried, result.dead_lettered = self._deliver_copies(failures)
        result.put_back = len(ready) - len(done)
        self._store_offsets(ready, done)
        crash_point("consumer.after_offsets_stored")
        if self.limiter:
            self.limiter.record(sum(lane.ran for lane in outcomes))
        self._add_totals(result)
        errors = [lane.error for lane in outcomes if lane.error is not None]
        if errors:
            # A database failed: what it did not commit was rewound above and runs again.
            log.error("batch failed; rewinding and retrying", exc_info=errors[0], extra={"group": self.group.name})
            time.sleep(1.0)
        return result

    def _deliver_copies(self, failures: list[Failure]) -> tuple[int, int]:
        """Each failure's copy in its retry or dead-letter topic, and its notice, acked;
        (retried, dead-lettered). Raises when one was not acked: the caller must not store
        offsets past it."""
        retried = dead = 0
        for failure in failures:
            if self._route_failure(failure):
                retried += 1
            else:
                dead += 1
        if failures:
            crash_point("consumer.after_copies_produced")
            remaining = self.producer.flush(30)
            refused, self._copy_errors = self._copy_errors, []
            raise_if_denied(refused, f"group {self.group.name} its retry and dead-letter copies and failure notices")
            if remaining or refused:
                raise RuntimeError(f"{remaining} retry/dead-letter copies not acked, {len(refused)} refused "
                                   f"({refused[:1]}); not storing offsets")
            crash_point("consumer.after_copies_acked")
        return retried, dead

    def _poll(self, n: int, timeout: float) -> list:
        """Up to n messages: what is already fetched at once, else wait up to `timeout` for one.

        `Consumer.consume(n, timeout)` waits until n messages arrived or the timeout passed, so
        at low load every hop of the pipeline sat out its whole poll timeout with a few
        messages in hand (end-to-end latency was several poll timeouts). Taking what is there
        keeps batches large under load and latency low without it."""
        messages = self.consumer.consume(n, 0)
        if messages or timeout <= 0:
            return messages
        messages = self.consumer.consume(1, timeout)
        if messages and n > 1:
            messages += self.consumer.consume(n - 1, 0)
        return messages

    def _admit(self, poll_timeout: float) -> tuple[int, float]:
        """How many messages the next poll may return (0: none may run yet) and its timeout.
        Pauses every partition while nothing may run, so the poll serves the group (heartbeats,
        rebalances, max.poll.interval.ms) without returning messages; it blocks, no busy loop."""
        allowed, wait, why = self._admission()
        if allowed == 0 and why == "rate limit" and wait <= poll_timeout:
            # a short wait: sleeping is cheaper than pausing and resuming every partition
            self._metrics["throttled_s"].inc(wait)
            time.sleep(wait)
            allowed, wait, why = self._admission()
        self._holding_all = why if allowed == 0 else ""
        self._sync_pauses(hold_all=allowed == 0)
        if allowed == 0:
            timeout = max(0.01, min(poll_timeout, wait))
            if why == "rate limit":
                self._metrics["throttled_s"].inc(timeout)
            return 0, timeout
        if self.not_due:  # wake up when the next retry is due (whole ms: librdkafka rounds down)
            due_in = math.ceil((min(self.not_due.values()) - self.clock()) * 1000) / 1000
            return allowed, min(poll_timeout, max(0.001, due_in))
        return allowed, poll_timeout

    def _admission(self) -> tuple[int, float, str]:
        """How many messages may be polled now; when none, how long until some may, and why."""
        allowed = self.service.batch_size
        if self.breaker:
            state = self.breaker.state
            if state == OPEN:
                return 0, self.breaker.remaining_s(), "circuit breaker"
            if state == HALF_OPEN:
                allowed = 1  # the probe
        if self.limiter:
            available = self.limiter.available()
            if available < 1:
                return 0, self.limiter.wait_s(), "rate limit"
            allowed = min(allowed, available)
        return allowed, 0.0, ""

    # -- lanes ------------------------------------------------------------------------------

    def _run_lane_in_one_transaction(self, messages: list[Message]) -> Lane:
        """The lane's messages in one transaction, with as few statements as the guarantees allow.

        One INSERT ... ON CONFLICT DO NOTHING RETURNING claims every inbox key (the keys it
        returns are new; the rest are duplicates: no handler call, no savepoint). The handlers
        then run in order. A run of messages their batch forms can take (`_batch_run`) runs
        set-based in one savepoint: a handful of statements whatever its length. If a batch
        form raises, that savepoint is rolled back and the run's messages go one by one through
        the path every other message takes: each handler in a savepoint taken when it first
        uses the database, so a failing handler undoes only its own effect, and its failure is
        classified, retried, dead-lettered and holds its key exactly as without batching. A
        failed message's claim, and the claims of messages the circuit breaker held back, are
        given back before the commit. One INSERT stages every outbox row."""
        lane = Lane()
        try:
            with self.engine.begin() as conn:
                prepared = [(msg, self._prepare_or_fail(msg)) for msg in messages]
                now = utcnow()
                claims = [self._inbox_row(msg, p, now) for msg, p in prepared if isinstance(p, Prepared)]
                fresh = set(self.service.inbox_claims.execute(conn, claims))
                crash_point("consumer.after_inbox_claim")
                give_back = set(fresh)  # claimed ids whose effect is not committed (yet)
                staged: list[dict] = []
                at, stopped = 0, False
                while at < len(prepared) and not stopped and self._breaker_allows():
                    run, stopped = self._batch_run(prepared, at, fresh)
                    if run and self._handle_run(conn, run, staged):
                        for msg, p in run:
                            fresh.discard(p.envelope.event_id)
                            give_back.discard(p.envelope.event_id)
                            self._settle(lane, msg, "processed")  # no hold to update: _batch_run took none
                    else:
                        # One message; or a run whose batch form failed, redone one by one so each
                        # message gets exactly the outcome it would have had without batching.
                        for i, (msg, p) in enumerate(run or prepared[at:at + 1]):
                            if i and not self._breaker_allows():  # the first one's turn was granted above
                                stopped = True
                                break
                            self._settle(lane, msg, self._handle_in_lane(conn, msg, p, fresh, give_back, staged, now))
                    at += max(len(run), 1)
                if give_back:
                    inbox = self.service.inbox
                    conn.execute(delete(inbox).where(inbox.c.group_name == self.group.name,
                                                     inbox.c.event_id.in_(give_back)))
                add_rows(conn, self.service.outbox, staged)
                crash_point("consumer.after_handler")
        except Exception as exc:  # the transaction did not commit: nothing of this lane is done
            if self.breaker:
                self.breaker.record_neutral()  # a probe that never finished frees its slot
            return Lane(ran=lane.ran, error=exc)
        return lane

    def _handle_in_lane(self, conn: Connection, msg: Message, p: Prepared | Failure, fresh: set[str],
                        give_back: set[str], staged: list[dict], now: datetime) -> str | Failure:
        """One message of a lane's transaction, on its own: its outcome."""
        if isinstance(p, Failure):
            return p
        if p.envelope.event_id not in fresh:
            return "duplicate"
        if self._parked(conn, msg, p, now):
            crash_point("held.after_park")
            return "held"  # its claim is given back: it runs when released
        fresh.discard(p.envelope.event_id)  # a second copy in this batch is a duplicate
        outcome = self._handle_claimed(conn, msg, p, staged)
        if outcome == "processed":
            give_back.discard(p.envelope.event_id)
        self._update_hold(conn, msg, p, outcome, now)
        return outcome

    def _batch_run(self, prepared: list[tuple[Message, Prepared | Failure]], at: int,
                   fresh: set[str]) -> tuple[list[tuple[Message, Prepared]], bool]:
        """The messages from `at` on that the handlers' batch forms may run as one: consecutive,
        claimed by this transaction and each once, of one event type whose handlers all have a
        batch form, and of keys with no hold (held.py: a held key's messages are parked, and its
        head runs alone to settle the hold). Empty when the message at `at` is not one of them.
        Also whether the circuit breaker refused the message after the run (the lane stops there)."""
        first = prepared[at][1]
        if not isinstance(first, Prepared) or type(first.event) not in self._batch_forms:
            return [], False
        run: list[tuple[Message, Prepared]] = []
        in_run: set[str] = set()
        for msg, p in itertools.islice(prepared, at, None):
            if not (isinstance(p, Prepared) and type(p.event) is type(first.event)
                    and p.envelope.event_id in fresh and p.envelope.event_id not in in_run
                    and not self._has_hold(msg)):
                break
            if run and not self._breaker_allows():
                return run, True
            run.append((msg, p))
            in_run.add(p.envelope.event_id)
        return run, False

    def _has_hold(self, msg: Message) -> bool:
        return self.held is not None and key_text(msg.key()) in self._holds

    def _handle_run(self, conn: Connection, run: list[tuple[Message, Prepared]], staged: list[dict]) -> bool:
        """Run the handlers' batch forms on a run in one savepoint; on success append the outbox
        rows of every message's outgoing events (in message order) to `staged`. False when a
        batch form raised: the savepoint is rolled back and nothing of the run happened."""
        for msg, _ in run:
            self._started(msg)  # the retry lateness of each message
        started = time.monotonic()
        events = [p.event for _, p in run]
        envelopes = [p.envelope for _, p in run]
        savepoint = conn.begin_nested()
        try:
            uow = BatchUnitOfWork(conn, envelopes, self.group.name, self.service.deps)
            outputs: list[list[Event]] = [[] for _ in run]
            for batch in self._batch_forms[type(events[0])]:
                per_event = batch(events, uow)
                if len(per_event) != len(run):
                    raise RuntimeError(f"batch handler {batch.__qualname__} returned {len(per_event)} "
                                       f"outputs for {len(run)} events")
                for outs, more in zip(outputs, per_event):
                    outs.extend(more)
            rows = [outbox_row(self.codec, out, envelope.child(out.event_type(), out.schema_version))
                    for envelope, outs in zip(envelopes, outputs) for out in outs]
            savepoint.commit()
        except Exception as exc:
            # A database error here that broke the transaction itself makes the rollback raise:
            # then the lane fails as a whole and is rewound, as when a single message does so.
            savepoint.rollback()
            # A warning: a batch form that keeps failing costs the batch's speed without failing a
            # message. A run the batch form declined is expected: no warning.
            log.log(logging.DEBUG if isinstance(exc, RunNotSetBased) else logging.WARNING,
                    "batch form failed; redoing the run per message",
                    extra={"group": self.group.name, "messages": len(run), "error": repr(exc)})
            return False
        staged.extend(rows)
        per_message = (time.monotonic() - started) / len(run)
        for _ in run:
            self._metrics["handler_s"].observe(per_message)
        return True

    def _handle_claimed(self, conn: Connection, msg: Message, p: Prepared, staged: list[dict]) -> str | Failure:
        """Run the handlers of a message whose inbox key this transaction claimed; on success
        append its outgoing events' outbox rows to `staged`."""
        started = self._started(msg)
        savepoint = None

        def begin() -> Connection:
            nonlocal savepoint
            savepoint = conn.begin_nested()
            return conn

        try:
            uow = UnitOfWork(None, p.envelope, self.group.name, self.service.deps, begin=begin)
            rows = [outbox_row(self.codec, out, p.envelope.child(out.event_type(), out.schema_version))
                    for handler in p.handlers for out in (handler(p.event, uow) or ())]
            if savepoint is not None:
                savepoint.commit()
            staged.extend(rows)
            return "processed"
        except Exception as exc:
            if savepoint is not None:
                savepoint.rollback()  # only this message's effect is undone; the batch goes on
            return self._failed(msg, p, exc)
        finally:
            self._metrics["handler_s"].observe(time.monotonic() - started)

    def _run_lane_per_message(self, messages: list[Message]) -> Lane:
        """The lane's messages one by one, each in its own transaction (`_handle_alone`). Which
        of them the inbox already has is read once for the lane, not once per message: the
        read was a transaction of its own per message (on SQLite one that took the write lock,
        so the lanes queued for it) and a third of the path's CPU."""
        lane = Lane()
        try:
            prepared = [(msg, self._prepare_or_fail(msg)) for msg in messages]
            done = self._in_inbox([p.envelope.event_id for _, p in prepared if isinstance(p, Prepared)])
        except Exception as exc:  # the database failed: the whole lane runs later
            return Lane(error=exc)
        for msg, p in prepared:
            if not self._breaker_allows():
                break
            try:
                outcome = self._handle_alone(msg, p, done)
            except Exception as exc:  # the database failed; this message and the rest of the lane run later
                if self.breaker:
                    self.breaker.record_neutral()
                lane.error = exc
                break
            self._settle(lane, msg, outcome)
        return lane

    def _in_inbox(self, event_ids: list[str]) -> set[str]:
        """Which of these event ids the group's inbox has (their effect is committed)."""
        if not event_ids:
            return set()
        with read_only(self.engine) as conn:
            statement = _inbox_ids_among(self.service.inbox, conn.dialect.name)
            return set(conn.execute(statement, {"group": self.group.name, "ids": event_ids}).scalars())

    def _settle(self, lane: Lane, msg: Message, outcome: str | Failure) -> None:
        lane.ran += 1
        lane.done.add(_position(msg))
        if outcome == "processed":
            lane.processed += 1
        elif outcome == "duplicate":
            lane.duplicates += 1
        elif outcome == "held":
            lane.held += 1
        else:
            lane.failures.append(outcome)
        self._record_in_breaker(outcome)

    def _record_in_breaker(self, outcome: str | Failure) -> None:
        if self.breaker:
            if outcome == "processed":
                self.breaker.record_success()
            elif isinstance(outcome, Failure) and self._retryable(outcome.exc):
                self.breaker.record_failure()
            else:
                self.breaker.record_neutral()

    def _breaker_allows(self) -> bool:
        return self.breaker is None or self.breaker.allow()

    # -- one message ------------------------------------------------------------------------

    def _prepare(self, msg: Message) -> Prepared:
        decoded = self.codec.decode(msg.value(), reader_version=READER_VERSIONS)
        cls = EVENT_TYPES.get(decoded.event_type)
        handlers = self.service.handlers.get(cls) if cls else None
        if not handlers:
            raise MissingHandler(f"group {self.group.name} has no handler for event type {decoded.event_type}")
        envelope = incoming_envelope(msg, decoded.event_type, cls.schema_version)
        return Prepared(cls.model_validate(decoded.record), envelope, handlers)

    def _run_handlers(self, p: Prepared, uow: UnitOfWork) -> None:
        for handler in p.handlers:
            for out in list(handler(p.event, uow) or ()):
                try:
                    add_event(uow.conn, self.service.outbox, self.codec, out,
                              p.envelope.child(out.event_type(), out.schema_version))
                except SQLAlchemyError as exc:
                    # The runtime's own write failed: the database's failure, not the handler's.
                    # The lane is rewound as in the one-transaction path; counted as the handler's,
                    # a database outage longer than the retry chain dead-lettered every event.
                    raise _DatabaseUnavailable(str(exc)) from exc

    def _inbox_row(self, msg: Message, p: Prepared, now: datetime | None = None) -> dict:
        return {"group_name": self.group.name, "event_id": p.envelope.event_id, "event_type": p.envelope.event_type,
                "topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                "processed_at": now or utcnow()}

    def _prepare_or_fail(self, msg: Message) -> Prepared | Failure:
        try:
            return self._prepare(msg)
        except Exception as exc:  # decode/validation: permanent, the message is a dead letter
            return Failure(msg, exc, format_traceback(exc))

    def _handle_alone(self, msg: Message, p: Prepared | Failure, done: set[str]) -> str | Failure:
        """One message in its own transaction, which begins when the handler first uses the
        database (or after it returns). `done`: the lane's event ids the inbox has, kept up to
        date (a second copy in the lane is a duplicate). An inbox row written by another
        consumer since `done` was read is found when the transaction begins (`_AlreadyDone`).
        Raises only when the database itself fails."""
        if isinstance(p, Failure):
            return p
        if p.envelope.event_id in done:
            return "duplicate"
        started = self._started(msg)
        inbox = self.service.inbox
        try:
            if self._has_hold(msg):  # a transaction only when the key is held: parking writes
                with self.engine.begin() as conn:
                    parked = self._parked(conn, msg, p, utcnow())
                if parked:
                    crash_point("held.after_park")
                    return "held"
            with _LazyTransaction(self.engine, lambda c: insert_ignore(c, inbox, self._inbox_row(msg, p))) as tx:
                try:
                    # reads before the transaction begins go to a connection of their own: this
                    # key's earlier events are committed already (a lane runs them one by one)
                    uow = UnitOfWork(None, p.envelope, self.group.name, self.service.deps, begin=tx.begin,
                                     engine=self.engine)
                    self._run_handlers(p, uow)
                    uow.conn  # noqa: B018 - begins (with the inbox row) if the handlers never used it
                except _AlreadyDone:
                    done.add(p.envelope.event_id)
                    return "duplicate"
                except _DatabaseUnavailable as exc:
                    raise exc.__cause__ from None
                except Exception as exc:
                    failure = self._failed(msg, p, exc)  # rolled back when the block ends
                else:
                    self._update_hold(uow.conn, msg, p, "processed", utcnow())
                    crash_point("consumer.after_handler")
                    tx.commit()  # a failure here is the database's, not the handler's: it raises
                    done.add(p.envelope.event_id)
                    return "processed"
            if self._hold_changes(msg, p, failure):
                with self.engine.begin() as conn:  # the effect was rolled back; the hold is recorded alone
                    self._update_hold(conn, msg, p, failure, utcnow())
            return failure
        finally:
            self._metrics["handler_s"].observe(time.monotonic() - started)

    def _started(self, msg: Message) -> float:
        due = number_header(msg, H_DUE_AT, float) if msg.topic() in self._retry_topics else None
        if due is not None:
            self._metrics["lateness_s"].observe(max(0.0, self.clock() - due))
        return time.monotonic()

    def _failed(self, msg: Message, p: Prepared, exc: BaseException) -> Failure:
        log.warning("handler failed", extra={"group": self.group.name, "event_id": p.envelope.event_id,
                                             "order_id": p.envelope.correlation_id, "error": repr(exc)})
        return Failure(msg, exc, format_traceback(exc))

    # -- retries and dead letters -----------------------------------------------------------

    def _retryable(self, exc: BaseException) -> bool:
        return not isinstance(exc, DecodeError) and is_retryable(exc, self.service.retryable, self.service.permanent)

    def _copy_delivered(self, coordinates: tuple[str, int, int], err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._copy_errors.append(err)
            self._copies.pop(coordinates, None)

    def _next_hop(self, msg, exc: BaseException) -> tuple[bool, bool, int, str]:
        """(retry it, retryable at all, this attempt's number, the original topic)."""
        source = header(msg, H_ORIGINAL_TOPIC) or msg.topic()
        attempt = int(number_header(msg, H_ATTEMPT, int) or 0) + 1
        retryable = self._retryable(exc)
        retry = retryable and len(self.group.retry_delays_s) > 0 and attempt < self.retry_policy.attempts
        return retry, retryable, attempt, source

    def _route_failure(self, failure: Failure) -> bool:
        """Produce the failed message to its next retry tier or the dead-letter topic, and its
        notice to the failures topic (failure_notices.py), unless a copy of it is already on its
        way or acked. Returns True when it was retried."""
        msg, exc = failure.message, failure.exc
        coordinates = (msg.topic(), msg.partition(), msg.offset())
        if coordinates in self._copies:
            return self._copies[coordinates]
        retry, retryable, attempt, source = self._next_hop(msg, exc)
        now = datetime.now(UTC)
        tiers = len(self.group.retry_delays_s)
        headers = {
            H_ORIGINAL_TOPIC: source,
            H_ORIGINAL_PARTITION: header(msg, H_ORIGINAL_PARTITION) or str(msg.partition()),
            H_ORIGINAL_OFFSET: header(msg, H_ORIGINAL_OFFSET) or str(msg.offset()),
            H_ORIGINAL_TIMESTAMP: header(msg, H_ORIGINAL_TIMESTAMP) or str(msg.timestamp()[1]),
            H_GROUP: self.group.name,
            H_ATTEMPT: str(attempt),
            H_FIRST_FAILURE: header(msg, H_FIRST_FAILURE) or now.isoformat(),
            H_LAST_FAILURE: now.isoformat(),
            H_EXC_TYPE: f"{type(exc).__module__}.{type(exc).__qualname__}",
            H_EXC_MESSAGE: str(exc)[:MESSAGE_LIMIT],
            H_EXC_TRACEBACK: failure.tb,
        }
        if retry:
            due = self.clock() + self.retry_policy.delay_s(attempt)
            headers[H_DUE_AT] = f"{due:.3f}"
            target = self.group.retry_topic(source, min(attempt, tiers))  # beyond the tiers: the last one
        else:
            headers[H_REASON] = "not retryable" if not retryable else f"retries exhausted after {attempt} attempts"
            target = self.group.dlt_topic(source)
        kept = [(k, v) for k, v in msg.headers() or () if k not in RUNTIME_HEADERS]
        delivered = functools.partial(self._copy_delivered, coordinates)
        self.producer.produce(target, key=msg.key(), value=msg.value(),
                              headers=kept + [(k, v.encode()) for k, v in headers.items()], on_delivery=delivered)
        if msg.key() and keyed_by_order(source):
            notice = FailureNotice(
                order_id=msg.key().decode("utf-8", "replace"), group=self.group.name, source=source, topic=target,
                kind="retry" if retry else "dlt", attempt=attempt, event_id=header(msg, env.EVENT_ID) or "",
                error_type=headers[H_EXC_TYPE], error=headers[H_EXC_MESSAGE], reason=headers.get(H_REASON),
                at=headers[H_LAST_FAILURE])
            self.producer.produce(FAILURES, key=msg.key(), value=notice.to_bytes(), on_delivery=delivered)
        self._copies[coordinates] = retry
        self.producer.poll(0)
        details = {"topic": target, "source": source, "attempt": attempt,
                   "order_id": msg.key().decode("utf-8", "replace") if msg.key() else None,
                   "event_id": header(msg, env.EVENT_ID), "exception_type": headers[H_EXC_TYPE],
                   "error": headers[H_EXC_MESSAGE][:300]}
        if retry:
            log.info("message retried", extra={"group": self.group.name, **details})
            if attempt >= self.controls.alert_after_attempts:
                self.alerter.alert(alerts.RETRYING, f"attempt {attempt} failed; retrying at {headers[H_DUE_AT]}",
                                   due_at=headers[H_DUE_AT], **details)
        else:
            self.alerter.alert(alerts.DEAD_LETTERED, f"message dead-lettered: {headers[H_REASON]}",
                               reason=headers[H_REASON], **details)
        return retry

    # -- ordered retries per key (services/runtime/held.py) ---------------------------------

    def _read_holds(self, messages: list[Message]) -> dict[str, Hold]:
        if self.held is None or not messages:
            return {}
        keys = {k for m in messages if (k := key_text(m.key())) is not None}
        with self.engine.connect() as conn:
            return self.held.holds(conn, keys)

    def _parked(self, conn: Connection, msg, p: Prepared, now: datetime) -> bool:
        """Store the message behind its key's head instead of running it, if the key is held
        and the message is not that head (which runs: its retry copy, or a replay of it)."""
        key = key_text(msg.key()) if self.held is not None else None
        hold = self._holds.get(key) if key is not None else None
        if hold is None or hold.head == p.envelope.event_id:
            return False
        self.held.park(conn, key, msg, p.envelope.event_id, now)
        if hold.state == DEAD_LETTERED:  # it waits for an operator, not for a retry
            self._alert_key_held(key, hold.head, f"event {p.envelope.event_id} of key {key} waits behind its "
                                 f"dead-lettered event {hold.head}")
        return True

    def _alert_key_held(self, key: str, head: str, what: str) -> None:
        self.alerter.alert(alerts.KEY_HELD, f"{what}: replay that dead letter, or purge it (which releases the key)",
                           key=key, head_event_id=head)

    def _hold_changes(self, msg, p: Prepared, outcome: str | Failure) -> bool:
        """Whether this outcome changes a hold: its key's head ran, or it is retried and starts one."""
        key = key_text(msg.key()) if self.held is not None else None
        if key is None:
            return False
        hold = self._holds.get(key)
        if hold is not None:
            return hold.head == p.envelope.event_id
        return isinstance(outcome, Failure) and self._next_hop(msg, outcome.exc)[0]

    def _update_hold(self, conn: Connection, msg, p: Prepared, outcome: str | Failure, now: datetime) -> None:
        """In the transaction of the message's outcome: its key's head ran (release, keep
        retrying or apply the dead-letter policy), or it goes to the retry chain and its key is
        held from now on."""
        if not self._hold_changes(msg, p, outcome):
            return
        key = key_text(msg.key())
        hold = self._holds.get(key)
        reason = "" if outcome == "processed" else f"{type(outcome.exc).__name__}: {outcome.exc}"
        if hold is None:
            self._holds[key] = self.held.start(conn, key, p.envelope.event_id, reason, msg.topic(),
                                               msg.partition(), now)
            return
        kind = "processed" if outcome == "processed" else ("retry" if self._next_hop(msg, outcome.exc)[0] else "dead")
        self._holds[key] = self.held.head_settled(conn, key, kind, reason, now) or hold
        if self._holds[key].state == RELEASING:
            self._maybe_releasing = True
        elif self._holds[key].state == DEAD_LETTERED and (waiting := self.held.waiting(conn, key, hold.head)):
            self._alert_key_held(key, hold.head, f"{waiting} event(s) of key {key} wait behind its dead-lettered "
                                 f"event {hold.head}")

    def _release_held(self) -> None:
        """Run the held events of released keys this consumer reads, in their order; make the
        copies a crash kept from being made. Looks at the database only when this consumer
        released a key itself, or every few seconds (another instance, a restart)."""
        now = time.monotonic()
        if not self._maybe_releasing and now < self._release_check_at:
            return
        self._maybe_releasing, self._release_check_at = False, now + RELEASE_CHECK_S
        self._measure_held()
        assigned = {(p.topic, p.partition) for p in self.consumer.assignment()}
        heads = self.held.heads_without_copy(self.engine, assigned)
        failures = [Failure(h, RuntimeError("held event failed on release; its retry copy was not acked"), "")
                    for h in heads]
        released = BatchResult()  # counted like a batch's messages (totals and metrics)
        for key in self.held.releasing(self.engine, assigned):
            budget = self._admission()[0]  # released events count against the breaker and the rate limit
            if budget == 0:
                self._maybe_releasing = True  # go on at the next turn of the loop
                break
            key_failures, ran, finished = self._release_key(key, budget, released)
            failures += key_failures
            if self.limiter and ran:
                self.limiter.record(ran)
            if not finished:
                self._maybe_releasing = True
        if failures:
            crash_point("held.after_release_failure")
            released.retried, released.dead_lettered = self._deliver_copies(failures)
            crash_point("held.after_release_copy_acked")
            self.held.copies_sent(self.engine, [f.message.event_id for f in failures
                                                if isinstance(f.message, StoredMessage)])
        self._add_totals(released)

    def _measure_held(self) -> None:
        keys, events, oldest = self.held.stats(self.engine)
        g = self.group.name
        metrics.HELD_KEYS.labels(g).set(keys)
        metrics.HELD_EVENTS.labels(g).set(events)
        age = (utcnow() - (oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC))).total_seconds() if oldest else 0
        metrics.HELD_OLDEST_SECONDS.labels(g).set(max(0.0, age))

    def _release_key(self, key: str, budget: int, released: BatchResult) -> tuple[list[Failure], int, bool]:
        """The key's held events, one transaction each, until none is left (the key flows again),
        one fails and is retried (it is the key's head now), or `budget` events ran or the
        breaker says stop (the rest go on later). Returns the failures to route, how many events
        ran, and whether the key is done."""
        failures: list[Failure] = []
        ran = 0
        while ran < budget and self._breaker_allows():
            try:
                step = self._release_next(key, failures)
            except BaseException:
                self._record_in_breaker("not run")  # a half-open breaker's probe goes back
                raise
            self._record_in_breaker(step.outcome)
            if step.outcome == "processed":
                released.processed += 1
                crash_point("held.after_release_commit")
            elif step.outcome == "duplicate":
                released.duplicates += 1
            ran += step.ran
            if step.key_done:
                return failures, ran, True
        return failures, ran, False

    def _release_next(self, key: str, failures: list[Failure]) -> _Released:
        """The key's next held event, in its own transaction; its failure is appended to `failures`."""
        now = utcnow()
        with self.engine.begin() as conn:
            held = self.held.next_event(conn, key)
            if held is None:
                self.held.finish(conn, key)
                self._holds.pop(key, None)
                return _Released("nothing left", ran=0, key_done=True)
            p = self._prepare_or_fail(held)
            if isinstance(p, Failure):  # undecodable: a dead letter; the key goes on
                self.held.take(conn, held)
                failures.append(p)
                return _Released(p, ran=0, key_done=False)
            if not insert_ignore(conn, self.service.inbox, self._inbox_row(held, p, now)):
                self.held.take(conn, held)  # done before it was held (a redelivery)
                return _Released("duplicate", ran=0, key_done=False)
            staged: list[dict] = []
            outcome = self._handle_claimed(conn, held, p, staged)
            if outcome == "processed":
                self.held.take(conn, held)
                add_rows(conn, self.service.outbox, staged)
                return _Released(outcome, ran=1, key_done=False)
            inbox = self.service.inbox
            conn.execute(delete(inbox).where(inbox.c.group_name == self.group.name,
                                             inbox.c.event_id == p.envelope.event_id))
            failures.append(outcome)
            if self._next_hop(held, outcome.exc)[0]:
                # it is the head now; its row stays until its copy is acked (copies_sent)
                self.held.make_head(conn, key, held, f"{type(outcome.exc).__name__}: {outcome.exc}", now)
                return _Released(outcome, ran=1, key_done=True)
            self.held.take(conn, held)  # not retryable: dead-lettered, the key goes on
            return _Released(outcome, ran=1, key_done=False)

    # -- pausing: due times, rate limit, circuit breaker --------------------------------------

    def _hold_back_not_due(self, messages: list[Message]) -> tuple[list[Message], int]:
        """A retried message is never processed before its due time: pause its partition, seek
        back to it, and resume when due. Polling goes on for the other partitions, so the group
        membership is kept and other orders are not held up."""
        ready: list[Message] = []
        held = 0
        now = self.clock()
        for msg in messages:
            tp = (msg.topic(), msg.partition())
            if tp in self.not_due:
                held += 1
                continue
            due = number_header(msg, H_DUE_AT, float) if tp[0] in self._retry_topics else None
            if due is not None and due > now:
                self.not_due[tp] = due
                part = TopicPartition(msg.topic(), msg.partition(), msg.offset())
                if tp not in self._paused:
                    self.consumer.pause([part])
                    self._paused.add(tp)
                self.consumer.seek(part)
                held += 1
                continue
            ready.append(msg)
        return ready, held

    def _sync_pauses(self, hold_all: bool) -> None:
        """Pause exactly what should be: everything while the breaker or the rate limit holds,
        otherwise the retry partitions whose head message is not due yet."""
        now = self.clock()
        for tp in [tp for tp, at in self.not_due.items() if at <= now]:
            del self.not_due[tp]
        want = {(p.topic, p.partition) for p in self.consumer.assignment()} if hold_all else set(self.not_due)
        if to_pause := want - self._paused:
            self.consumer.pause([TopicPartition(t, p) for t, p in to_pause])
        if to_resume := self._paused - want:
            self.consumer.resume([TopicPartition(t, p) for t, p in to_resume])
        self._paused = want

    def _breaker_changed(self, old: str, new: str, why: str) -> None:
        metrics.BREAKER_STATE.labels(self.group.name).set(metrics.BREAKER_STATES[new])
        if new == OPEN:
            self.alerter.alert(alerts.BREAKER_OPENED, f"circuit breaker opened: {why}; consumption paused for "
                               f"{self.controls.breaker.cooldown_s:g} s, then one probe", reason=why)
        elif old == HALF_OPEN and new != OPEN:
            self.alerter.alert(alerts.BREAKER_CLOSED, f"circuit breaker closed: {why}; consuming again", reason=why)
        else:
            log.info("circuit breaker", extra={"group": self.group.name, "state": new, "reason": why})

    # -- offsets ----------------------------------------------------------------------------

    def _store_offsets(self, ready: list[Message], done: set[tuple[str, int, int]]) -> None:
        store, rewind = done_prefix(ready, done)
        if store:
            self.consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in store.items()])
            for coordinates in [c for c in self._copies if c[2] < store.get(c[:2], -1)]:
                del self._copies[coordinates]
        for (topic, partition), offset in rewind.items():
            self._seek(topic, partition, offset)

    def _rewind(self, messages: list[Message]) -> None:
        first: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic(), m.partition())
            first[key] = min(first.get(key, m.offset()), m.offset())
        for (topic, partition), offset in first.items():
            self._seek(topic, partition, offset)

    def _seek(self, topic: str, partition: int, offset: int) -> None:
        try:
            self.consumer.seek(TopicPartition(topic, partition, offset))
        except Exception:  # partition revoked meanwhile: its new owner starts from the committed offset
            pass

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignments += 1
        for p in partitions:  # a (re)assigned partition starts unpaused
            self._paused.discard((p.topic, p.partition))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        for tp in revoked:
            self.not_due.pop(tp, None)
            self._paused.discard(tp)
        for coordinates in [c for c in self._copies if c[:2] in revoked]:
            del self._copies[coordinates]

    def _check_error(self, msg: Message) -> bool:
        err = msg.error()
        if not err:
            return True
        raise_if_denied([err], f"group {self.group.name} reading {msg.topic() or 'its topics'}")
        if err.code() in _MISCONFIGURED or err.fatal():
            fix = _MISCONFIGURED.get(err.code(), "see the broker's and the client's logs")
            raise ConsumerMisconfigured(f"group {self.group.name}: the broker refuses this consumer: {err.str()} ({fix})")
        log.warning("consumer error: %s", err, extra={"group": self.group.name, "error": str(err)})
        return False

    def _add_totals(self, r: BatchResult) -> None:
        t = self.totals
        for name in ("processed", "duplicates", "retried", "dead_lettered", "deferred", "held", "put_back"):
            setattr(t, name, getattr(t, name) + getattr(r, name))
        for name in ("processed", "duplicates", "retried", "dead_lettered"):
            if value := getattr(r, name):
                self._metrics[name].inc(value)
