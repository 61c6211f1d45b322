"""What a worker reports about itself (services/runtime/worker_state.py), on the real broker and
both databases, as the operators see it: the worker_state row, `orderpipe workers` and
`orderpipe alerts`, the console's overview (Open alerts) and consumer-groups page (paused
partitions).

A fault-injecting handler fails while its dependency is down: the circuit breaker opens, every
partition is paused for it and the breaker and the retried messages are open alerts. When the
dependency is back and the breaker's probe succeeds, the breaker closes; the retried messages
then wait for their due time (their retry partition paused for that reason), run, and nothing is
paused or open any more. A clean stop deletes the row. The loop's and the breaker's clocks are
moved by the test (`ManualClock`), so nothing depends on the machine's speed.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from conftest import settings_for
from console_server import logged_in, serve_console, users
from reading import wait_until
from services import registry
from services.cli.main import app
from services.ops.workers import LIVE, read_workers
from services.runtime.alerts import BREAKER_OPENED, RETRYING
from services.runtime.circuit import BreakerConfig
from services.runtime.controls import WorkerControls
from services.runtime.errors import RetryableError
from services.runtime.events import OrderCreated
from services.runtime.worker_state import BREAKER_OPEN, RETRY_ALERT_GRACE_S, RETRY_NOT_DUE
from test_console_groups import row
from test_retries import ManualClock, rig, sqlite_url  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

RETRY_DELAY_S = 30.0  # on the loop's clock, which stands still until the test moves it


def test_a_tripped_breaker_and_waiting_retries_are_reported_until_they_are_over(
        rig, database_url, kafka_bootstrap, monkeypatch, tmp_path):  # noqa: F811
    down = threading.Event()
    down.set()

    def smtp(event: OrderCreated, tried: int) -> None:
        if down.is_set():
            raise RetryableError("SMTP server unreachable")

    loop_clock, breaker_clock = ManualClock(time.time()), ManualClock()
    r = rig(smtp, retry_delays_s=(RETRY_DELAY_S,), database_url=database_url, clock=loop_clock,
            breaker_clock=breaker_clock,
            controls=WorkerControls(alert_after_attempts=1,
                                    breaker=BreakerConfig(window=3, failure_ratio=1.0, cooldown_s=1.0)))
    group = r.group.name
    monkeypatch.setattr(registry, "GROUPS", (r.group,))
    settings = settings_for(kafka_bootstrap, **{f"{group}_database_url": database_url})
    cli_env = {"ORDERPIPE_DATA_DIR": str(tmp_path), f"ORDERPIPE_{group.upper()}_DATABASE_URL": database_url,
               "COLUMNS": "250"}
    sent = [r.produce_order() for _ in range(5)]
    r.flush()

    def report():
        view = read_workers(settings, [group])
        assert not view.problems, view.problems
        return view

    # -- the dependency is down: the breaker opens and holds every partition ------------------
    def tripped():
        view = report()
        kinds = {a.kind for a in view.alerts}
        paused = {(p.topic, p.partition): p.reason for p in view.paused(group)}
        return view if (BREAKER_OPENED in kinds and RETRYING in kinds
                        and paused.get((r.source, 0)) == BREAKER_OPEN) else None

    view = wait_until(tripped, what="the open breaker and its paused partitions reported")
    [worker] = view.workers
    assert (worker.status, worker.breaker) == (LIVE, "open")
    assert {p.reason for p in worker.paused} == {BREAKER_OPEN}
    assert {(p.topic, p.partition) for p in worker.paused} >= {(r.source, 0), (r.retry_topic(1), 0)}
    breaker_alert = next(a for a in view.alerts if a.kind == BREAKER_OPENED)
    assert breaker_alert.group == group and "circuit breaker opened: 3 of the last 3 attempts failed" in (
        breaker_alert.message)
    retrying = [a for a in view.alerts if a.kind == RETRYING]
    assert len(retrying) == 3 and all("attempt 1 failed (SMTP server unreachable)" in a.message for a in retrying)
    with r.engine.connect() as conn:  # the row as the worker wrote it
        [stored] = conn.execute(select(r.service.worker_state)).mappings().all()
    assert (stored["group_name"], stored["breaker"]) == (group, "open")
    assert {a["kind"] for a in stored["alerts"]} == {BREAKER_OPENED, RETRYING}

    cli = CliRunner()
    workers_out = cli.invoke(app, ["workers", "--group", group, "--json"], env=cli_env)
    assert workers_out.exit_code == 0, workers_out.output
    [listed] = [json.loads(line) for line in workers_out.stdout.splitlines()]
    assert (listed["status"], listed["breaker"]) == (LIVE, "open")
    assert {(p["topic"], p["partition"], p["reason"]) for p in listed["paused"]} >= {(r.source, 0, BREAKER_OPEN)}
    alerts_out = cli.invoke(app, ["alerts", "--json"], env=cli_env)
    assert alerts_out.exit_code == 0, alerts_out.output
    assert sorted(json.loads(line)["kind"] for line in alerts_out.stdout.splitlines()) == [
        BREAKER_OPENED, RETRYING, RETRYING, RETRYING]
    table = cli.invoke(app, ["workers"], env=cli_env)
    assert table.exit_code == 0 and f"{r.source}[0]: {BREAKER_OPEN}" in table.stdout, table.output

    with serve_console(settings, users(vic=("viewer", "pw"))) as url, logged_in(url, "vic", "pw") as browser:
        overview = browser.get("/").text
        assert "<h2>Open alerts</h2>" in overview
        assert row(overview, BREAKER_OPENED, "1") and row(overview, RETRYING, "3")
        assert "circuit breaker opened: 3 of the last 3 attempts failed" in overview
        assert f'<a href="/groups#{group}">{group}</a>' in overview
        assert browser.get("/api/overview").json()["alerts"][0]["group"] == group
        groups = browser.get("/groups").text
        assert row(groups, r.source, "0", BREAKER_OPEN), groups
        assert row(groups, worker.name, LIVE, "open")

        # -- the dependency is back: the probe succeeds, the breaker closes ---------------------
        down.clear()
        breaker_clock.advance(1.0)

        def closed_and_waiting():
            view = report()
            paused = [(p.topic, p.partition, p.reason) for p in view.paused(group)]
            return view if (view.workers[0].breaker == "closed" and BREAKER_OPENED not in {a.kind for a in view.alerts}
                            and paused == [(r.retry_topic(1), 0, RETRY_NOT_DUE)]) else None

        view = wait_until(closed_and_waiting, what="the breaker closed, the retries waiting for their due time")
        [waiting] = view.paused(group)
        assert waiting.until is not None and waiting.until.timestamp() >= loop_clock() + RETRY_DELAY_S - 1
        groups = browser.get("/groups").text
        assert row(groups, r.retry_topic(1), "0", RETRY_NOT_DUE, waiting.since.strftime("%H:%M:%S"),
                   waiting.until.strftime("%H:%M:%S")), groups
        assert "circuit breaker open" not in groups

        # -- the retries come due and succeed: nothing is paused or open any more -----------------
        loop_clock.advance(RETRY_DELAY_S + RETRY_ALERT_GRACE_S + 1)
        wait_until(lambda: len(r.rows()) == len(sent), what="every order handled")

        def over():
            view = report()
            return view if not view.alerts and not view.paused(group) else None

        view = wait_until(over, what="nothing paused or open")
        assert view.workers[0].breaker == "closed"
        overview = browser.get("/").text
        assert "no open alert" in overview and BREAKER_OPENED not in overview
        groups = browser.get("/groups").text
        assert "none paused" in groups and row(groups, worker.name, LIVE, "closed")
    assert cli.invoke(app, ["alerts"], env=cli_env).stdout.strip() == "no open alert"

    r.stop()  # a clean stop deletes the worker's row
    assert report().workers == []
    assert "no worker reports its state" in cli.invoke(app, ["workers"], env=cli_env).stdout
