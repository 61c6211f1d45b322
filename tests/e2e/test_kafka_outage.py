"""A whole Kafka outage: the only broker SIGKILLed for a minute while orders keep arriving.

The pipeline runs as `orderpipe up` starts it on a one-node Apache Kafka of its own, on SQLite.
Once orders flow, the node is SIGKILLed (its data folder stays) and started again 60 s later.
Meanwhile:
- the orders API keeps answering 202: an order is a row and an outbox row in the orders database,
  nothing there waits for Kafka;
- `/readyz` of the orders relay and of every consumer service answers 503 and names the broker
  problem (its `kafka` check fails, its `database` check passes);
- the relay's `orderpipe_outbox_backlog` gauge shows the orders waiting in the outbox within
  seconds (sampled every 5 s, also while the relay waits for acks that do not come).
When the broker is back, nothing is restarted by hand and no process may have exited: the relays,
the consumers and the order-status worker carry on by themselves, every order reaches its final
state with every effect once (the crash test's `check_outcomes`), and every consumer group's
committed offsets, the order-status worker's included, reach the end offsets.

Apache Kafka only (`--broker kafka`); about 3 minutes here (one of them the outage).
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from crash_harness import (
    BROKER_STACK_ENV,
    BrokerFault,
    BrokerRun,
    ChaosPlan,
    check_outcomes,
    check_services_ready,
    settings_with,
    wait_for_zero_lag,
)

from services.pipeline.stack import Stack

OUTAGE_S = 60.0
BEFORE_S = 15.0  # orders flow this long before the outage
# 100 s of orders: 15 s before the outage, a minute's worth during it, the rest after.
PLAN = ChaosPlan(orders=150, kills_per_process=0, rate=1.5)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

BACKLOG = re.compile(r'^orderpipe_outbox_backlog\{service="orders"\} (\S+)$', re.MULTILINE)


class OutageRun(BrokerRun):
    phase = "placing with the outage"
    title = "Kafka outage run"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unready: dict[str, dict] = {}  # process -> the first 503 body of its /readyz during the outage
        self.backlog = 0.0  # the largest orderpipe_outbox_backlog{service="orders"} seen during the outage
        self.backlog_after: float | None = None  # seconds into the outage when it first showed > 0
        self._outage_start = 0.0
        self.accepted_during = 0  # orders answered 202 while no broker was up

    def disrupt(self) -> None:
        self.wait_until("the pipeline working before the outage", self.pipeline_working, 120)
        self.wait_until("every relay and consumer ready before the outage",
                        lambda: all(_get(f"{url}/readyz")[0] == 200 for url in self.info.health.values()), 60)
        self.idle(max(0.0, BEFORE_S - self.elapsed()))
        nodes = tuple(n.node_id for n in self.kafka.nodes)
        fault = BrokerFault("outage", nodes, "every node SIGKILLed", self.elapsed())
        start, placed_before = time.monotonic(), len(self.report.placed)
        self._outage_start = start
        for node in nodes:
            self.kafka.kill(node)
        with ThreadPoolExecutor(len(self.info.health) + 1) as pool:
            while (left := OUTAGE_S - (time.monotonic() - start)) > 0:
                self._probe(pool)
                self.idle(min(1.0, max(0.0, left)))
        self.accepted_during = len(self.report.placed) - placed_before
        fault.down_s = time.monotonic() - start
        for node in nodes:
            self.kafka.restart(node)
        fault.back_s = time.monotonic() - start
        self.wait_until("every relay and consumer ready after the outage",
                        lambda: all(_get(f"{url}/readyz")[0] == 200 for url in self.info.health.values()), 120)
        fault.healed_s = time.monotonic() - start
        self.report.faults.append(fault)
        self.report.notes += [
            f"during the outage: {self.accepted_during} orders answered 202; /readyz 503 from "
            f"{', '.join(sorted(self.unready))}, e.g. {self.unready.get('orders-relay', {}).get('checks')}",
            f"relay's orderpipe_outbox_backlog: > 0 from {self.backlog_after or 0:.1f} s into the outage, "
            f"{self.backlog:.0f} at most",
        ]

    def _probe(self, pool: ThreadPoolExecutor) -> None:
        """One look at every /readyz and at the relay's backlog gauge, in parallel (a readiness
        check waits up to 2 s for the broker)."""
        names = [n for n in self.info.health if n not in self.unready]
        metrics = pool.submit(_get, f"{self.info.health['orders-relay']}/metrics")
        for name, (status, body) in zip(names, pool.map(lambda n: _get(f"{self.info.health[n]}/readyz"), names)):
            if status == 503:
                self.unready[name] = json.loads(body)
        status, body = metrics.result()
        if status == 200 and (found := BACKLOG.search(body)):
            self.backlog = max(self.backlog, float(found.group(1)))
            if self.backlog > 0 and self.backlog_after is None:
                self.backlog_after = time.monotonic() - self._outage_start


def _get(url: str) -> tuple[int, str]:
    try:
        r = httpx.get(url, timeout=10)
        return r.status_code, r.text
    except httpx.HTTPError as exc:
        return 0, repr(exc)


def test_a_minute_without_kafka_loses_nothing_and_needs_no_restart(kafka_cluster, tmp_path: Path, capsys):
    kafka = kafka_cluster(nodes=1)
    data_dir = tmp_path / "data"
    settings = settings_with(data_dir, {}, kafka.bootstrap_servers)
    stack = Stack(settings, data_dir=data_dir, extra_env=BROKER_STACK_ENV)
    with stack as info:
        run = OutageRun(stack, info, settings, PLAN, "sqlite", kafka)
        report = run.run()
        check_outcomes(report, settings, info)
        wait_for_zero_lag(kafka.bootstrap_servers, report)
        check_services_ready(info)
    with capsys.disabled():
        print("\n" + report.render())

    assert run.accepted_during >= OUTAGE_S * PLAN.rate * 0.8, "orders kept being accepted during the outage"
    assert set(run.unready) == set(info.health), "every relay and consumer reported itself not ready"
    for name, body in run.unready.items():
        checks = body["checks"]
        assert body["status"] == "unavailable" and checks["database"] == "ok", (name, body)
        assert checks["kafka"] != "ok" and "Failed to get metadata" in checks["kafka"], (name, body)
    # a relay whose flush timed out waits for the rows on their way instead of producing them again
    assert not any(report.republished.values()), f"events published twice: {dict(report.republished)}"
    # sampled every 5 s, also while the relay waits for acks that do not come
    assert run.backlog > 0 and run.backlog_after is not None and run.backlog_after < 20, \
        f"the relay's backlog gauge shows the orders waiting in the outbox ({run.backlog_after} s into the outage)"
