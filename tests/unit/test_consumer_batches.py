"""How the consumer loop runs a batch: lanes, inbox claims, what it reads and writes, offsets.

Promises pinned here (services/runtime/consumer.py), on the real loop with the fake Kafka clients
of `kafka_fakes` and the rig of `test_routing_promises` (a real SQLite file, a fake clock); log
lines are read as the JSON formatter of `services.runtime.logs` writes them:

- lanes: with `concurrency > 1` the lanes run side by side, so slow I/O that a handler does
  before its first database statement overlaps across orders;
- the circuit breaker opening in the middle of a batch stops it there, in both lane modes: what
  ran is routed and stored, the rest is put back and rewound, its inbox claim given back, so it
  runs (not as a duplicate) once the breaker lets it;
- dedup: a redelivered message whose effect is committed never runs its handler again, not even
  the part before its first database statement (no second e-mail); a message that another
  consumer finished while the handler was busy is a duplicate, its effect not written twice;
- one transaction per batch: its inbox rows are stamped with one time, the batch's claim;
- what a handler reads and writes: the envelope it gets names the schema version the event was
  read as (the model's), an event written in a newer compatible schema version is read as the
  model's version (its new fields dropped, not a dead letter), and the outbox rows of the events
  a handler emits carry each event's own schema version;
- a lane whose database failed: its messages still count against the rate limit (they ran),
  and the batch logs `batch failed; rewinding and retrying` (error) with the group and the
  database's exception; a batch that failed as a whole (copies not acked) logs the same line
  from `run_once` with the group and the exception;
- offsets and copies still queued: a failed message whose copy is still in the producer's queue
  keeps that copy while offsets are stored on other partitions, or up to (not past) it on its
  own partition, so when it runs and fails again it gets no second copy; once its offset is
  stored, the consumer forgets it (its bookkeeping does not grow with every failure).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from kafka_fakes import FakeMessage
from services.runtime import envelope as env
from services.runtime.circuit import BreakerConfig, CircuitBreaker
from services.runtime.codec import SCHEMAS_DIR, Codec, EmbeddedRegistry
from services.runtime.controls import WorkerControls
from services.runtime.envelope import Envelope
from services.runtime.errors import RetryableError
from services.runtime.events import Event, OrderCreated, StockReserved
from services.runtime.handler import UnitOfWork
from services.runtime.logs import JsonFormatter
from services.runtime.ratelimit import RateLimit, RateLimiter
from test_consumer_routing_details import Clock, fails_with, on_partition, with_kafka
from test_injected_failures import ROLLED_BACK, fail_commit_once_of_transaction_claiming
from test_routing_promises import CODEC, header, make_rig, message, order_created, stock_reserved  # noqa: F401

CONSUMER_LOGGER = "services.runtime.consumer"
LANE_MODES = pytest.mark.parametrize("concurrency", [1, 4], ids=["one-transaction-per-batch", "lanes"])


def event_id_of(msg: FakeMessage) -> str:
    return dict(msg.headers())[env.EVENT_ID].decode()


def inbox_ids(rig) -> set[str]:
    inbox = rig.consumer.service.inbox
    with rig.engine.connect() as conn:
        return set(conn.execute(select(inbox.c.event_id).where(inbox.c.group_name == rig.group.name)).scalars())


def logged(caplog, msg: str) -> list[dict]:
    """The consumer's log lines with this message, as the JSON log shows them to the operator."""
    formatter = JsonFormatter("test")
    return [json.loads(formatter.format(r)) for r in caplog.records
            if r.name == CONSUMER_LOGGER and r.getMessage() == msg]


@pytest.fixture
def no_backoff(monkeypatch) -> list[float]:
    """The loop sleeps 1 s after a failed batch: recorded instead of slept."""
    sleeps: list[float] = []
    monkeypatch.setattr("services.runtime.consumer.time.sleep", sleeps.append)
    return sleeps


# -- lanes run side by side ------------------------------------------------------------------------


def test_lanes_run_side_by_side_so_slow_io_before_the_database_overlaps(make_rig):
    """Each handler waits, before touching the database (an SMTP send), until the other order's
    handler is there too: only lanes that really run in parallel both get through."""
    both_sending = threading.Barrier(2, timeout=5)  # the timeout only matters when lanes run one by one
    rig = make_rig("batches-parallel", lambda event: both_sending.wait(),
                   controls=WorkerControls(breaker=None, concurrency=2))

    result = rig.run(message(rig.source, 0, order_created("o-1")), message(rig.source, 1, order_created("o-2")))

    assert (result.processed, result.retried) == (2, 0)
    assert rig.copies() == [] and rig.effect_count() == 2
    assert rig.stored() == [(rig.source, 0, 2)]


# -- the breaker opens in the middle of a batch -------------------------------------------------------


@LANE_MODES
def test_a_breaker_opening_mid_batch_puts_the_rest_back_and_it_runs_later_as_new(make_rig, concurrency):
    attempts: list[str] = []

    def first_attempt_fails(event: Event) -> None:
        attempts.append(event.order_id)
        if len(attempts) == 1:
            raise RetryableError("smtp down")

    config = BreakerConfig(window=1, failure_ratio=1, cooldown_s=30)
    # one order's two events, so both run in one lane; without ordered retries, or the second
    # would wait behind the first (tests/integration/test_ordered_retries.py)
    rig = make_rig(f"batches-breaker-mid-{concurrency}", first_attempt_fails,
                   controls=WorkerControls(breaker=config, concurrency=concurrency, ordered_retries=False))
    kafka = with_kafka(rig)
    clock = Clock(0.0)
    rig.consumer.breaker = CircuitBreaker(config, clock=clock)
    failing, behind = message(rig.source, 0, order_created("o-1")), message(rig.source, 1, order_created("o-1"))

    result = rig.run(failing, behind)

    assert (result.retried, result.processed, result.put_back) == (1, 0, 1)
    assert attempts == ["o-1"]  # the message behind the failure did not run
    assert rig.stored() == [(rig.source, 0, 1)] and kafka.seeks == [(rig.source, 0, 1)]
    assert event_id_of(behind) not in inbox_ids(rig)  # its claim was given back

    clock.now = 30.0  # cool-down over: the redelivered message is the probe
    result = rig.run(behind)

    assert (result.processed, result.duplicates) == (1, 0)
    assert rig.effect_count() == 1 and rig.stored()[-1] == (rig.source, 0, 2)


# -- dedup ------------------------------------------------------------------------------------------


@LANE_MODES
def test_a_redelivered_message_does_not_run_its_handler_again_not_even_before_the_database(make_rig, concurrency):
    sends: list[str] = []  # what the handler does before its first statement, e.g. an e-mail
    rig = make_rig(f"batches-redelivered-{concurrency}", lambda event: sends.append(event.order_id),
                   controls=WorkerControls(breaker=None, concurrency=concurrency))
    msg = message(rig.source, 0, order_created("o-1"))
    assert rig.run(msg).processed == 1

    again = rig.run(msg)

    assert (again.duplicates, again.processed) == (1, 0)
    assert sends == ["o-1"]
    assert rig.effect_count() == 1 and rig.copies() == []
    assert rig.stored() == [(rig.source, 0, 1), (rig.source, 0, 1)]


@LANE_MODES
def test_a_second_copy_in_the_same_batch_does_not_run_its_handler_again_not_even_before_the_database(
        make_rig, concurrency):
    """A lane reads which of its events the inbox has once, before its first message: a copy
    of an event the lane itself ran a moment ago must still be a duplicate."""
    sends: list[str] = []
    rig = make_rig(f"batches-copy-in-batch-{concurrency}", lambda event: sends.append(event.order_id),
                   controls=WorkerControls(breaker=None, concurrency=concurrency))
    first = message(rig.source, 0, order_created("o-1"))
    copy = FakeMessage(rig.source, 1, first.value(), first.headers(), key=first.key())

    result = rig.run(first, copy)

    assert (result.processed, result.duplicates) == (1, 1)
    assert sends == ["o-1"]
    assert rig.effect_count() == 1 and rig.copies() == []


@LANE_MODES
def test_the_relay_is_woken_after_a_batch_committed_events_and_only_then(make_rig, concurrency):
    rig = make_rig(f"batches-wake-{concurrency}", controls=WorkerControls(breaker=None, concurrency=concurrency))
    woken: list[int] = []
    rig.consumer.on_commit = lambda: woken.append(len(inbox_ids(rig)))
    msg = message(rig.source, 0, order_created("o-1"))

    rig.run(msg)
    rig.run(msg)  # a duplicate: nothing new to publish

    assert woken == [1]  # once, after the commit (the inbox row is there)


def test_a_message_another_consumer_finished_meanwhile_is_a_duplicate_without_a_second_effect(make_rig):
    """With lanes the transaction (and the inbox claim) begins at the handler's first statement;
    when another consumer of the group (say, after a rebalance) committed the event in between,
    the claim finds its row and the message is a duplicate."""
    rig = make_rig("batches-race", controls=WorkerControls(breaker=None, concurrency=4))
    inbox = rig.consumer.service.inbox

    def handler(event: Event, uow: UnitOfWork) -> None:
        with rig.engine.begin() as other:  # the other consumer commits while this one sends its e-mail
            other.execute(inbox.insert().values(group_name=rig.group.name, event_id=uow.envelope.event_id,
                                                event_type="OrderCreated", topic=rig.source, partition=0, offset=0,
                                                processed_at=datetime(2026, 1, 1, tzinfo=UTC)))
        uow.conn.execute(rig.effects.insert().values(event_id=uow.envelope.event_id))

    rig.consumer.service.handlers = {OrderCreated: [handler]}

    result = rig.run(message(rig.source, 0, order_created("o-1")))

    assert (result.duplicates, result.processed, result.retried, result.dead_lettered) == (1, 0, 0, 0)
    assert rig.effect_count() == 0 and rig.copies() == []
    assert rig.stored() == [(rig.source, 0, 1)]


# -- one transaction per batch: the inbox rows --------------------------------------------------------


def test_the_inbox_rows_of_one_batch_are_stamped_with_the_time_of_its_claim(make_rig, monkeypatch):
    start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    readings: list[datetime] = []

    def ticking_utcnow() -> datetime:  # one second later at every reading
        readings.append(start + timedelta(seconds=len(readings)))
        return readings[-1]

    monkeypatch.setattr("services.runtime.consumer.utcnow", ticking_utcnow)
    rig = make_rig("batches-claim-time", controls=WorkerControls(breaker=None))

    assert rig.run(*(message(rig.source, i, order_created(f"o-{i}")) for i in range(3))).processed == 3

    inbox = rig.consumer.service.inbox
    with rig.engine.connect() as conn:
        stamped = conn.execute(select(inbox.c.processed_at)).scalars().all()
    assert len(stamped) == 3
    assert {at.replace(tzinfo=None) for at in stamped} == {start.replace(tzinfo=None)}


# -- what a handler reads and writes ----------------------------------------------------------------


def test_the_handler_envelope_names_the_version_the_event_was_read_as(make_rig):
    rig = make_rig("batches-envelope-version", controls=WorkerControls(breaker=None))
    seen: list[Envelope] = []
    rig.consumer.service.handlers = {OrderCreated: [lambda event, uow: seen.append(uow.envelope)]}
    event = order_created("o-1")
    written_as_v1 = FakeMessage(rig.source, 0, CODEC.encode("OrderCreated", event.model_dump(exclude={"channel"}), 1),
                                Envelope(str(uuid.uuid4()), "OrderCreated", 1, "o-1").to_headers(), key=b"o-1")

    assert rig.run(written_as_v1).processed == 1

    [envelope] = seen
    assert (envelope.event_type, envelope.schema_version) == ("OrderCreated", OrderCreated.schema_version) == \
        ("OrderCreated", 2)
    assert envelope.event_id == event_id_of(written_as_v1)


@pytest.fixture
def codec_with_order_created_v3(tmp_path) -> Codec:
    """The repository's schemas plus an OrderCreated v3 (a compatible optional `gift_note`), as
    a producer on newer code would register it; our OrderCreated model is still v2."""
    schemas = Path(shutil.copytree(SCHEMAS_DIR, tmp_path / "schemas"))
    v2 = json.loads((schemas / "OrderCreated.v2.avsc").read_text())
    v3 = {**v2, "fields": [*v2["fields"], {"name": "gift_note", "type": ["null", "string"], "default": None}]}
    (schemas / "OrderCreated.v3.avsc").write_text(json.dumps(v3))
    manifest = json.loads((schemas / "registry.json").read_text())
    manifest["schemas"].append({"id": 99, "subject": "orderpipe.events.OrderCreated", "version": 3,
                                "file": "OrderCreated.v3.avsc"})
    (schemas / "registry.json").write_text(json.dumps(manifest))
    return Codec(EmbeddedRegistry(schemas))


@LANE_MODES
def test_an_event_written_in_a_newer_schema_version_is_read_as_the_models_version(
        make_rig, codec_with_order_created_v3, concurrency):
    rig = make_rig(f"batches-newer-writer-{concurrency}",
                   controls=WorkerControls(breaker=None, concurrency=concurrency))
    rig.consumer.codec = codec = codec_with_order_created_v3
    seen: list[OrderCreated] = []

    def handler(event: Event, uow: UnitOfWork) -> None:
        seen.append(event)
        uow.conn.execute(rig.effects.insert().values(event_id=uow.envelope.event_id))

    rig.consumer.service.handlers = {OrderCreated: [handler]}
    event = order_created("o-1")
    newer = FakeMessage(rig.source, 0, codec.encode("OrderCreated", {**event.model_dump(), "gift_note": "enjoy"}, 3),
                        Envelope(str(uuid.uuid4()), "OrderCreated", 3, "o-1").to_headers(), key=b"o-1")

    result = rig.run(newer)

    assert (result.processed, result.dead_lettered) == (1, 0), [header(c, "x-exception-message") for c in rig.copies()]
    assert seen == [event]  # the v3 field dropped, the rest as written
    assert rig.copies() == [] and rig.stored() == [(rig.source, 0, 1)]


@LANE_MODES
def test_emitted_events_are_staged_with_their_own_schema_version_and_the_causing_envelope(make_rig, concurrency):
    rig = make_rig(f"batches-emitted-{concurrency}", controls=WorkerControls(breaker=None, concurrency=concurrency))
    rig.consumer.service.handlers = {OrderCreated: [lambda event, uow: [stock_reserved(event.order_id)]]}
    msg = message(rig.source, 0, order_created("o-1"))

    assert rig.run(msg).processed == 1

    outbox = rig.consumer.service.outbox
    with rig.engine.connect() as conn:
        [(kind, payload, headers)] = conn.execute(select(outbox.c.type, outbox.c.payload, outbox.c.headers)).all()
    staged = dict(headers)
    assert kind == staged[env.EVENT_TYPE] == "StockReserved"
    assert staged[env.SCHEMA_VERSION] == str(StockReserved.schema_version) == "1"
    assert (staged[env.CAUSATION_ID], staged[env.CORRELATION_ID]) == (event_id_of(msg), "o-1")
    assert CODEC.decode(payload).record["order_id"] == "o-1"


# -- a lane whose database failed ---------------------------------------------------------------------


def test_messages_whose_transaction_failed_still_count_against_the_rate_limit(make_rig, no_backoff):
    rig = make_rig("batches-rate-failed-commit", controls=WorkerControls(breaker=None, rate_limit=RateLimit(10, 60)))
    with_kafka(rig)
    rig.consumer.limiter = RateLimiter(RateLimit(10, 60), clock=Clock(0.0))
    first, second = message(rig.source, 0, order_created("o-1")), message(rig.source, 1, order_created("o-2"))
    fail_commit_once_of_transaction_claiming(rig.engine, event_id_of(first), ROLLED_BACK)

    result = rig.run(first, second)

    assert (result.processed, result.put_back) == (0, 2) and rig.effect_count() == 0
    assert rig.consumer.limiter.available() == 8  # both handlers ran (their e-mails went out)


def test_a_lane_whose_database_failed_logs_the_rewind_with_the_group_and_the_error(make_rig, caplog, no_backoff):
    rig = make_rig("batches-log-lane-error", controls=WorkerControls(breaker=None))
    kafka = with_kafka(rig)
    msg = message(rig.source, 4, order_created("o-1"))
    fail_commit_once_of_transaction_claiming(rig.engine, event_id_of(msg), ROLLED_BACK)

    with caplog.at_level(logging.INFO, logger=CONSUMER_LOGGER):
        result = rig.run(msg)

    assert result.put_back == 1 and kafka.seeks == [(rig.source, 0, 4)] and no_backoff == [1.0]
    [line] = logged(caplog, "batch failed; rewinding and retrying")
    assert (line["level"], line["group"]) == ("error", rig.group.name)
    assert "OperationalError" in line["exc"] and "injected COMMIT failure" in line["exc"]


def test_a_batch_that_failed_as_a_whole_logs_the_rewind_with_the_group_and_the_error(make_rig, caplog, no_backoff):
    rig = make_rig("batches-log-batch-error", fails_with(RetryableError("down")), controls=WorkerControls(breaker=None))
    kafka = with_kafka(rig)
    rig.producer.flush = lambda _timeout=None: 1  # the retry copy is not acked
    kafka.batches = [[message(rig.source, 3, order_created("o-1"))]]

    with caplog.at_level(logging.INFO, logger=CONSUMER_LOGGER):
        rig.consumer.run_once(poll_timeout=0)

    assert kafka.seeks == [(rig.source, 0, 3)] and rig.stored() == []
    [line] = logged(caplog, "batch failed; rewinding and retrying")
    assert (line["level"], line["group"]) == ("error", rig.group.name)
    assert "RuntimeError: 1 retry/dead-letter copies not acked" in line["exc"]


# -- offsets and copies still queued ------------------------------------------------------------------


def test_a_queued_copy_is_kept_while_other_partitions_store_offsets_and_is_not_made_twice(make_rig):
    def o1_fails(event: Event) -> None:
        if event.order_id == "o-1":
            raise RetryableError("down")

    rig = make_rig("batches-queued-other-partition", o1_fails, controls=WorkerControls(breaker=None))
    flushes = iter([1, 0])  # the first flush times out with the copy still queued
    rig.producer.flush = lambda _timeout=None: next(flushes)
    failing = message(rig.source, 0, order_created("o-1"))
    with pytest.raises(RuntimeError, match="1 retry/dead-letter copies not acked"):
        rig.run(failing)

    other = rig.run(on_partition(message(rig.source, 0, order_created("o-2")), 1))  # another partition runs fine
    assert other.processed == 1 and rig.stored() == [(rig.source, 1, 1)]

    again = rig.run(failing)  # redelivered after the rewind; fails again

    assert again.retried == 1
    assert [header(c, "x-original-offset") for c in rig.copies()] == ["0"]
    assert rig.stored()[-1] == (rig.source, 0, 1)


def test_a_queued_copy_is_kept_when_offsets_are_stored_up_to_its_message_and_is_not_made_twice(make_rig):
    config = BreakerConfig(window=1, failure_ratio=1, cooldown_s=30)
    rig = make_rig("batches-queued-same-partition", fails_with(RetryableError("down")),
                   controls=WorkerControls(breaker=config))
    flushes = iter([1, 0, 0])  # the first flush times out with offset 6's copy still queued
    rig.producer.flush = lambda _timeout=None: next(flushes)
    m5, m6 = message(rig.source, 5, order_created("o-5")), message(rig.source, 6, order_created("o-6"))

    def fresh_breaker() -> None:  # the cool-down passed between batches
        rig.consumer.breaker = CircuitBreaker(config, clock=Clock(0.0))

    with pytest.raises(RuntimeError, match="1 retry/dead-letter copies not acked"):
        rig.run(m6)
    fresh_breaker()
    stopped = rig.run(m5, m6)  # m5 fails and opens the breaker: m6 is put back, offsets stored up to it
    assert (stopped.retried, stopped.put_back) == (1, 1) and rig.stored() == [(rig.source, 0, 6)]
    fresh_breaker()

    again = rig.run(m6)  # m6 fails again

    assert again.retried == 1
    assert [header(c, "x-original-offset") for c in rig.copies()] == ["6", "5"]


def test_a_routed_message_is_forgotten_once_its_offset_is_stored(make_rig):
    """The consumer remembers each failed message whose copy is on its way (so that a rerun
    does not copy it twice) only until its offset is stored: a long run of failures must not
    grow that bookkeeping without bound."""
    rig = make_rig("batches-forgotten", fails_with(RetryableError("down")), controls=WorkerControls(breaker=None))

    for offset in range(3):
        assert rig.run(message(rig.source, offset, order_created(f"o-{offset}"))).retried == 1

    assert rig.stored() == [(rig.source, 0, 1), (rig.source, 0, 2), (rig.source, 0, 3)]
    assert rig.consumer._copies == {}
