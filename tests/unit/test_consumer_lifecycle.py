"""The consumer's life around its batches: what it builds from its controls, how it joins and
leaves the group, how it follows rebalances and how it polls.

Promises pinned here (services/runtime/consumer.py), on the real loop with the fake Kafka clients of
`kafka_fakes`/`test_consumer_routing_details` and the rig of `test_routing_promises` (a real SQLite
file, a fake clock):

- what the controls ask for is built: a rate limit caps every batch, a circuit breaker opens on
  retryable failures, alerts (counted per group) and exports its state (closed from the start),
  `concurrency=2` runs two orders side by side on lane threads named after the group;
- `run` subscribes to the inputs and every retry tier, polls every half second by default until
  stopped, then closes the consumer (leaving the group) only once every lane has finished;
- rebalances: each assignment is counted; a (re)assigned partition starts unpaused, so one whose
  retry is still not due is paused again; a revoked or lost partition is forgotten: its held-back
  retry no longer wakes the poll up and it is neither paused nor resumed, and a message of it that
  fails again gets its own copy (the other partitions' queued copies still count);
- polling: a poll that had to wait takes the one message that came, then tops up without waiting
  from what is already fetched, never beyond what may run (the rate limit);
- the lateness of a retry is measured from its due time, zero when it runs on time;
- a transient consumer error is logged for the operator with the error and the group.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError, TopicPartition
from prometheus_client import REGISTRY

from services.runtime import metrics
from services.runtime.circuit import OPEN, BreakerConfig
from services.runtime.consumer import BatchResult
from services.runtime.controls import WorkerControls
from services.runtime.errors import RetryableError
from services.runtime.events import Event
from services.runtime.ratelimit import RateLimit
from test_consumer_routing_details import ErrorMessage, RecordingKafka, fails_with, on_partition, with_kafka
from test_routing_promises import NOW, header, make_rig, message, order_created  # noqa: F401


def sample(name: str, labels: dict[str, str]) -> float:
    """A metric as Prometheus scrapes it (0 before its first observation)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class FetchingKafka(RecordingKafka):
    """`consume` as librdkafka serves it: what is already fetched comes at once; a consume with a
    timeout, when not enough is there, waits for the next fetch (the next of `arrivals`). Its
    arguments are checked as confluent-kafka checks them."""

    def __init__(self, assignment=()):
        super().__init__(assignment)
        self.fetched: list = []
        self.arrivals: list[list] = []

    def consume(self, num_messages=1, timeout=-1):
        num_messages, timeout = operator.index(num_messages), float(timeout)  # TypeError on None
        self.consumed.append((num_messages, timeout))
        if timeout != 0 and len(self.fetched) < num_messages and self.arrivals:
            self.fetched += self.arrivals.pop(0)
        taken, self.fetched = self.fetched[:num_messages], self.fetched[num_messages:]
        return taken


class MemberKafka(RecordingKafka):
    """A group member for `run`: records the subscription and the close, and plays `script`, one
    step per consume call (a batch, or a rebalance: librdkafka runs its callbacks inside the
    poll); when the script is over it sets `stop`."""

    def __init__(self, stop: threading.Event, script: list, assignment=()):
        super().__init__(assignment)
        self.stop, self.script = stop, list(script)
        self.subscribed: list[str] | None = None
        self.callbacks: dict = {}
        self.closed = False
        self.on_close: Callable[[], None] = lambda: None

    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None):
        self.subscribed = list(topics)
        self.callbacks = {"on_assign": on_assign, "on_revoke": on_revoke, "on_lost": on_lost}

    def rebalance(self, callback: str, partitions: list[tuple[str, int]]) -> list:
        self.callbacks[callback](self, [TopicPartition(t, p) for t, p in partitions])
        return []

    def consume(self, num_messages=1, timeout=-1):
        self.consumed.append((num_messages, timeout))
        if not self.script:
            self.stop.set()
            return []
        step = self.script.pop(0)
        return step() if callable(step) else step

    def close(self):
        self.on_close()
        self.closed = True


def member(rig, script: list, assignment=()) -> MemberKafka:
    kafka = MemberKafka(threading.Event(), script, assignment)
    rig.consumer.consumer = rig.kafka = kafka
    return kafka


# -- what the controls build ------------------------------------------------------------------------


def test_a_new_consumer_exports_its_breaker_as_closed(make_rig):
    # a value no consumer sets first: the metrics registry outlives a test (and a mutation run's fork)
    metrics.BREAKER_STATE.labels("life-gauge").set(-1)
    rig = make_rig("life-gauge")
    assert REGISTRY.get_sample_value("orderpipe_circuit_breaker_state", {"group": rig.group.name}) == 0


def test_the_breaker_of_the_controls_opens_alerts_for_the_group_and_stops_consumption(make_rig):
    rig = make_rig("life-breaker", fails_with(RetryableError("smtp down")),
                   controls=WorkerControls(breaker=BreakerConfig(window=1, failure_ratio=1, cooldown_s=3600)))
    kafka = with_kafka(rig, assignment=[(rig.source, 0)])
    opened = {"group": rig.group.name, "kind": "breaker_opened"}
    before = sample("orderpipe_alerts_total", opened)

    assert rig.run(message(rig.source, 0, order_created("o-1"))).retried == 1

    assert rig.consumer.breaker.state == OPEN
    assert sample("orderpipe_circuit_breaker_state", {"group": rig.group.name}) == 1
    assert sample("orderpipe_alerts_total", opened) - before == 1  # the default alerter counts per group
    kafka.batches = [[message(rig.source, 1, order_created("o-2"))]]
    assert rig.consumer.run_once(poll_timeout=1) == BatchResult(put_back=1)
    assert kafka.paused == [(rig.source, 0)] and rig.effect_count() == 0


@pytest.mark.parametrize("limit", [2, 3])
def test_the_rate_limit_of_the_controls_caps_each_batch_even_when_more_is_fetched(make_rig, limit):
    rig = make_rig(f"life-rate-{limit}", controls=WorkerControls(breaker=None, rate_limit=RateLimit(limit, 3600)))
    kafka = FetchingKafka(assignment=[(rig.source, 0)])
    rig.consumer.consumer = rig.kafka = kafka
    kafka.arrivals = [[message(rig.source, i, order_created(f"o-{i}")) for i in range(5)]]

    result = rig.consumer.run_once(poll_timeout=1)

    # nothing fetched yet: wait for one message, then take what came with it, up to the limit
    assert kafka.consumed == [(limit, 0), (1, 1), (limit - 1, 0)]
    assert result.processed == limit and rig.effect_count() == limit
    assert rig.stored() == [(rig.source, 0, limit)]
    # the window is used up: the next message fetched is put back, not run
    assert rig.consumer.run_once(poll_timeout=1) == BatchResult(put_back=1)
    assert rig.effect_count() == limit and kafka.seeks == [(rig.source, 0, limit)]


def test_the_top_up_after_a_wait_does_not_wait_for_messages_not_fetched_yet(make_rig):
    rig = make_rig("life-topup", controls=WorkerControls(breaker=None))
    kafka = FetchingKafka()
    rig.consumer.consumer = rig.kafka = kafka
    first, later = message(rig.source, 0, order_created("o-1")), message(rig.source, 1, order_created("o-2"))
    kafka.arrivals = [[first], [later]]  # `later` comes with a fetch after `first`'s

    assert rig.consumer.run_once(poll_timeout=1).processed == 1  # `first` runs at once
    assert kafka.consumed == [(500, 0), (1, 1), (499, 0)]
    assert rig.consumer.run_once(poll_timeout=1).processed == 1
    assert rig.stored() == [(rig.source, 0, 1), (rig.source, 0, 2)]


def test_with_concurrency_2_two_orders_run_side_by_side_on_lane_threads_named_after_the_group(make_rig):
    both_running = threading.Barrier(2, timeout=5)  # breaks unless the two handlers overlap
    threads: list[str] = []

    def side_by_side(event: Event) -> None:
        threads.append(threading.current_thread().name)  # what log records and thread dumps show
        both_running.wait()

    rig = make_rig("life-lanes", side_by_side, controls=WorkerControls(breaker=None, concurrency=2))

    result = rig.run(message(rig.source, 0, order_created("o-1")), message(rig.source, 1, order_created("o-2")))

    assert result.processed == 2 and rig.copies() == []
    assert len(threads) == 2 and all(name.startswith("life-lanes-lane_") for name in threads)


# -- the loop: joining, polling, leaving ------------------------------------------------------------


def test_the_loop_subscribes_to_inputs_and_retry_tiers_polls_half_a_second_until_stopped_then_closes(make_rig):
    rig = make_rig("life-loop", controls=WorkerControls(breaker=None))
    kafka = member(rig, [[message(rig.source, 0, order_created("o-1"))]])

    rig.consumer.run(kafka.stop)

    assert kafka.subscribed == [rig.source, *(rig.group.retry_topic(rig.source, n) for n in (1, 2, 3))]
    assert rig.stored() == [(rig.source, 0, 1)] and rig.effect_count() == 1
    assert kafka.consumed == [(500, 0), (500, 0), (1, 0.5)]  # the stop is seen after the round it came in
    assert kafka.closed


def test_the_consumer_leaves_the_group_only_after_its_lanes_have_finished(make_rig):
    """Interrupted (here a KeyboardInterrupt out of one lane) while another lane still runs, the
    loop waits for that lane before closing: its partitions go to another member only once its
    transaction is over, so the order is never handled by two members at once."""
    a_running, b_running = threading.Event(), threading.Event()
    lane_of: dict[str, threading.Thread] = {}

    def behaviour(event: Event) -> None:
        lane_of[event.order_id] = threading.current_thread()
        if event.order_id == "o-a":
            a_running.set()
            b_running.wait(5)
            raise KeyboardInterrupt
        b_running.set()
        a_running.wait(5)
        lane_of["o-a"].join(5)  # o-b's lane goes on only once the loop is shutting its lanes down

    rig = make_rig("life-shutdown", behaviour, controls=WorkerControls(breaker=None, concurrency=2))
    kafka = member(rig, [[message(rig.source, 0, order_created("o-a")), message(rig.source, 1, order_created("o-b"))]])
    handled = {"group": rig.group.name}
    before = sample("orderpipe_handler_seconds_count", handled)
    handled_at_close: list[float] = []
    kafka.on_close = lambda: handled_at_close.append(sample("orderpipe_handler_seconds_count", handled) - before)

    with pytest.raises(KeyboardInterrupt):
        rig.consumer.run(kafka.stop)

    assert handled_at_close == [2]  # both handlings were over, o-b's committed, when the consumer left
    assert rig.effect_count() == 1
    assert rig.stored() == []  # the interrupted batch stores nothing: it is redelivered


# -- rebalances ------------------------------------------------------------------------------------


def test_each_assignment_is_counted_and_a_reassigned_partition_whose_retry_is_not_due_is_paused_again(make_rig):
    rig = make_rig("life-assign", controls=WorkerControls(breaker=None))
    tier_1 = rig.group.retry_topic(rig.source, 1)
    not_due = message(tier_1, 7, order_created("o-1"), headers={"x-due-at": f"{NOW + 30:.3f}"})
    kafka = member(rig, [])
    kafka.script = [[not_due],
                    lambda: kafka.rebalance("on_assign", [(rig.source, 0)]),
                    lambda: kafka.rebalance("on_assign", [(tier_1, 0)]),  # librdkafka: starts unpaused
                    []]
    assert rig.consumer.assignments == 0

    rig.consumer.run(kafka.stop, poll_timeout=0)

    assert rig.consumer.assignments == 2
    assert kafka.paused == [(tier_1, 0), (tier_1, 0)]
    assert rig.effect_count() == 0 and rig.stored() == []


REVOKED = pytest.mark.parametrize("callback", ["on_revoke", "on_lost"])


@REVOKED
def test_a_revoked_partition_holding_back_a_retry_is_forgotten(make_rig, callback):
    rig = make_rig(f"life-{callback}-held", controls=WorkerControls(breaker=None))
    tier_1 = rig.group.retry_topic(rig.source, 1)
    not_due = message(tier_1, 7, order_created("o-1"), headers={"x-due-at": f"{NOW + 0.25:.3f}"})
    kafka = member(rig, [])
    kafka.script = [[not_due], lambda: kafka.rebalance(callback, [(tier_1, 0), (rig.source, 0)]), []]

    rig.consumer.run(kafka.stop, poll_timeout=5)

    assert kafka.consumed[2] == (1, 0.25)  # while it was ours, the poll woke up when the retry was due
    assert kafka.consumed[-1] == (1, 5)  # no longer: the whole poll timeout
    assert kafka.paused == [(tier_1, 0)] and kafka.resumed == []  # not ours: neither paused nor resumed
    assert rig.effect_count() == 0


@REVOKED
def test_a_revoked_partition_drops_its_queued_copies_while_the_others_keep_theirs(make_rig, monkeypatch, callback):
    monkeypatch.setattr("services.runtime.consumer.time.sleep", lambda s: None)
    rig = make_rig(f"life-{callback}-copies", fails_with(RetryableError("down")),
                   controls=WorkerControls(breaker=None))
    flushes = iter([1, 0])  # the first flush times out with both copies queued
    rig.producer.flush = lambda _timeout=None: next(flushes)
    batch = [message(rig.source, 4, order_created("o-1")),
             on_partition(message(rig.source, 9, order_created("o-2")), 1)]
    kafka = member(rig, [])
    kafka.script = [list(batch), lambda: kafka.rebalance(callback, [(rig.source, 0)]), list(batch)]

    rig.consumer.run(kafka.stop, poll_timeout=0)

    # partition 0 came back (or was never really gone): its message failed again and got a copy
    # of its own; partition 1's queued copy is still on its way, so it gets no second one
    assert [header(copy, "x-original-partition") for copy in rig.copies()] == ["0", "1", "0"]
    assert sorted(rig.stored()) == [(rig.source, 0, 5), (rig.source, 1, 10)]
    assert rig.consumer.totals.retried == 2


# -- what is measured and logged ---------------------------------------------------------------------


def test_retry_lateness_is_measured_from_the_due_time_and_is_zero_on_time(make_rig):
    rig = make_rig("life-lateness", controls=WorkerControls(breaker=None))
    tier_1 = rig.group.retry_topic(rig.source, 1)
    labels = {"group": rig.group.name}
    before = (sample("orderpipe_retry_lateness_seconds_count", labels),
              sample("orderpipe_retry_lateness_seconds_sum", labels))

    rig.run(message(tier_1, 0, order_created("o-1"), headers={"x-due-at": f"{NOW:.3f}"}),
            message(tier_1, 1, order_created("o-2"), headers={"x-due-at": f"{NOW - 0.25:.3f}"}))

    assert sample("orderpipe_retry_lateness_seconds_count", labels) - before[0] == 2
    assert sample("orderpipe_retry_lateness_seconds_sum", labels) - before[1] == pytest.approx(0.25)


def test_a_transient_consumer_error_is_logged_with_the_error_and_the_group(make_rig, caplog):
    rig = make_rig("life-error-log", controls=WorkerControls(breaker=None))
    kafka = with_kafka(rig)
    error = KafkaError(KafkaError._TRANSPORT, "broker down")
    kafka.batches = [[ErrorMessage(error)]]

    with caplog.at_level(logging.WARNING, logger="services.runtime.consumer"):
        assert rig.consumer.run_once(poll_timeout=0) == BatchResult()

    [record] = [r for r in caplog.records if r.name == "services.runtime.consumer"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"consumer error: {error}" and "broker down" in record.getMessage()
    assert record.group == rig.group.name
    assert record.error == str(error)
