"""Ordered retries per key on the real broker, SQLite and PostgreSQL, one lane and four: while an
event of an order is in the group's retry chain, the order's later events wait in the group's
database and then run in the order they arrived; every other order flows on meanwhile.

The rig is test_retries.py's: a service whose handler records each run (`effects`, with the
event's sequence number in `seq`) and fails as the test's behaviour says.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from reading import wait_until
from services.runtime import metrics
from services.runtime.alerts import KEY_HELD
from services.runtime.controls import WorkerControls
from services.runtime.errors import RetryableError
from services.runtime.failure_headers import RUNTIME_HEADERS
from services.runtime.held import HeldKeys
from services.runtime.ratelimit import RateLimit
from test_retries import ManualClock, Rig, rig, sqlite_url  # noqa: F401 - rig and sqlite_url are fixtures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LANES = pytest.mark.parametrize("concurrency", [1, 4], ids=["one-lane", "four-lanes"])


def held_counts(r: Rig) -> tuple[int, int]:
    with r.engine.connect() as conn:
        return (conn.execute(select(func.count()).select_from(r.service.held_keys)).scalar_one(),
                conn.execute(select(func.count()).select_from(r.service.held_events)).scalar_one())


def seqs(r: Rig, order_id: str) -> list[int]:
    return [int(row.seq) for row in r.rows(order_id)]


@LANES
def test_an_orders_later_events_wait_for_its_retried_event_and_other_orders_flow(rig, database_url, concurrency):
    held_order = f"held-{uuid.uuid4().hex[:8]}"

    def first_event_fails_twice(event, tried: int) -> None:
        if event.order_id == held_order and int(event.customer_id) == 0 and tried < 2:
            raise RetryableError(f"attempt {tried + 1}: stock service busy")

    r = rig(first_event_fails_twice, retry_delays_s=(0.5, 0.5), database_url=database_url,
            controls=WorkerControls(concurrency=concurrency, breaker=None))
    for seq in range(4):
        r.produce_order(held_order, seq)
    others = [r.produce_order(seq=0).order_id for _ in range(6)]
    r.flush()

    wait_until(lambda: len(r.rows(held_order)) == 4 or None, what="the held order's four events")
    wait_until(lambda: held_counts(r) == (0, 0) or None, what="the key released")
    r.stop()

    assert seqs(r, held_order) == [0, 1, 2, 3], "the order's events ran out of order"
    [first_run] = [row for row in r.rows(held_order) if int(row.seq) == 0]
    for order_id in others:  # not held up: they ran before the held order's head succeeded
        [row] = r.rows(order_id)
        assert row.handled_at < first_run.handled_at
    assert r.consumer.totals.held == 3 and r.consumer.totals.retried == 2
    assert r.consumer.totals.processed == 4 + len(others)  # released events count like any other
    assert [m.key for m in r.read(r.retry_topic(1)) + r.read(r.retry_topic(2))] == [held_order] * 2
    assert r.read(r.dlt) == []


@LANES
def test_an_event_that_fails_on_release_becomes_the_head_and_the_rest_keep_waiting(rig, database_url, concurrency):
    order = f"twice-{uuid.uuid4().hex[:8]}"

    def first_try_of_events_0_and_2_fails(event, tried: int) -> None:
        seq = int(event.customer_id)
        if seq in (0, 2) and r.calls_by_seq.setdefault(seq, 0) == 0:
            r.calls_by_seq[seq] += 1
            raise RetryableError(f"event {seq}: first try fails")

    r = rig(first_try_of_events_0_and_2_fails, retry_delays_s=(0.5,), database_url=database_url,
            controls=WorkerControls(concurrency=concurrency, breaker=None))
    r.calls_by_seq = {}
    for seq in range(5):
        r.produce_order(order, seq)
    r.flush()

    wait_until(lambda: len(r.rows(order)) == 5 or None, what="the order's five events")
    wait_until(lambda: held_counts(r) == (0, 0) or None, what="the key released")
    r.stop()

    assert seqs(r, order) == [0, 1, 2, 3, 4]
    retried = r.read(r.retry_topic(1))
    assert sorted(int(m.headers.get("x-attempt", "0")) for m in retried) == [1, 1]  # events 0 and 2, once each


@pytest.mark.parametrize("policy, operator", [("hold", "replays"), ("hold", "purges and releases"),
                                              ("release", None)])
def test_a_dead_lettered_head_holds_its_key_until_replayed_or_releases_it(rig, database_url, policy, operator):
    order = f"dead-{uuid.uuid4().hex[:8]}"
    broken = {"head": True}

    def head_fails_until_fixed(event, tried: int) -> None:
        if int(event.customer_id) == 0 and broken["head"]:
            raise RetryableError("the head keeps failing")

    r = rig(head_fails_until_fixed, retry_delays_s=(0.3,), database_url=database_url,
            controls=WorkerControls(breaker=None, held_dead_letter_policy=policy))
    for seq in range(3):
        r.produce_order(order, seq)
    r.flush()

    [dead] = wait_until(lambda: r.read(r.dlt) or None, what="the head dead-lettered")
    if policy == "release":
        wait_until(lambda: len(r.rows(order)) == 2 or None, what="the events behind it released")
        assert seqs(r, order) == [1, 2] and held_counts(r) == (0, 0)
        r.stop()
        return

    wait_until(lambda: held_counts(r) == (1, 2) or None, what="the two events behind it held")
    assert r.rows(order) == []
    # events wait for an operator now, not for a retry: one alert says so
    assert metrics.ALERTS.labels(r.group.name, KEY_HELD)._value.get() == 1
    held = HeldKeys.of_group(r.group.name)
    [summary] = held.summary(r.engine)
    assert (summary["key"], summary["state"], summary["waiting"]) == (order, "dead-lettered", 2)
    assert summary["head_event_id"] == dead.headers["event_id"] and "the head keeps failing" in summary["reason"]
    if operator == "replays":  # fixed; the dead letter goes back into the retry chain
        broken["head"] = False
        replay = [(k, v) for k, v in dead.raw_headers if k not in RUNTIME_HEADERS]  # as `orderpipe dlt replay`
        r.producer.produce(r.retry_topic(1), key=dead.key.encode(), value=dead.value, headers=replay)
        r.flush()
        expected = [0, 1, 2]
    else:  # the dead letter is given up on (purged); the key is let go by hand
        assert held.release(r.engine, order) == "dead-lettered"
        expected = [1, 2]

    wait_until(lambda: len(r.rows(order)) == len(expected) or None, what="the held events, after the head")
    wait_until(lambda: held_counts(r) == (0, 0) or None, what="the key released")
    r.stop()
    assert seqs(r, order) == expected


def test_releasing_a_key_keeps_to_the_rate_limit(rig):
    """Held events run against the group's rate limit like any message: a key released with
    five events behind it does not run them all at once past the limit."""
    limit, order = 2, f"limited-{uuid.uuid4().hex[:8]}"
    clock = ManualClock()  # the limiter's windows move on when the test says so

    def head_fails_once(event, tried: int) -> None:
        if int(event.customer_id) == 0 and tried == 0:
            raise RetryableError("first try fails")

    r = rig(head_fails_once, retry_delays_s=(0.3,), limiter_clock=clock,
            controls=WorkerControls(rate_limit=RateLimit(limit, 1.0), breaker=None))
    for seq in range(6):
        r.produce_order(order, seq)
    r.flush()

    def throttled_s() -> float:
        return metrics.THROTTLED_SECONDS.labels(r.group.name)._value.get()

    per_window: list[int] = []
    while len(r.rows(order)) < 6:
        before, waited = len(r.rows(order)), throttled_s()
        # the loop uses up this window and then waits for the next one (or everything is done)
        wait_until(lambda: throttled_s() > waited or len(r.rows(order)) == 6 or None,
                   what="the window used up")
        per_window.append(len(r.rows(order)) - before)
        clock.advance(1.0)
        assert len(per_window) < 30, f"no progress: {per_window}"
    r.stop()
    assert seqs(r, order) == [0, 1, 2, 3, 4, 5]
    assert max(per_window) <= limit, f"handler runs per window: {per_window}; limit {limit}"
