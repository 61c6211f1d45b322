"""Crash proof: SIGKILL the relay and every consumer while orders flow; nothing is lost or done twice.

The whole pipeline runs as `orderpipe up` starts it (real broker, real SMTP sink), on SQLite and
on PostgreSQL. While a few hundred orders flow, the orders relay and the inventory, email,
invoice and analytics services are each SIGKILLed several times at random moments and restarted
by the supervisor; a fifth of the orders are cancelled meanwhile. Then, for every order: its
final state; one invoice per reserved order and none for rejected ones, a credit note for each
cancelled order that was invoiced, both numbered without gaps; one e-mail per order by
Message-ID and one cancellation mail per cancelled order (resends after a crash between the
SMTP accept and the commit are counted and carry the same Message-ID); stock = initial -
reserved by the orders that stayed placed; analytics totals = those orders. And bounds on what a crash may
cost: only mails a kill caught in flight are resent, every outbox is published, no dead letter,
every group's committed offsets at the end of its inputs and retry topics. See `crash_harness.py`.

`make chaos` runs the same test longer (ORDERPIPE_CHAOS_ORDERS / _KILLS / _RATE / _SEED).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from crash_harness import (
    STACK_ENV,
    VICTIMS,
    ChaosPlan,
    CrashRun,
    check_outcomes,
    service_databases,
    settings_with,
    wait_for_zero_lag,
)

from services.pipeline.stack import Stack

PLAN = ChaosPlan.from_env()

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(PLAN.timeout_s)]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_sigkilled_workers_lose_nothing_and_do_nothing_twice(database: str, tmp_path: Path, request, capsys,
                                                            stack_broker: str):
    postgres_url = request.getfixturevalue("postgres_url") if database == "postgresql" else None
    data_dir = tmp_path / "data"
    with service_databases(database, postgres_url) as database_env:
        settings = settings_with(data_dir, database_env)
        stack = Stack(settings, data_dir=data_dir, broker=stack_broker, extra_env={**STACK_ENV, **database_env})
        with stack as info:
            report = CrashRun(stack, info, settings, PLAN, database).run()
            check_outcomes(report, settings, info)
            wait_for_zero_lag(info.bootstrap_servers, report)  # retry topics drained, no consumer behind
    with capsys.disabled():
        print("\n" + report.render())
    killed = {k.victim for k in report.kills}
    assert killed == set(VICTIMS), f"every victim must have been killed at least once, got {sorted(killed)}"
