"""What the consumer loop tells the operator when handlers fail, and how it keeps its books.

Promises pinned here (services/runtime/consumer.py), on the real loop with the fake Kafka clients
of `kafka_fakes` and the rig of `test_routing_promises` (a real SQLite file, a fake clock); log
lines are read as the JSON formatter of `services.runtime.logs` writes them:

- a failing handler logs `handler failed` (warning) with the group, the event id, the order id
  (the correlation id) and the exception's repr, in both lane modes;
- a retried message logs `message retried` with the group and the routing details: target topic,
  source topic, attempt, order id, event id, exception type and message;
- when the breaker's cool-down ends, the consumer logs `circuit breaker` with the group, the new
  state (`half_open`) and the reason; opening and closing are alerts, not this log line;
- routing a failure serves the producer's delivery reports without waiting on the broker;
- a copy that expires in the producer after its partition was revoked is reported as refused by
  the batch that hears of it (the batch fails and is redelivered), not a crash; the redelivered
  batch stores its offset without making a second copy;
- `ServiceConsumer.totals` (logged when the service stops) adds up every batch's counts.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
from confluent_kafka import KafkaError, TopicPartition

from kafka_fakes import FakeProducer
from services.runtime.circuit import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker
from services.runtime.consumer import BatchResult
from services.runtime.controls import WorkerControls
from services.runtime.envelope import EVENT_ID
from services.runtime.errors import PermanentError, RetryableError
from services.runtime.events import Event
from services.runtime.logs import JsonFormatter
from test_consumer_routing_details import Clock, fails_with, on_partition, with_alerter, with_kafka
from test_routing_promises import NOW, make_rig, message, order_created  # noqa: F401

CONSUMER_LOGGER = "services.runtime.consumer"


def logged(caplog, msg: str) -> list[dict]:
    """The consumer's log lines with this message, as the JSON log shows them to the operator."""
    formatter = JsonFormatter("test")
    return [json.loads(formatter.format(r)) for r in caplog.records
            if r.name == CONSUMER_LOGGER and r.getMessage() == msg]


def event_id_of(msg) -> str:
    return dict(msg.headers())[EVENT_ID].decode()


# -- the log lines of a failure ----------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_failing_handler_logs_the_group_the_event_the_order_and_the_error(make_rig, caplog, concurrency):
    rig = make_rig(f"failpaths-handler-{concurrency}", fails_with(RetryableError("smtp down")),
                   controls=WorkerControls(breaker=None, concurrency=concurrency))
    failing = message(rig.source, 3, order_created("o-7"))

    with caplog.at_level(logging.INFO, logger=CONSUMER_LOGGER):
        rig.run(failing)

    [line] = logged(caplog, "handler failed")
    assert line["level"] == "warning"
    assert line["group"] == rig.group.name
    assert line["event_id"] == event_id_of(failing)
    assert line["order_id"] == "o-7"
    assert line["error"] == "RetryableError('smtp down')"


def test_a_retried_message_logs_where_it_went_and_why(make_rig, caplog):
    rig = make_rig("failpaths-retried", fails_with(RetryableError("smtp down")), controls=WorkerControls(breaker=None))
    failing = message(rig.source, 3, order_created("o-7"))

    with caplog.at_level(logging.INFO, logger=CONSUMER_LOGGER):
        assert rig.run(failing).retried == 1

    [line] = logged(caplog, "message retried")
    assert line["level"] == "info"
    assert line["group"] == rig.group.name
    assert line["topic"] == rig.group.retry_topic(rig.source, 1)
    assert line["source"] == rig.source
    assert line["attempt"] == 1
    assert line["order_id"] == "o-7"
    assert line["event_id"] == event_id_of(failing)
    assert line["exception_type"] == "services.runtime.errors.RetryableError"
    assert line["error"] == "smtp down"


def test_the_end_of_the_breaker_cool_down_is_logged_with_the_state_and_the_reason(make_rig, caplog, monkeypatch):
    monkeypatch.setattr("services.runtime.consumer.time.sleep", lambda s: None)
    config = BreakerConfig(window=1, failure_ratio=1, cooldown_s=30)
    rig = make_rig("failpaths-halfopen", controls=WorkerControls(breaker=config))
    kafka = with_kafka(rig, assignment=[(rig.source, 0)])
    alerter = with_alerter(rig)
    clock = Clock(0.0)
    rig.consumer.breaker = CircuitBreaker(config, clock=clock, on_transition=rig.consumer._breaker_changed)

    with caplog.at_level(logging.INFO, logger=CONSUMER_LOGGER):
        rig.consumer.breaker.record_failure()
        assert rig.consumer.breaker.state == OPEN
        assert logged(caplog, "circuit breaker") == []  # opening is an alert, not this line

        clock.now = 31.0  # the cool-down is over: the next poll lets the probe through
        kafka.batches = [[message(rig.source, 0, order_created("o-probe"))]]
        assert rig.consumer.run_once(poll_timeout=0).processed == 1

    assert rig.consumer.breaker.state == CLOSED
    [line] = logged(caplog, "circuit breaker")
    assert line["level"] == "info"
    assert line["group"] == rig.group.name
    assert line["state"] == HALF_OPEN
    assert line["reason"] == "cool-down over, probing"
    assert [kind for kind, _, _ in alerter.alerts] == ["breaker_opened", "breaker_closed"]


# -- the producer while routing ------------------------------------------------------------------------


class BlockingPollProducer(FakeProducer):
    """A producer whose `poll(timeout)` blocks as librdkafka's does: `timeout` seconds, forever for
    None or a negative timeout. `waited` adds up the time spent blocked in poll."""

    def __init__(self):
        super().__init__()
        self.waited = 0.0

    def poll(self, timeout=None):
        self.waited += math.inf if timeout is None or timeout < 0 else timeout
        return 0


def test_routing_failures_serves_delivery_reports_without_waiting_on_the_broker(make_rig):
    rig = make_rig("failpaths-poll", fails_with(RetryableError("down")), controls=WorkerControls(breaker=None))
    producer = rig.consumer.producer = rig.producer = BlockingPollProducer()

    result = rig.run(*(message(rig.source, i, order_created(f"o-{i}")) for i in range(3)))

    assert result.retried == 3 and len(producer.produced) == 3
    assert producer.waited == 0  # only the flush, after routing, waits for the acks


# -- a copy refused after its partition was revoked ---------------------------------------------------


class StalledProducer(FakeProducer):
    """While `down`, copies stay queued and `flush` times out reporting them as remaining; once the
    broker is back, `flush` delivers the reports, copies queued while it was down having expired."""

    def __init__(self):
        super().__init__()
        self.down = False
        self.queue: list[tuple[object, KafkaError | None]] = []

    def produce(self, topic, key=None, value=None, headers=None, on_delivery=None, **_):
        super().produce(topic, key=key, value=value, headers=headers)
        expired = KafkaError(KafkaError._MSG_TIMED_OUT) if self.down else None
        self.queue.append((on_delivery, expired))

    def flush(self, _timeout=None):
        if self.down:
            return len(self.queue)
        reports, self.queue = self.queue, []
        for report, err in reports:
            report(err, None)
        return 0


def test_a_copy_expiring_after_its_partition_was_revoked_fails_only_the_batch_that_hears_of_it(make_rig):
    rig = make_rig("failpaths-revoked", fails_with(RetryableError("down")), controls=WorkerControls(breaker=None))
    producer = rig.consumer.producer = rig.producer = StalledProducer()
    producer.down = True
    on_lost_partition = message(rig.source, 0, order_created("o-lost"))
    with pytest.raises(RuntimeError, match="1 retry/dead-letter copies not acked"):
        rig.run(on_lost_partition)

    rig.consumer._on_revoke(rig.kafka, [TopicPartition(rig.source, 0)])  # a rebalance takes partition 0
    producer.down = False  # the broker is back; the queued copy expired meanwhile
    kept = on_partition(message(rig.source, 5, order_created("o-kept")), 1)
    with pytest.raises(RuntimeError, match=r"0 retry/dead-letter copies not acked, 1 refused"):
        rig.run(kept)

    result = rig.run(kept)  # redelivered: its copy was acked, so it is not made again

    assert result.retried == 1
    assert [c["key"] for c in rig.copies()] == [b"o-lost", b"o-kept"]
    assert rig.stored() == [(rig.source, 1, 6)]


# -- the running totals ------------------------------------------------------------------------------


def test_the_totals_add_up_every_batch(make_rig):
    failing = {"o-retry": RetryableError("down"), "o-bad": PermanentError("bad data")}

    def behaviour(event: Event) -> None:
        if event.order_id in failing:
            raise failing[event.order_id]

    rig = make_rig("failpaths-totals", behaviour, controls=WorkerControls(breaker=None))
    with_kafka(rig)
    first = message(rig.source, 0, order_created("o-1"))
    tier_1 = rig.group.retry_topic(rig.source, 1)

    one = rig.run(first, message(rig.source, 1, order_created("o-2")),
                  message(rig.source, 2, order_created("o-retry")), message(rig.source, 3, order_created("o-bad")))
    two = rig.run(first,  # redelivered: a duplicate
                  message(tier_1, 0, order_created("o-later"), headers={"x-due-at": f"{NOW + 60:.3f}"}),
                  message(rig.source, 4, order_created("o-3")))

    assert one == BatchResult(processed=2, retried=1, dead_lettered=1)
    assert two == BatchResult(processed=1, duplicates=1, deferred=1)
    assert rig.consumer.totals == BatchResult(processed=3, duplicates=1, retried=1, dead_lettered=1, deferred=1)
