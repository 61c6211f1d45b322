"""PostgreSQL failing mid-batch with a lock timeout: nothing lost, nothing doubled, the consumer goes on.

The promises (README, "Guarantees" and "Failures, retries and worker controls"):
- each effect happens once per event: the inbox row, the handler's effect and its outbox rows
  are one transaction (one per batch with the default concurrency 1, a savepoint per message);
- a batch whose transaction the database fails is rewound and run again: nothing stored, no
  offset stored past it, no retry copy and no dead letter (a database failure is not the
  handler's failure; `unit/test_injected_failures.py` proves it with fakes for a failed COMMIT);
- a handler's own failure is classified: retryable are `RetryableError`, `TimeoutError`,
  `ConnectionError`, `OSError` and anything unknown, so a lock timeout raised inside a handler
  (SQLAlchemy's `OperationalError`) goes down the retry chain, never straight to the dead-letter
  topic, and the other messages of the batch are not held up;
- committed offsets reach the end of the input; the consumer loop keeps running.

This proves them on a real PostgreSQL and a real broker (the run's `--broker`), with the real
loop (`ServiceConsumer.run` in a thread: the test service of `test_consumer_runtime.py`, whose
handler inserts one `effects` row per event, deliberately without a unique key, and emits one
`OrderRecorded` into the outbox). How the failure is made: the consumer's engine is the
project's `make_engine` on a URL carrying `options=-c lock_timeout=300ms` (the runtime has no
lock-timeout setting; this is how an operator would set one), and a separate connection holds a
table lock the consumer's transaction needs:

1. `LOCK TABLE outbox IN SHARE MODE`: the batch claims its inbox keys and runs every handler, then
   its one outbox INSERT waits and fails with `LockNotAvailable` (SQLSTATE 55P03), so the whole
   transaction, mid-batch, is rolled back. The lock is released once the loop has failed and
   rewound the batch at least twice; meanwhile nothing of the batch may be visible and the
   committed offsets may not move.
2. `LOCK TABLE effects IN SHARE MODE`: the handler's own INSERT fails with the lock timeout (its
   savepoint is rolled back). The lock is released from the loop's thread the moment the runtime
   logs that handler failure, so the retry, due a second later, finds it free whatever the
   machine's speed.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from urllib.parse import quote

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

from reading import read_all, wait_until
from services.runtime import consumer as runtime
from services.runtime.controls import WorkerControls
from services.runtime.envelope import CAUSATION_ID
from test_consumer_runtime import Harness, Script, Sent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LOCK_TIMEOUT = "300ms"
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for "canceling statement due to lock timeout"
WAIT_S = 60.0  # a fail-safe against hanging forever, never a bound on how fast anything must be
postgresql_only = pytest.mark.parametrize("database_factory", ["postgresql"], indirect=True)


class RuntimeLog(logging.Handler):
    """What the consumer runtime logs: failed batches (with their exception) and failed handlers.
    `on_handler_failure` is called in the loop's own thread, before it goes on."""

    def __init__(self, on_handler_failure: Callable[[logging.LogRecord], None] | None = None):
        super().__init__(logging.DEBUG)
        self.batch_failures: list[BaseException | None] = []
        self.handler_failures: list[str] = []
        self.on_handler_failure = on_handler_failure

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("batch failed"):
            self.batch_failures.append(record.exc_info[1] if record.exc_info else None)
        elif message == "handler failed":
            self.handler_failures.append(getattr(record, "error", ""))
            if self.on_handler_failure is not None:
                self.on_handler_failure(record)

    def lock_timeouts(self) -> int:
        return sum(1 for exc in self.batch_failures if is_lock_timeout(exc))


def is_lock_timeout(exc: BaseException | None) -> bool:
    return isinstance(exc, OperationalError) and getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE


class TableLock:
    """A table lock held by a connection of its own (not the consumer's), until released."""

    def __init__(self, url: str, table: str):
        self.conn = psycopg.connect(url)  # autocommit off: the LOCK opens a transaction
        self.conn.execute(f"LOCK TABLE {table} IN SHARE MODE")  # conflicts with INSERT's ROW EXCLUSIVE
        self.released = threading.Event()

    def release(self) -> None:
        if not self.released.is_set():
            self.conn.rollback()
            self.released.set()

    def close(self) -> None:
        self.release()
        self.conn.close()


@pytest.fixture
def lock_rig(kafka_bootstrap: str, database_url: str, test_engine, private_group) -> Iterator[Callable[..., tuple]]:
    """Factory: the test service of test_consumer_runtime.py, running on its own group and input
    topic (3 partitions), on a fresh PostgreSQL database whose consumer connections have a
    300 ms lock_timeout; and the runtime's log. Stopped (and every lock released) after the test."""
    made: list[tuple[Harness, RuntimeLog]] = []
    locks: list[TableLock] = []
    logger = logging.getLogger(runtime.__name__)

    def make(on_handler_failure=None, lanes: int = 1) -> tuple[Harness, RuntimeLog, Callable[[str], TableLock]]:
        log = RuntimeLog(on_handler_failure)
        logger.addHandler(log)
        previous_level = logger.level
        logger.setLevel(logging.DEBUG)
        url = f"{database_url}?options={quote(f'-c lock_timeout={LOCK_TIMEOUT}')}"
        h = Harness(kafka_bootstrap, private_group(retry_delays_s=(1.0,), partitions=3), test_engine(url), Script(),
                    controls=WorkerControls(concurrency=lanes, breaker=None))
        made.append((h, log, previous_level))

        def lock(table: str) -> TableLock:
            locks.append(TableLock(database_url, table))
            return locks[-1]

        return h.start(), log, lock

    try:
        yield make
    finally:
        for lock in locks:
            lock.close()
        for h, log, previous_level in made:
            h.stop_event.set()
        for h, log, previous_level in made:
            h.stop()
            h.producer.flush(5)
            logger.removeHandler(log)
            logger.setLevel(previous_level)


# -- reading the database and the broker --------------------------------------------------------


def counts(h: Harness) -> tuple[Counter, Counter, Counter]:
    """Per event id: effect rows, outbox rows (by the causing event id), inbox rows."""
    outbox, inbox = h.service.outbox, h.service.inbox
    with h.engine.connect() as conn:
        effects = Counter(conn.execute(select(h.effects.c.event_id)).scalars())
        emitted = Counter(dict(headers)[CAUSATION_ID] for headers in conn.execute(select(outbox.c.headers)).scalars())
        claimed = Counter(conn.execute(select(inbox.c.event_id).where(inbox.c.group_name == h.group.name)).scalars())
    return effects, emitted, claimed


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset per partition (0 where nothing is committed)."""
    client = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                       "log_level": 0})
    try:
        found = client.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in found}
    finally:
        client.close()


def end_of(sent: list[Sent], partitions: int) -> dict[int, int]:
    """The input's end offsets, from the broker's acks of what we produced (nothing else writes it)."""
    ends = dict.fromkeys(range(partitions), 0)
    for s in sent:
        ends[s.partition] = max(ends[s.partition], s.offset + 1)
    return ends


def exactly_once(h: Harness, sent: list[Sent]) -> bool:
    ids = Counter(s.event_id for s in sent)
    return all(c == ids for c in counts(h))


def assert_exactly_once(h: Harness, sent: list[Sent]) -> None:
    effects, emitted, claimed = counts(h)
    ids = Counter(s.event_id for s in sent)
    assert effects == ids, f"effect rows per event: {effects - ids} too many, {ids - effects} missing"
    assert emitted == ids, f"outbox rows per event: {emitted - ids} too many, {ids - emitted} missing"
    assert claimed == ids, f"inbox rows per event: {claimed - ids} too many, {ids - claimed} missing"


def locks_of_the_waiting_session(h: Harness) -> set[tuple[str, str, bool]]:
    """(table, mode, granted) of every table lock held or awaited by a session that waits for a
    lock on the outbox (empty when none waits right now)."""
    with h.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT l.relation::regclass::text, l.mode, l.granted FROM pg_locks l "
            "WHERE l.locktype = 'relation' AND l.pid IN ("
            "  SELECT pid FROM pg_locks WHERE relation = 'outbox'::regclass AND NOT granted)")).all()
    return {tuple(r) for r in rows}


def warm_up(h: Harness, n: int = 3) -> list[Sent]:
    """A few events handled and their offsets committed: the loop has its partitions and runs."""
    sent = [h.produce_order() for _ in range(n)]
    wait_until(lambda: exactly_once(h, sent), WAIT_S, "the warm-up events to be handled")
    wait_until(lambda: committed(h.bootstrap, h.group.name, h.source, 3) == end_of(sent, 3), WAIT_S,
               "the warm-up offsets to be committed")
    return sent


# -- the tests ----------------------------------------------------------------------------------


@postgresql_only
def test_consumer_connections_have_the_short_lock_timeout(lock_rig):
    h, _, _ = lock_rig()
    with h.engine.connect() as conn:
        assert conn.execute(text("SHOW lock_timeout")).scalar_one() == LOCK_TIMEOUT


@postgresql_only
@pytest.mark.parametrize("lanes", [1, 4], ids=["one-transaction-per-batch", "lanes"])
def test_a_lock_timeout_mid_batch_rewinds_the_batch_and_nothing_is_lost_or_doubled(lock_rig, lanes: int):
    """Lanes (a transaction per message) too: the runtime's own outbox INSERT failing is the
    database's failure, not the handler's. It was once counted as the handler's, and with the
    outbox locked every event went down the retry chain and was dead-lettered unhandled."""
    h, log, lock = lock_rig(lanes=lanes)
    sent = warm_up(h)
    before = committed(h.bootstrap, h.group.name, h.source, 3)

    held = lock("outbox")
    blocked = [h.produce_order() for _ in range(30)]
    assert len({s.partition for s in blocked}) > 1
    # The loop fails the batch on the lock timeout, rewinds it and tries again, while the lock is held.
    wait_until(lambda: log.lock_timeouts() >= 2, WAIT_S, "two batches failed by the lock timeout")
    # Mid-batch: the waiting transaction has already written inbox claims and effects (it holds
    # their tables' row-exclusive locks) and waits for the outbox's.
    mid_batch = {("inbox", "RowExclusiveLock", True), ("effects", "RowExclusiveLock", True),
                 ("outbox", "RowExclusiveLock", False)}
    wait_until(lambda: mid_batch <= locks_of_the_waiting_session(h), WAIT_S,
               "the consumer's transaction to wait for the outbox with its inbox claims and effects written")
    # None of it is visible, no offset moved past it, and nothing went to a retry topic.
    assert_exactly_once(h, sent)
    assert committed(h.bootstrap, h.group.name, h.source, 3) == before
    assert h.consumer.totals.retried == h.consumer.totals.dead_lettered == 0
    assert h.thread.is_alive()

    held.release()
    wait_until(lambda: exactly_once(h, sent + blocked), WAIT_S, "every event handled after the lock is released")

    # The consumer goes on: events produced afterwards are handled like any.
    after = [h.produce_order() for _ in range(5)]
    wait_until(lambda: exactly_once(h, sent + blocked + after), WAIT_S, "the events produced after recovery")
    assert h.thread.is_alive() and not h.errors
    h.stop()  # closes the consumer, which commits the stored offsets

    everything = sent + blocked + after
    assert_exactly_once(h, everything)
    assert h.consumer.totals.processed == len(everything)
    assert (h.consumer.totals.duplicates, h.consumer.totals.retried, h.consumer.totals.dead_lettered) == (0, 0, 0)
    assert all(is_lock_timeout(exc) for exc in log.batch_failures), log.batch_failures
    assert log.handler_failures == []  # a database failure, not the handler's
    assert read_all(h.bootstrap, h.dlt) == []
    assert read_all(h.bootstrap, h.retry_topic(1)) == []
    assert committed(h.bootstrap, h.group.name, h.source, 3) == end_of(everything, 3)
    print(f"lock timeouts while the outbox was locked: {log.lock_timeouts()} failed batch attempts, "
          f"{len(blocked)} events blocked, all handled once after the release")


@postgresql_only
def test_a_lock_timeout_inside_a_handler_is_retried_not_dead_lettered(lock_rig):
    released_by: list[str] = []
    held: list[TableLock] = []

    def release_on_lock_timeout(record: logging.LogRecord) -> None:
        # In the loop's thread, as the runtime reports the failed handler: from now on the lock
        # is free, so the retry copy (due a second later) cannot meet it, however slow we are.
        if held and "lock timeout" in getattr(record, "error", "") and not released_by:
            released_by.append(record.event_id)
            held[0].release()

    h, log, lock = lock_rig(on_handler_failure=release_on_lock_timeout)
    sent = warm_up(h)

    held.append(lock("effects"))
    blocked = [h.produce_order() for _ in range(20)]
    wait_until(lambda: exactly_once(h, sent + blocked), WAIT_S, "every event handled, the failed one retried")
    after = [h.produce_order() for _ in range(5)]
    wait_until(lambda: exactly_once(h, sent + blocked + after), WAIT_S, "the events produced after recovery")
    assert h.thread.is_alive() and not h.errors
    h.stop()

    everything = sent + blocked + after
    assert_exactly_once(h, everything)
    assert len(released_by) == 1 and released_by[0] in {s.event_id for s in blocked}
    [failed] = [s for s in blocked if s.event_id == released_by[0]]
    assert len(log.handler_failures) == 1 and "lock timeout" in log.handler_failures[0]
    assert log.batch_failures == []  # the handler's failure, in its savepoint: the batch went on

    # Classified retryable (an unknown type: SQLAlchemy's OperationalError): one retry copy, the
    # original message and envelope, attempt 1; handled from the retry topic; no dead letter.
    [copy] = read_all(h.bootstrap, h.retry_topic(1))
    partition, offset, key, value, headers = copy
    assert (key, value, headers["event_id"]) == (failed.order_id, failed.value, failed.event_id)
    assert headers["x-attempt"] == "1" and "x-reason" not in headers
    assert headers["x-exception-type"] == "sqlalchemy.exc.OperationalError"
    assert "lock timeout" in headers["x-exception-message"]
    assert (headers["x-original-topic"], headers["x-original-offset"]) == (h.source, str(failed.offset))
    assert read_all(h.bootstrap, h.dlt) == []
    assert (h.consumer.totals.processed, h.consumer.totals.retried, h.consumer.totals.dead_lettered) == (
        len(everything), 1, 0)
    assert committed(h.bootstrap, h.group.name, h.source, 3) == end_of(everything, 3)
    retry_end = {p: 0 for p in range(3)} | {partition: offset + 1}
    assert committed(h.bootstrap, h.group.name, h.retry_topic(1), 3) == retry_end
