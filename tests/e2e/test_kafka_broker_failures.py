"""Broker failures: nodes of a three-node Apache Kafka SIGKILLed and restarted, and one frozen past
the broker session timeout, while orders flow; nothing is lost or done twice, no consumer is stuck.

The whole pipeline runs as `orderpipe up` starts it, on a cluster of its own (replication 3,
min.insync.replicas 2, broker session timeout 6 s), on SQLite. While orders are placed through
the API, one node at a time is SIGKILLed and started again a few seconds later: first the leader
of most orders.created partitions, then a consumer group's coordinator, alternating; halfway
through, the input leader is frozen (SIGSTOP: open sockets, no answers) until the cluster has
fenced it (broker session timeout) and moved its leaderships, then thawed. Each fault waits
until the cluster is whole again (see `crash_harness.BrokerChaosRun`). Then the crash test's checks (`check_outcomes`): every order in
its final state, one mail per order by Message-ID, one invoice per reserved order, stock and
rollups exact, one event per order and step in the log, no process exited; and every consumer
group's committed offsets, the order-status worker's included, at the end offsets.

Apache Kafka only (`--broker kafka`); about 3 minutes here. `make chaos-kafka` runs it longer
(ORDERPIPE_CHAOS_ORDERS / _KILLS / _RATE / _SEED; _KILLS counts broker SIGKILLs).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from crash_harness import (
    BROKER_STACK_ENV,
    BrokerChaosRun,
    ChaosPlan,
    check_outcomes,
    check_services_ready,
    settings_with,
    wait_for_zero_lag,
)

from services.pipeline.stack import Stack

# About 75 s of orders: long enough for three kills and a freeze, each followed by a recovery.
PLAN = ChaosPlan.from_env(orders=150, kills_per_process=3, rate=2.0)
TIMEOUT_S = int(300 + 2 * PLAN.placing_s + 60 * (PLAN.kills_per_process + 1) + 300)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(TIMEOUT_S)]


def test_broker_kills_and_a_freeze_lose_nothing_and_do_nothing_twice(kafka_cluster, tmp_path: Path, capsys):
    kafka = kafka_cluster(nodes=3)
    data_dir = tmp_path / "data"
    settings = settings_with(data_dir, {}, kafka.bootstrap_servers)
    stack = Stack(settings, data_dir=data_dir, extra_env=BROKER_STACK_ENV)
    with stack as info:
        report = BrokerChaosRun(stack, info, settings, PLAN, "sqlite", kafka).run()
        check_outcomes(report, settings, info)
        wait_for_zero_lag(kafka.bootstrap_servers, report)
        check_services_ready(info)
    with capsys.disabled():
        print("\n" + report.render())
    assert Counter(f.kind for f in report.faults) == {"SIGKILL": PLAN.kills_per_process, "SIGSTOP": 1}
    assert report.faults[0].why.startswith("leader of"), "the first victim leads the input partitions"
