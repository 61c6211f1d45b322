"""The parts of the workers' reports without a broker (services/runtime/worker_state.py,
services/ops/workers.py): why a partition is paused, which alerts are open and for how long,
and what the reader makes of rows (stale, forgotten, keys held behind a dead letter), on a SQLite
database migrated as a consumer service migrates it."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
from sqlalchemy import MetaData, select

from services.email.service import SERVICE as EMAIL
from services.ops.workers import LIVE, STALE, WORKER_STALE, read_workers
from services.runtime.alerts import BREAKER_CLOSED, BREAKER_OPENED, DEAD_LETTERED, KEY_HELD, RETRYING, Alerter
from services.runtime.db import make_engine, utcnow, worker_state_table
from services.runtime.held import HeldKeys
from services.runtime.migrate import upgrade_database
from services.runtime.settings import Settings
from services.runtime.worker_state import (
    BREAKER_OPEN, FORGET_AFTER_S, MAX_RETRYING_LISTED, RATE_LIMITED, RETRY_ALERT_GRACE_S, RETRY_NOT_DUE,
    STALE_AFTER_S, UNEXPLAINED, OpenAlert, OpenAlerts, PausedPartition, Snapshot, WorkerState, pause_reasons,
)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_reason_that_holds_every_partition_wins_over_a_retrys_due_time():
    paused, not_due = {("in", 0), ("in.retry.1", 0)}, {("in.retry.1", 0): 42.0}
    assert pause_reasons(paused, not_due, "") == {("in", 0): (UNEXPLAINED, None), ("in.retry.1", 0): (RETRY_NOT_DUE, 42.0)}
    assert pause_reasons(paused, not_due, "circuit breaker") == {
        ("in", 0): (BREAKER_OPEN, None), ("in.retry.1", 0): (BREAKER_OPEN, None)}
    assert set(pause_reasons(paused, not_due, "rate limit").values()) == {(RATE_LIMITED, None)}


def test_the_breaker_alert_is_open_from_opening_to_closing_and_keeps_its_first_since():
    alerts = OpenAlerts(Clock())
    alerts.on_alert(BREAKER_OPENED, "opened: 5 of 5 failed", {})
    [first] = alerts.current()
    alerts.on_alert(BREAKER_OPENED, "opened: the probe failed", {})  # after a failed probe
    [again] = alerts.current()
    assert (again.kind, again.since, again.message) == (BREAKER_OPENED, first.since, "opened: the probe failed")
    alerts.on_alert(BREAKER_CLOSED, "closed", {})
    assert alerts.current() == ()


def test_a_retrying_message_is_open_until_its_next_attempt_is_due_or_it_is_dead_lettered():
    clock = Clock()
    alerts = OpenAlerts(clock)
    details = {"order_id": "o-1", "event_id": "e-1", "attempt": 3, "error": "421 try later"}
    alerts.on_alert(RETRYING, "attempt 3 failed", {**details, "due_at": f"{clock.now + 60:.3f}"})
    [open_] = alerts.current()
    assert "order o-1 (event e-1): attempt 3 failed (421 try later); next attempt due" in open_.message
    clock.now += 60 + RETRY_ALERT_GRACE_S - 1
    assert len(alerts.current()) == 1
    clock.now += 1
    assert alerts.current() == (), "its next attempt was due a grace ago and did not fail again"

    alerts.on_alert(RETRYING, "attempt 3 failed", {**details, "due_at": f"{clock.now + 60:.3f}"})
    alerts.on_alert(DEAD_LETTERED, "dead-lettered", {"event_id": "e-1"})
    assert alerts.current() == ()


def test_many_retrying_messages_are_listed_up_to_a_limit_and_counted_beyond():
    clock = Clock()
    alerts = OpenAlerts(clock)
    for n in range(MAX_RETRYING_LISTED + 7):
        alerts.on_alert(RETRYING, "failed", {"event_id": f"e-{n}", "due_at": f"{clock.now + 60:.3f}"})
    listed = alerts.current()
    assert len(listed) == MAX_RETRYING_LISTED + 1 and listed[-1].message == "and 7 more messages retrying"


def test_an_alert_listener_that_fails_never_breaks_the_alert(caplog):
    alerter = Alerter("g")
    seen = []
    alerter.listeners += [lambda *a: 1 / 0, lambda kind, message, details: seen.append((kind, details))]
    with caplog.at_level(logging.ERROR):
        alerter.alert(RETRYING, "attempt 3 failed", attempt=3)
    assert seen == [(RETRYING, {"attempt": 3})] and "alert listener failed" in caplog.text


@pytest.fixture
def email_db(tmp_path):
    url = f"sqlite:///{tmp_path / 'email.db'}"
    engine = make_engine(url)
    upgrade_database(engine, EMAIL)
    yield engine, Settings(email_database_url=url, data_dir=tmp_path)
    engine.dispose()


def test_the_reader_marks_stale_rows_derives_held_key_alerts_and_rows_long_gone_are_forgotten(email_db):
    engine, settings = email_db
    table = worker_state_table(MetaData())
    now = utcnow()
    live, gone, forgotten = (WorkerState(engine, table, "email", Clock()) for _ in range(3))
    breaker = OpenAlert(BREAKER_OPENED, now, "circuit breaker opened")
    paused = (PausedPartition("orders.created", 0, BREAKER_OPEN, now),)
    forgotten.write(Snapshot("open", paused, (breaker,)), now - timedelta(seconds=FORGET_AFTER_S + 60))
    gone.write(Snapshot("open", paused, (breaker,)), now - timedelta(seconds=STALE_AFTER_S + 5))
    live.write(Snapshot("open", paused, (breaker,)), now)  # forgets the row gone for an hour
    keys = HeldKeys.of_group("email")
    with engine.begin() as conn:
        keys.start(conn, "order-7", "head-7", "MailRejected", "orders.created", 0, now)
        keys.head_settled(conn, "order-7", "dead", "not retryable", now)

    view = read_workers(settings, ["email"], now=now)

    assert not view.problems
    assert {(w.instance, w.status) for w in view.workers} == {(live.instance, LIVE), (gone.instance, STALE)}
    assert sorted(p.status for p in view.paused("email")) == sorted([STALE, LIVE])
    kinds = [(a.kind, a.worker) for a in view.alerts]
    assert sorted(kinds, key=str) == sorted([(WORKER_STALE, f"{gone.host} pid {gone.pid}"),
                                             (BREAKER_OPENED, f"{live.host} pid {live.pid}"), (KEY_HELD, None)], key=str)
    stale = next(a for a in view.alerts if a.kind == WORKER_STALE)
    assert "stale (worker gone?)" in stale.message and "no heartbeat for 35 s" in stale.message
    held = next(a for a in view.alerts if a.kind == KEY_HELD)
    assert "key order-7: 0 event(s) wait behind its dead-lettered event head-7" in held.message
    assert view.alerts_per_kind() == {BREAKER_OPENED: 1, KEY_HELD: 1, WORKER_STALE: 1}


def test_a_database_without_the_table_is_one_problem_and_a_failing_write_never_raises(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'email.db'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE unrelated (id INTEGER)")
    view = read_workers(Settings(email_database_url=url, data_dir=tmp_path), ["email"])
    assert view.workers == [] and len(view.problems) == 1
    assert "email: cannot read its worker state (no such table: worker_state); run `orderpipe db upgrade email`" in (
        view.problems[0])

    state = WorkerState(engine, worker_state_table(MetaData()), "email", Clock())
    with caplog.at_level(logging.WARNING):
        state._write_now()
        state._write_now()
    assert caplog.text.count("could not write this worker's state") == 1, "logged once while it keeps failing"
    engine.dispose()


def test_the_writer_thread_writes_at_start_and_on_change_and_a_clean_stop_deletes_the_row(email_db):
    engine, settings = email_db
    table = worker_state_table(MetaData())
    state = WorkerState(engine, table, "email", Clock())

    def rows():
        with engine.connect() as conn:
            return conn.execute(select(table)).mappings().all()

    def wait_for(condition, what: str):
        deadline = time.monotonic() + 30
        while not (value := condition()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)
        return value

    state.start()
    try:
        wait_for(rows, "the first row")
        state.observe({("orders.created", 1)}, {}, "rate limit", "closed")
        [row] = wait_for(lambda: [r for r in rows() if r["paused"]], "the change written")
        assert [(p["topic"], p["partition"], p["reason"]) for p in row["paused"]] == [("orders.created", 1, RATE_LIMITED)]
        assert row["breaker"] == "closed" and row["instance"] == state.instance
    finally:
        state.stop()
    assert rows() == []
