"""Details of the consumer loop that operators and downstream tools read off the copies and alerts.

Promises pinned here (services/runtime/consumer.py), each on the real loop with the fake Kafka
clients of `kafka_fakes` and the rig of `test_routing_promises` (a real SQLite file, a fake clock):

- a retry/dead-letter copy carries the original coordinates (topic, partition, offset, timestamp)
  and the first-failure time of the *first* failure across every hop, the attempt number, the due
  time `now + delay` with millisecond precision, and the non-runtime headers unchanged (runtime
  headers replaced, never piled up);
- alerts: a dead letter always alerts with its reason; a retry alerts from the
  `alert_after_attempts`-th failed attempt on, naming the due time; both carry the routing details
  (topic, source, attempt, order id, event id, exception type, error cut at 300 characters);
- a retried message is not run before its due time: its partition is paused once and rewound to
  it, later messages of other partitions still run; a due time on an *input* topic means nothing;
- consumer errors: a transient one is skipped, a fatal one or a refused session timeout stops the
  consumer with a message saying what to fix;
- `incoming_envelope`: the event id is required, the correlation id falls back to the key, a
  traceparent is made when missing; `format_traceback` keeps the head, the innermost frames and
  the exception line (and its cause) within the limit;
- admission: an open breaker or an exhausted rate limit pauses every partition and polls with a
  bounded timeout; a half-open breaker lets one probe through; the poll wakes up when the next
  held-back retry is due.
"""

from __future__ import annotations

import threading
from datetime import datetime

import pytest
from confluent_kafka import KafkaError, TopicPartition
from prometheus_client import REGISTRY

from kafka_fakes import FakeConsumer, FakeMessage
from services.runtime import envelope as env
from services.runtime.circuit import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker
from services.runtime.consumer import BatchResult, incoming_envelope
from services.runtime.controls import WorkerControls
from services.runtime.errors import ConsumerMisconfigured, KafkaRefused, PermanentError, RetryableError
from services.runtime.events import Event, OrderCreated
from services.runtime.failure_headers import format_traceback
from services.runtime.handler import Service
from services.runtime.ratelimit import RateLimit, RateLimiter
from services.runtime.retry_policy import RetryPolicy
from test_routing_promises import NOW, consumed_copy, header, make_rig, message, order_created  # noqa: F401

TRACEBACK_HEAD = "Traceback (most recent call last):\n"


class RecordingKafka(FakeConsumer):
    """A consumer that records pauses, resumes and seeks, and serves `batches` from `consume`."""

    def __init__(self, assignment: list[tuple[str, int]] = ()):
        super().__init__()
        self.paused: list[tuple[str, int]] = []
        self.resumed: list[tuple[str, int]] = []
        self.seeks: list[tuple[str, int, int]] = []
        self.consumed: list[tuple[int, float]] = []  # (num_messages, timeout) per consume call
        self.batches: list[list] = []
        self._assignment = list(assignment)

    def pause(self, partitions):
        self.paused += [(p.topic, p.partition) for p in partitions]

    def resume(self, partitions):
        self.resumed += [(p.topic, p.partition) for p in partitions]

    def seek(self, partition: TopicPartition):
        self.seeks.append((partition.topic, partition.partition, partition.offset))

    def assignment(self):
        return [TopicPartition(t, p) for t, p in self._assignment]

    def consume(self, num_messages=1, timeout=-1):
        self.consumed.append((num_messages, timeout))
        return self.batches.pop(0)[:num_messages] if self.batches else []


class RecordingAlerter:
    def __init__(self):
        self.alerts: list[tuple[str, str, dict]] = []

    def alert(self, kind: str, message: str, **details):
        self.alerts.append((kind, message, details))

    def close(self, timeout: float = 5.0):
        pass


def fails_with(exc: BaseException):
    def behaviour(event: Event) -> None:
        raise exc

    return behaviour


def with_kafka(rig, assignment=()):
    kafka = RecordingKafka(assignment)
    rig.consumer.consumer = rig.kafka = kafka
    return kafka


def with_alerter(rig) -> RecordingAlerter:
    alerter = RecordingAlerter()
    rig.consumer.alerter = alerter
    return alerter


def on_partition(msg: FakeMessage, partition: int) -> FakeMessage:
    msg._partition = partition
    return msg


# -- the copy's headers -------------------------------------------------------------------------


def test_a_first_failure_copy_names_the_original_coordinates_and_the_due_time(make_rig):
    rig = make_rig("details-first", fails_with(RetryableError("smtp down")), controls=WorkerControls(breaker=None))
    original = on_partition(message(rig.source, 41, order_created("o-7"), headers={"x-trace-note": "kept"}), 3)

    result = rig.run(original)

    assert (result.retried, result.dead_lettered) == (1, 0)
    [copy] = rig.copies()
    assert copy["topic"] == f"{rig.source}.{rig.group.name}.retry.1"
    assert header(copy, "x-original-topic") == rig.source
    assert header(copy, "x-original-partition") == "3"
    assert header(copy, "x-original-offset") == "41"
    assert header(copy, "x-original-timestamp") == "1700000000000"
    assert header(copy, "x-group") == rig.group.name
    assert header(copy, "x-attempt") == "1"
    assert header(copy, "x-due-at") == f"{NOW + 1:.3f}"
    first = datetime.fromisoformat(header(copy, "x-first-failure-at"))
    assert first.tzinfo is not None and header(copy, "x-last-failure-at") == header(copy, "x-first-failure-at")
    assert header(copy, "x-exception-type") == "services.runtime.errors.RetryableError"
    assert header(copy, "x-exception-message") == "smtp down"
    trace = header(copy, "x-exception-traceback")
    assert trace.startswith(TRACEBACK_HEAD) and trace.endswith("services.runtime.errors.RetryableError: smtp down\n")
    assert header(copy, "x-trace-note") == "kept"
    assert copy["key"] == b"o-7" and copy["value"] == original.value()
    assert rig.stored() == [(rig.source, 3, 42)]


def test_a_copy_that_fails_again_keeps_the_first_hop_coordinates_and_replaces_the_runtime_headers(make_rig):
    rig = make_rig("details-second", fails_with(RetryableError("still down")), controls=WorkerControls(breaker=None))
    rig.run(on_partition(message(rig.source, 41, order_created("o-7"), headers={"x-trace-note": "kept"}), 3))
    [first] = rig.copies()
    rig.clock.now = float(header(first, "x-due-at"))

    again = consumed_copy(first, 9)  # retry.1, partition 0, offset 9, appended later than the original
    again.timestamp = lambda: (1, 1_700_000_099_000)
    result = rig.run(again)

    assert result.retried == 1
    second = rig.copies()[-1]
    assert second["topic"] == f"{rig.source}.{rig.group.name}.retry.2"
    for name in ("x-original-topic", "x-original-partition", "x-original-offset", "x-original-timestamp",
                 "x-first-failure-at"):
        assert header(second, name) == header(first, name), name
    assert header(second, "x-attempt") == "2"
    assert header(second, "x-due-at") == f"{NOW + 1 + 10:.3f}"
    assert header(second, "x-exception-message") == "still down"
    assert header(second, "x-trace-note") == "kept"
    assert len(second["headers"]) == len(first["headers"])  # replaced, not piled up


# -- alerts -------------------------------------------------------------------------------------


def test_a_dead_letter_alerts_with_its_reason_and_the_routing_details(make_rig):
    rig = make_rig("details-dlt-alert", fails_with(PermanentError("bad " + "x" * 400)),
                   controls=WorkerControls(breaker=None))
    alerter = with_alerter(rig)
    msg = message(rig.source, 5, order_created("o-9"))

    rig.run(msg)

    [(kind, text, details)] = alerter.alerts
    assert kind == "dead_lettered"
    assert text == "message dead-lettered: not retryable"
    assert details == {"reason": "not retryable", "topic": rig.group.dlt_topic(rig.source), "source": rig.source,
                       "attempt": 1, "order_id": "o-9", "event_id": dict(msg.headers())[env.EVENT_ID].decode(),
                       "exception_type": "services.runtime.errors.PermanentError",
                       "error": ("bad " + "x" * 400)[:300]}


def test_a_retry_alerts_from_the_configured_attempt_on_naming_the_due_time(make_rig):
    rig = make_rig("details-retry-alert", fails_with(RetryableError("down")),
                   controls=WorkerControls(breaker=None, alert_after_attempts=2))
    alerter = with_alerter(rig)

    rig.run(message(rig.source, 0, order_created("o-1")))  # attempt 1: no alert yet
    assert alerter.alerts == []
    first = rig.copies()[-1]
    rig.clock.now = float(header(first, "x-due-at"))
    rig.run(consumed_copy(first, 0))  # attempt 2: alert

    [(kind, text, details)] = alerter.alerts
    due = header(rig.copies()[-1], "x-due-at")
    assert kind == "retrying"
    assert text == f"attempt 2 failed; retrying at {due}"
    assert details["attempt"] == 2 and details["topic"] == rig.group.retry_topic(rig.source, 2)
    assert details["order_id"] == "o-1" and details["error"] == "down"


# -- retried messages wait for their due time ------------------------------------------------------


def test_a_not_due_retry_pauses_its_partition_once_and_rewinds_to_it_while_other_partitions_run(make_rig):
    rig = make_rig("details-holdback", controls=WorkerControls(breaker=None))
    kafka = with_kafka(rig)
    tier_1 = rig.group.retry_topic(rig.source, 1)
    not_due = {"x-original-topic": rig.source, "x-attempt": "1", "x-due-at": f"{NOW + 5:.3f}"}
    head = message(tier_1, 7, order_created("o-1"), headers=not_due)
    behind = message(tier_1, 8, order_created("o-2"), headers={**not_due, "x-due-at": f"{NOW - 5:.3f}"})
    other = on_partition(message(tier_1, 3, order_created("o-3"), headers={**not_due, "x-due-at": f"{NOW:.3f}"}), 1)
    fresh = message(rig.source, 0, order_created("o-4"), headers={"x-due-at": f"{NOW + 99:.3f}"})
    later = on_partition(message(tier_1, 2, order_created("o-5"), headers={**not_due, "x-due-at": f"{NOW + 9:.3f}"}),
                         2)

    result = rig.run(head, behind, other, fresh, later)

    assert (result.deferred, result.processed) == (3, 2)  # due "now" runs; an input's x-due-at means nothing
    assert kafka.paused == [(tier_1, 0), (tier_1, 2)]
    assert kafka.seeks == [(tier_1, 0, 7), (tier_1, 2, 2)]
    assert rig.consumer.not_due == {(tier_1, 0): NOW + 5, (tier_1, 2): NOW + 9}
    assert sorted(rig.stored()) == [(rig.source, 0, 1), (tier_1, 1, 4)]
    assert rig.effect_count() == 2


def test_a_partition_already_paused_is_not_paused_again(make_rig):
    rig = make_rig("details-holdback-twice", controls=WorkerControls(breaker=None))
    kafka = with_kafka(rig)
    tier_1 = rig.group.retry_topic(rig.source, 1)
    head = message(tier_1, 7, order_created("o-1"), headers={"x-due-at": f"{NOW + 5:.3f}"})
    rig.run(head)
    rig.consumer.not_due.clear()  # e.g. the partition was revoked and assigned back, still paused

    result = rig.run(head)

    assert result.deferred == 1
    assert kafka.paused == [(tier_1, 0)]
    assert kafka.seeks == [(tier_1, 0, 7), (tier_1, 0, 7)]


# -- consumer errors --------------------------------------------------------------------------------


class ErrorMessage(FakeMessage):
    def __init__(self, error: KafkaError):
        super().__init__("any", 0, None, None)
        self._error = error

    def error(self):
        return self._error


def test_a_transient_consumer_error_is_skipped_and_the_batch_goes_on(make_rig):
    rig = make_rig("details-transient", controls=WorkerControls(breaker=None))
    kafka = with_kafka(rig)
    good = message(rig.source, 0, order_created("o-1"))
    kafka.batches = [[ErrorMessage(KafkaError(KafkaError._TRANSPORT, "broker down")), good]]

    result = rig.consumer.run_once(poll_timeout=0)

    assert result.processed == 1 and rig.copies() == []
    assert rig.stored() == [(rig.source, 0, 1)]


def test_only_consumer_errors_yield_an_empty_result(make_rig):
    rig = make_rig("details-transient-only", controls=WorkerControls(breaker=None))
    kafka = with_kafka(rig)
    kafka.batches = [[ErrorMessage(KafkaError(KafkaError._TRANSPORT, "broker down"))]]

    assert rig.consumer.run_once(poll_timeout=0) == BatchResult()
    assert rig.copies() == [] and rig.stored() == []


@pytest.mark.parametrize("error, fix", [
    (KafkaError(KafkaError._FATAL, "fenced", fatal=True), "see the broker's and the client's logs"),
    (KafkaError(KafkaError.INVALID_SESSION_TIMEOUT, "session timeout out of range"),
     "set ORDERPIPE_SESSION_TIMEOUT_MS within the broker's group.min.session.timeout.ms and "
     "group.max.session.timeout.ms"),
])
def test_a_refusal_that_cannot_change_stops_the_consumer_saying_what_to_fix(make_rig, error, fix):
    rig = make_rig("details-fatal", controls=WorkerControls(breaker=None))
    kafka = with_kafka(rig)
    kafka.batches = [[ErrorMessage(error)]]

    with pytest.raises(ConsumerMisconfigured) as caught:
        rig.consumer.run_once(poll_timeout=0)

    assert str(caught.value) == f"group {rig.group.name}: the broker refuses this consumer: {error.str()} ({fix})"


# -- the incoming envelope ------------------------------------------------------------------------


def envelope_of(headers: dict[str, str], key: bytes | None = b"o-1"):
    msg = FakeMessage("t", 0, b"", [(k, v.encode()) for k, v in headers.items()], key=key)
    return incoming_envelope(msg, "OrderCreated", 3)


def test_the_envelope_takes_ids_and_trace_from_the_headers():
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    got = envelope_of({env.EVENT_ID: "e-1", env.CORRELATION_ID: "corr-1", env.CAUSATION_ID: "cause-1",
                       env.TRACEPARENT: traceparent})
    assert (got.event_id, got.event_type, got.schema_version) == ("e-1", "OrderCreated", 3)
    assert (got.correlation_id, got.causation_id, got.traceparent) == ("corr-1", "cause-1", traceparent)


def test_without_a_correlation_id_the_key_is_used_and_a_traceparent_is_made():
    got = envelope_of({env.EVENT_ID: "e-1"}, key=b"order-\xff")
    assert got.correlation_id == "order-\ufffd"  # an undecodable key byte is replaced, not fatal
    assert got.causation_id is None
    version, trace_id, parent_id, flags = got.traceparent.split("-")
    assert (version, len(trace_id), len(parent_id), flags) == ("00", 32, 16, "01")
    assert envelope_of({env.EVENT_ID: "e-1"}, key=None).correlation_id == ""
    assert envelope_of({env.EVENT_ID: "e-1"}, key=b"").correlation_id == ""


def test_the_first_header_of_a_name_wins_and_undecodable_bytes_are_replaced():
    msg = FakeMessage("t", 0, b"", [(env.EVENT_ID, b"first"), (env.EVENT_ID, b"second"),
                                    (env.CAUSATION_ID, b"cause-\xff")], key=b"k")
    got = incoming_envelope(msg, "OrderCreated", 1)
    assert (got.event_id, got.causation_id) == ("first", "cause-\ufffd")


def test_a_message_without_an_event_id_is_refused_as_permanent():
    with pytest.raises(PermanentError, match=r"^message has no event_id header \(the dedup key\)$"):
        envelope_of({env.CORRELATION_ID: "c"})


# -- format_traceback -----------------------------------------------------------------------------


def raise_nested(depth: int, exc: BaseException):
    def innermost_frame():
        raise exc

    def ping(n):  # two functions taking turns: the frames are not collapsed as a repetition
        if n == 0:
            innermost_frame()
        pong(n - 1)

    def pong(n):
        if n == 0:
            innermost_frame()
        ping(n - 1)

    ping(depth)


def caught(depth: int, exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        try:
            raise_nested(depth, cause or exc)
        except BaseException as inner:
            if cause is None:
                raise
            raise exc from inner
    except BaseException as outer:
        return outer


def test_the_traceback_has_the_frames_then_the_exception_line():
    text = format_traceback(caught(1, KeyError("sku")))
    assert text.startswith(TRACEBACK_HEAD + '  File "')
    assert "in innermost_frame\n" in text
    assert text.endswith("  raise exc\nbuiltins.KeyError: 'sku'\n") or text.endswith("builtins.KeyError: 'sku'\n")
    lines = text.splitlines()
    assert all(line.startswith("  ") for line in lines[1:-1]), lines  # frames joined as they are


def test_the_cause_is_named_after_the_exception_line_cut_to_300_characters():
    text = format_traceback(caught(0, RuntimeError("write failed"), cause=ValueError("c" * 500)))
    assert text.endswith("builtins.RuntimeError: write failed\ncaused by ValueError: " + "c" * 300 + "\n")


def test_a_deep_traceback_keeps_the_head_the_innermost_frames_and_the_exception_line_within_the_limit():
    text = format_traceback(caught(200, TimeoutError("t" * 5000)))
    assert len(text) == 4000
    assert text.startswith(TRACEBACK_HEAD)
    assert text.endswith("builtins.TimeoutError: " + "t" * 1000 + "\n")
    assert "in innermost_frame\n" in text


# -- admission: breaker and rate limit ------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_an_open_breaker_pauses_everything_and_polls_with_its_remaining_cooldown(make_rig, monkeypatch):
    rig = make_rig("details-open", controls=WorkerControls(breaker=BreakerConfig(window=1, failure_ratio=1,
                                                                                 cooldown_s=0.3)))
    kafka = with_kafka(rig, assignment=[(rig.source, 0), (rig.source, 1)])
    sleeps: list[float] = []
    monkeypatch.setattr("services.runtime.consumer.time.sleep", sleeps.append)
    clock = Clock(100.0)
    rig.consumer.breaker = CircuitBreaker(rig.consumer.controls.breaker, clock=clock)
    rig.consumer.breaker.record_failure()
    assert rig.consumer.breaker.state == OPEN
    clock.now = 100.1

    result = rig.consumer.run_once(poll_timeout=5)

    assert result == BatchResult()
    assert sleeps == []  # a short cooldown is polled through, not slept (only the rate limit sleeps)
    assert sorted(kafka.paused) == [(rig.source, 0), (rig.source, 1)]
    assert kafka.consumed[0][0] == 1  # polls to keep the membership, nothing may run
    assert kafka.consumed[0][1] == 0 and kafka.consumed[1] == (1, pytest.approx(0.2))

    clock.now = 100.5  # the cooldown passed: half-open, one probe
    assert rig.consumer.breaker.state == HALF_OPEN
    kafka.batches = [[message(rig.source, 0, order_created("o-1")), message(rig.source, 1, order_created("o-2"))]]
    result = rig.consumer.run_once(poll_timeout=5)
    assert sorted(kafka.resumed) == [(rig.source, 0), (rig.source, 1)]
    assert kafka.consumed[2][0] == 1  # the probe only
    assert result.processed == 1
    assert rig.consumer.breaker.state == CLOSED


def test_an_open_breaker_polls_at_least_10_ms_and_at_most_the_poll_timeout(make_rig):
    rig = make_rig("details-open-bounds", controls=WorkerControls(breaker=BreakerConfig(window=1, failure_ratio=1,
                                                                                        cooldown_s=30)))
    kafka = with_kafka(rig, assignment=[(rig.source, 0)])
    clock = Clock(0.0)
    rig.consumer.breaker = CircuitBreaker(rig.consumer.controls.breaker, clock=clock)
    rig.consumer.breaker.record_failure()

    rig.consumer.run_once(poll_timeout=2)
    assert kafka.consumed[-1] == (1, 2)
    clock.now = 29.999
    rig.consumer.run_once(poll_timeout=2)
    assert kafka.consumed[-1] == (1, 0.01)


def test_an_exhausted_rate_limit_waits_out_a_short_gap_and_pauses_for_a_long_one(make_rig, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr("services.runtime.consumer.time.sleep", sleeps.append)
    rig = make_rig("details-rate", controls=WorkerControls(breaker=None, rate_limit=RateLimit(2, 10)))
    kafka = with_kafka(rig, assignment=[(rig.source, 0)])
    clock = Clock(0.0)
    rig.consumer.limiter = RateLimiter(RateLimit(2, 10), clock=clock)
    kafka.batches = [[message(rig.source, i, order_created(f"o-{i}")) for i in range(5)]]

    result = rig.consumer.run_once(poll_timeout=1)
    assert result.processed == 2  # at most the limit per window
    assert kafka.consumed[0] == (2, 0)

    clock.now = 4.0  # 6 s until the window has room: longer than the poll timeout, so pause and poll
    result = rig.consumer.run_once(poll_timeout=1)
    assert result == BatchResult() and sleeps == []
    assert kafka.paused == [(rig.source, 0)]
    assert kafka.consumed[-1] == (1, 1)

    clock.now = 9.5  # 0.5 s left: shorter than the poll timeout, so sleep it out
    monkeypatch.setattr("services.runtime.consumer.time.sleep", lambda s: (sleeps.append(s), setattr(clock, "now", 10.0)))
    kafka.batches = [[message(rig.source, 2, order_created("o-2"))]]
    result = rig.consumer.run_once(poll_timeout=1)
    assert sleeps == [pytest.approx(0.5)]
    assert result.processed == 1
    assert kafka.resumed == [(rig.source, 0)]


def test_the_poll_wakes_up_when_the_next_held_back_retry_is_due(make_rig):
    rig = make_rig("details-wake", controls=WorkerControls(breaker=None))
    kafka = with_kafka(rig)
    tier_1 = rig.group.retry_topic(rig.source, 1)
    kafka.batches = [[message(tier_1, 7, order_created("o-1"), headers={"x-due-at": f"{NOW + 0.25:.3f}"})]]
    assert rig.consumer.run_once(poll_timeout=5).deferred == 1

    rig.consumer.run_once(poll_timeout=5)
    assert kafka.consumed[-1] == (1, 0.25)  # not the whole poll timeout

    rig.clock.now = NOW + 0.25  # due: the partition is resumed
    rig.consumer.run_once(poll_timeout=5)
    assert kafka.resumed == [(tier_1, 0)]
    assert kafka.consumed[-1] == (1, 5)


def test_messages_polled_while_nothing_may_run_are_put_back(make_rig):
    rig = make_rig("details-putback", controls=WorkerControls(breaker=BreakerConfig(window=1, failure_ratio=1,
                                                                                   cooldown_s=30)))
    kafka = with_kafka(rig, assignment=[(rig.source, 0)])
    rig.consumer.breaker = CircuitBreaker(rig.consumer.controls.breaker, clock=Clock(0.0))
    rig.consumer.breaker.record_failure()
    # a partition assigned during the poll is not paused yet: its messages come anyway
    kafka.batches = [[message(rig.source, 4, order_created("o-1")), message(rig.source, 5, order_created("o-2"))]]

    result = rig.consumer.run_once(poll_timeout=1)

    assert kafka.consumed[0] == (1, 0)  # one message at most while nothing may run
    assert result == BatchResult(put_back=1)
    assert kafka.seeks == [(rig.source, 0, 4)]
    assert rig.effect_count() == 0 and rig.stored() == []


def test_a_failed_batch_is_rewound_and_reports_nothing(make_rig, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr("services.runtime.consumer.time.sleep", sleeps.append)
    rig = make_rig("details-broker-down", fails_with(RetryableError("down")), controls=WorkerControls(breaker=None))
    kafka = with_kafka(rig)
    rig.producer.flush = lambda _timeout=None: 1  # the copy is not acked
    kafka.batches = [[message(rig.source, 3, order_created("o-1")), message(rig.source, 4, order_created("o-2"))]]

    result = rig.consumer.run_once(poll_timeout=0)

    assert result == BatchResult()
    assert kafka.seeks == [(rig.source, 0, 3)]
    assert rig.stored() == [] and sleeps == [1.0]



# -- the breaker: what it counts, what it tells the operator ------------------------------------------


def sample(name: str, group: str) -> float:
    """A metric as Prometheus scrapes it (0 before its first observation)."""
    return REGISTRY.get_sample_value(name, {"group": group}) or 0.0


def breaker_gauge(group: str) -> float | None:
    return REGISTRY.get_sample_value("orderpipe_circuit_breaker_state", {"group": group})


def test_the_breaker_opens_on_retryable_failures_only_and_alerts_on_open_and_close(make_rig, monkeypatch):
    monkeypatch.setattr("services.runtime.consumer.time.sleep", lambda s: None)
    failing = {"o-bad": PermanentError("bad data"), "o-down": RetryableError("db down")}

    def behaviour(event: Event) -> None:
        if event.order_id in failing:
            raise failing[event.order_id]

    config = BreakerConfig(window=1, failure_ratio=1, cooldown_s=30)
    rig = make_rig("details-breaker", behaviour, controls=WorkerControls(breaker=config))
    alerter = with_alerter(rig)
    clock = Clock(0.0)
    rig.consumer.breaker = CircuitBreaker(config, clock=clock, on_transition=rig.consumer._breaker_changed)

    def breaker_alerts():
        return [a for a in alerter.alerts if a[0].startswith("breaker")]

    rig.run(message(rig.source, 0, order_created("o-bad")))  # permanent: says nothing about the dependency
    assert rig.consumer.breaker.state == CLOSED and breaker_alerts() == []

    rig.run(message(rig.source, 1, order_created("o-down")))  # retryable: the dependency is down
    assert rig.consumer.breaker.state == OPEN
    [(kind, text, details)] = breaker_alerts()
    assert kind == "breaker_opened" and details["reason"]
    assert text == f"circuit breaker opened: {details['reason']}; consumption paused for 30 s, then one probe"
    assert breaker_gauge(rig.group.name) == 1

    clock.now = 31.0
    assert rig.consumer.breaker.state == HALF_OPEN
    assert breaker_gauge(rig.group.name) == 2 and len(breaker_alerts()) == 1  # half-open: logged, no alert
    rig.run(message(rig.source, 2, order_created("o-good")))  # the probe succeeds
    assert rig.consumer.breaker.state == CLOSED
    kind, text, details = breaker_alerts()[-1]
    assert kind == "breaker_closed" and text == f"circuit breaker closed: {details['reason']}; consuming again"
    assert breaker_gauge(rig.group.name) == 0


# -- what a batch counts against the rate limit ----------------------------------------------------------


def test_every_message_that_ran_counts_against_the_rate_limit_and_the_last_slot_is_used(make_rig):
    rig = make_rig("details-rate-count", controls=WorkerControls(breaker=None, rate_limit=RateLimit(3, 10)))
    kafka = with_kafka(rig, assignment=[(rig.source, 0)])
    clock = Clock(0.0)
    rig.consumer.limiter = RateLimiter(RateLimit(3, 10), clock=clock)
    kafka.batches = [[message(rig.source, i, order_created(f"o-{i}")) for i in range(2)],
                     [message(rig.source, i, order_created(f"o-{i}")) for i in range(2, 5)]]

    assert rig.consumer.run_once(poll_timeout=0).processed == 2
    assert rig.consumer.limiter.available() == 1
    assert rig.consumer.run_once(poll_timeout=0).processed == 1  # one slot left: one message
    assert kafka.consumed[-1] == (1, 0)
    assert rig.consumer.polls == 2


def test_the_time_paused_by_the_rate_limit_is_counted(make_rig, monkeypatch):
    rig = make_rig("details-throttled", controls=WorkerControls(breaker=None, rate_limit=RateLimit(1, 10)))
    kafka = with_kafka(rig, assignment=[(rig.source, 0)])
    clock = Clock(0.0)
    rig.consumer.limiter = RateLimiter(RateLimit(1, 10), clock=clock)
    sleeps: list[float] = []
    monkeypatch.setattr("services.runtime.consumer.time.sleep",
                        lambda s: (sleeps.append(s), setattr(clock, "now", clock.now + s)))
    kafka.batches = [[message(rig.source, 0, order_created("o-0"))]]
    throttled_before = sample("orderpipe_rate_limited_seconds_total", rig.group.name)
    rig.consumer.run_once(poll_timeout=1)  # the one slot of this window

    clock.now = 5.0  # 5 s until a slot: pause, poll 1 s
    rig.consumer.run_once(poll_timeout=1)
    clock.now = 9.0  # exactly one poll timeout until a slot: sleep it out instead of pausing
    kafka.batches = [[message(rig.source, 1, order_created("o-1"))]]
    result = rig.consumer.run_once(poll_timeout=1)

    assert sleeps == [1.0] and result.processed == 1
    assert sample("orderpipe_rate_limited_seconds_total", rig.group.name) - throttled_before == 2.0


# -- unacked or refused copies ------------------------------------------------------------------------


class RefusingProducer:
    def __init__(self, code: int = KafkaError.MSG_SIZE_TOO_LARGE):
        self.produced, self.flushes, self.reports = [], [], []
        self.code = code

    def produce(self, topic, key=None, value=None, headers=None, on_delivery=None, **_):
        self.produced.append(topic)
        self.reports.append(on_delivery)

    def poll(self, _timeout=0):
        return 0

    def flush(self, timeout=None):
        self.flushes.append(timeout)
        for report in self.reports:
            report(KafkaError(self.code), None)
        self.reports = []
        return 0


def test_a_refused_copy_fails_the_batch_saying_so_after_waiting_30_s_for_acks(make_rig):
    rig = make_rig("details-refused", fails_with(RetryableError("down")), controls=WorkerControls(breaker=None))
    producer = rig.consumer.producer = RefusingProducer()

    with pytest.raises(RuntimeError) as caught:
        rig.run(message(rig.source, 0, order_created("o-1")), message(rig.source, 1, order_created("o-2")))

    first = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    assert str(caught.value) == f"0 retry/dead-letter copies not acked, 2 refused ({[first]}); not storing offsets"
    assert producer.flushes == [30]
    assert rig.stored() == []


def test_a_copy_the_authorizer_denies_stops_the_consumer_naming_the_missing_acl(make_rig):
    """Asking again gets the same answer: no rewind and retry forever, the process stops."""
    rig = make_rig("details-denied", fails_with(RetryableError("down")), controls=WorkerControls(breaker=None))
    rig.consumer.producer = RefusingProducer(KafkaError.TOPIC_AUTHORIZATION_FAILED)

    with pytest.raises(KafkaRefused) as caught:
        rig.run(message(rig.source, 0, order_created("o-1")))

    assert str(caught.value).startswith(
        "Kafka denied group details-denied its retry and dead-letter copies and failure notices: ")
    assert "kafka-users.yaml" in str(caught.value)
    assert rig.stored() == []


# -- the inbox is per group ------------------------------------------------------------------------------


CONCURRENCY = pytest.mark.parametrize("concurrency", [1, 4])


def another_groups_claim(rig, event_id: str) -> None:
    inbox = rig.consumer.service.inbox
    with rig.engine.begin() as conn:
        conn.execute(inbox.insert().values(group_name="another-group", event_id=event_id, event_type="OrderCreated",
                                           topic="t", partition=0, offset=0, processed_at=datetime(2026, 1, 1)))


def inbox_rows(rig) -> set[tuple[str, str]]:
    inbox = rig.consumer.service.inbox
    with rig.engine.connect() as conn:
        return set(conn.execute(inbox.select().with_only_columns(inbox.c.group_name, inbox.c.event_id)).all())


@CONCURRENCY
def test_another_groups_inbox_row_is_no_duplicate_here_and_survives_a_give_back(make_rig, concurrency):
    def behaviour(event: Event) -> None:
        if event.order_id == "o-fails":
            raise RetryableError("down")

    rig = make_rig(f"details-groups-{concurrency}", behaviour,
                   controls=WorkerControls(breaker=None, concurrency=concurrency))
    ok, failing = message(rig.source, 0, order_created("o-ok")), message(rig.source, 1, order_created("o-fails"))
    ok_id, failing_id = (dict(m.headers())[env.EVENT_ID].decode() for m in (ok, failing))
    for event_id in (ok_id, failing_id):
        another_groups_claim(rig, event_id)

    result = rig.run(ok, failing)

    assert (result.processed, result.duplicates, result.retried) == (1, 0, 1)
    assert inbox_rows(rig) == {("another-group", ok_id), ("another-group", failing_id), (rig.group.name, ok_id)}


@CONCURRENCY
def test_a_handler_gets_its_group_and_the_service_deps(make_rig, concurrency):
    rig = make_rig(f"details-uow-{concurrency}", controls=WorkerControls(breaker=None, concurrency=concurrency))
    seen = []

    def handler(event: Event, uow) -> None:
        seen.append((uow.group, uow.deps, uow.envelope.correlation_id))
        uow.conn.execute(rig.effects.insert().values(event_id=uow.envelope.event_id))

    rig.consumer.service.handlers = {OrderCreated: [handler]}
    rig.consumer.service.deps = deps = object()
    rig.run(message(rig.source, 0, order_created("o-1")))
    assert seen == [(rig.group.name, deps, "o-1")]


# -- timing metrics --------------------------------------------------------------------------------------


class SteppingTime:
    """The consumer module's `time`: `monotonic` advances 0.5 s per reading (per thread, so that
    lanes running side by side do not move each other's clock)."""

    def __init__(self):
        self.local = threading.local()

    def monotonic(self) -> float:
        self.local.now = getattr(self.local, "now", 0.0) + 0.5
        return self.local.now

    def sleep(self, _s) -> None:
        pass


@CONCURRENCY
def test_handler_time_and_retry_lateness_are_measured(make_rig, monkeypatch, concurrency):
    monkeypatch.setattr("services.runtime.consumer.time", SteppingTime())
    rig = make_rig(f"details-timing-{concurrency}", controls=WorkerControls(breaker=None, concurrency=concurrency))
    tier_1 = rig.group.retry_topic(rig.source, 1)
    late = message(tier_1, 0, order_created("o-1"), headers={"x-due-at": f"{NOW - 2:.3f}"})
    fresh = message(rig.source, 0, order_created("o-2"), headers={"x-due-at": f"{NOW - 7:.3f}"})

    names = ("orderpipe_handler_seconds_count", "orderpipe_handler_seconds_sum",
             "orderpipe_retry_lateness_seconds_count", "orderpipe_retry_lateness_seconds_sum")
    before = [sample(name, rig.group.name) for name in names]

    assert rig.run(late, fresh).processed == 2

    grown = [sample(name, rig.group.name) - was for name, was in zip(names, before)]
    # two messages, 0.5 s each; only the retry copy has a due time that means something: 2 s late
    assert grown == [2, pytest.approx(1.0), 1, pytest.approx(2.0)]


def test_run_once_polls_with_half_a_second_by_default(make_rig):
    rig = make_rig("details-default-poll", controls=WorkerControls(breaker=None))
    kafka = with_kafka(rig)
    assert rig.consumer.run_once() == BatchResult()
    assert kafka.consumed == [(500, 0), (1, 0.5)]


# -- more routing details ------------------------------------------------------------------------------


def test_a_group_without_retry_tiers_dead_letters_even_with_a_multi_attempt_policy(make_rig):
    rig = make_rig("details-no-tiers", fails_with(RetryableError("down")), retry_delays_s=(),
                   controls=WorkerControls(breaker=None, retry=RetryPolicy.exponential(max_attempts=4)))
    result = rig.run(message(rig.source, 0, order_created("o-1")))
    assert (result.retried, result.dead_lettered) == (0, 1)
    [copy] = rig.copies()
    assert copy["topic"] == rig.group.dlt_topic(rig.source)
    assert header(copy, "x-reason") == "retries exhausted after 1 attempts"


def test_the_service_lists_decide_what_the_loop_retries(make_rig):
    failing = {"o-timeout": TimeoutError("slow"), "o-value": ValueError("odd but transient here")}
    def behaviour(event: Event) -> None:
        raise failing[event.order_id]

    rig = make_rig("details-lists", behaviour, controls=WorkerControls(breaker=None))
    rig.consumer.service.permanent = (TimeoutError,)
    rig.consumer.service.retryable = (ValueError,)
    result = rig.run(message(rig.source, 0, order_created("o-timeout")), message(rig.source, 1, order_created("o-value")))
    assert (result.retried, result.dead_lettered) == (1, 1)
    by_type = {header(c, "x-exception-type"): c["topic"] for c in rig.copies()}
    assert by_type == {"builtins.TimeoutError": rig.group.dlt_topic(rig.source),
                       "builtins.ValueError": rig.group.retry_topic(rig.source, 1)}


def test_a_copy_still_queued_is_counted_as_retried_again_without_a_second_copy(make_rig):
    rig = make_rig("details-queued", fails_with(RetryableError("down")), controls=WorkerControls(breaker=None))
    flushes = iter([1, 0])  # the first flush times out with the copy queued
    rig.producer.flush = lambda _timeout=None: next(flushes)
    msg = message(rig.source, 0, order_created("o-1"))
    with pytest.raises(RuntimeError, match="1 retry/dead-letter copies not acked"):
        rig.run(msg)

    result = rig.run(msg)  # redelivered after the rewind; fails again

    assert (result.retried, result.dead_lettered) == (1, 0)
    assert len(rig.copies()) == 1


def test_alert_details_carry_the_order_id_from_the_key_whatever_its_bytes(make_rig):
    rig = make_rig("details-keys", fails_with(PermanentError("bad")), controls=WorkerControls(breaker=None))
    alerter = with_alerter(rig)
    odd = message(rig.source, 0, order_created("o-1"))
    odd._key = b"o-\xff"
    keyless = message(rig.source, 1, order_created("o-2"))
    keyless._key = None
    rig.run(odd, keyless)
    assert [details["order_id"] for _, _, details in alerter.alerts] == ["o-\ufffd", None]


def test_a_non_finite_due_time_reads_as_absent_and_the_copy_runs(make_rig):
    rig = make_rig("details-inf", controls=WorkerControls(breaker=None))
    tier_1 = rig.group.retry_topic(rig.source, 1)
    result = rig.run(message(tier_1, 0, order_created("o-1"), headers={"x-due-at": "inf"}))
    assert (result.deferred, result.processed) == (0, 1)


def test_a_message_arriving_while_the_rate_limit_is_exhausted_is_put_back_not_run(make_rig):
    rig = make_rig("details-rate-putback", controls=WorkerControls(breaker=None, rate_limit=RateLimit(1, 60)))
    kafka = with_kafka(rig, assignment=[(rig.source, 0)])
    rig.consumer.limiter = RateLimiter(RateLimit(1, 60), clock=Clock(0.0))
    rig.consumer.limiter.record(1)
    kafka.batches = [[message(rig.source, 4, order_created("o-1"))]]

    result = rig.consumer.run_once(poll_timeout=1)

    assert result == BatchResult(put_back=1)
    assert rig.effect_count() == 0 and kafka.seeks == [(rig.source, 0, 4)]


def test_services_built_twice_on_one_metadata_share_its_inbox_and_outbox(make_rig):
    rig = make_rig("details-metadata")
    first = rig.consumer.service
    second = Service(first.group, first.metadata, first.handlers)
    assert second.outbox is first.outbox and second.inbox is first.inbox
    assert first.metadata.tables["outbox"] is first.outbox and first.metadata.tables["inbox"] is first.inbox
