"""README promises about alerts and the order-status SLA that no other test pins down.

- Alerts (`services/runtime/alerts.py`, README `ORDERPIPE_ALERT_WEBHOOK_URL`): webhook POSTs run
  "from a background thread; a failing webhook never affects processing" and come from a bounded
  queue: when it is full, alerts are still logged and counted but not posted. A failed POST is
  best effort: it is not retried.
- SLA (README `ORDERPIPE_STATUS_SLA_S`, `ORDERPIPE_STATUS_SLA_CHECK_INTERVAL_S`): 300 s by
  default; the check interval is SLA / 10, from 0.5 to 30 s.

Waits are on events and threads, each with a generous guard so that a broken promise fails the
test instead of hanging it; nothing asserts how long anything took.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter

import pytest

from services.runtime import metrics
from services.runtime.alerts import DEAD_LETTERED, Alerter
from services.runtime.settings import Settings
from streams.order_status.__main__ import parse_args
from streams.order_status.sla import DEFAULT_SLA_S, default_sla_check_interval

GUARD_S = 30.0  # only ever reached when a promise is broken (something blocks or never happens)
QUEUE_FULL = "alert webhook queue full; alert not posted"
WEBHOOK_FAILED = "alert webhook failed"


def alerts_counted(group: str, kind: str = DEAD_LETTERED) -> float:
    return metrics.ALERTS.labels(group, kind)._value.get()


def messages(caplog, text: str | None = None) -> list[str]:
    found = [r.getMessage() for r in caplog.records if r.name == "services.runtime.alerts"]
    return found if text is None else [m for m in found if m == text]


# -- 3. the bounded alert queue -------------------------------------------------------------------


def test_a_blocked_webhook_never_blocks_alerts_and_a_full_queue_only_drops_the_post(caplog):
    """Promise: webhook POSTs run on a background thread from a bounded queue; a slow webhook never
    delays the caller, and when the queue is full the alert is still logged and counted in
    `orderpipe_alerts_total`, only not posted (the drop itself is logged). At most the queue plus
    the one POST in flight are ever posted."""
    queue_size, overflow = 3, 4
    group = f"g-bounded-{uuid.uuid4().hex[:8]}"
    gate, holding = threading.Event(), threading.Event()
    posted: list[int] = []

    def blocked_post(url: str, payload: dict) -> None:
        posted.append(payload["n"])
        holding.set()
        gate.wait()  # the webhook hangs until the test lets it go

    alerter = Alerter(group, "http://127.0.0.1:9/hook", post=blocked_post, queue_size=queue_size)
    total = 1 + queue_size + overflow
    with caplog.at_level(logging.WARNING, logger="services.runtime.alerts"):
        try:
            alerter.alert(DEAD_LETTERED, "dead letter 0", n=0)
            assert holding.wait(GUARD_S), "the webhook thread never took the first alert"

            # The webhook thread now hangs in alert 0's POST: the queue takes `queue_size` more,
            # the rest overflow. Sent from a thread of their own, so a blocking alert() fails the
            # test (the thread is still alive while the webhook is held) instead of hanging it.
            sender = threading.Thread(
                target=lambda: [alerter.alert(DEAD_LETTERED, f"dead letter {n}", n=n) for n in range(1, total)],
                daemon=True)
            sender.start()
            sender.join(GUARD_S)
            assert not sender.is_alive(), "alert() waited for the blocked webhook"
            assert not gate.is_set()

            assert posted == [0], "only the first alert can have reached the blocked webhook"
            assert alerts_counted(group) == total, "every alert is counted, posted or not"
            assert [m for m in messages(caplog) if m.startswith("dead letter ")] == [f"dead letter {n}" for n in range(total)]
            assert len(messages(caplog, QUEUE_FULL)) == overflow, "each dropped POST is logged"
            dropped = [r for r in caplog.records if r.getMessage() == QUEUE_FULL]
            assert {r.group for r in dropped} == {group} and {r.alert for r in dropped} == {DEAD_LETTERED}
        finally:
            gate.set()
        thread = alerter._thread
        alerter.close(timeout=GUARD_S)
    assert thread is not None and not thread.is_alive(), "close() did not stop the webhook thread"
    assert len(posted) <= queue_size + 1
    # close() posts what was queued: the one in flight, then the queue in order.
    assert posted == list(range(queue_size + 1))


# -- 4. a failing webhook POST is never retried ----------------------------------------------------


def test_a_failing_webhook_post_is_made_once_per_alert_and_never_retried(caplog):
    """Promise: the webhook is best effort ("a failing webhook never affects processing"): a POST
    that fails is logged and dropped, never retried. After close() exactly one POST was made per
    alert, and every alert is still logged and counted."""
    group = f"g-noretry-{uuid.uuid4().hex[:8]}"
    calls: list[int] = []

    def failing_post(url: str, payload: dict) -> None:
        calls.append(payload["n"])
        raise ConnectionRefusedError("webhook down")

    alerter = Alerter(group, "http://127.0.0.1:9/hook", post=failing_post)
    n_alerts = 5
    with caplog.at_level(logging.WARNING, logger="services.runtime.alerts"):
        for n in range(n_alerts):
            alerter.alert(DEAD_LETTERED, f"dead letter {n}", n=n)
        thread = alerter._thread
        alerter.close(timeout=GUARD_S)
    assert thread is not None and not thread.is_alive(), "close() did not stop the webhook thread"
    assert Counter(calls) == {n: 1 for n in range(n_alerts)}
    assert calls == list(range(n_alerts))
    assert len(messages(caplog, WEBHOOK_FAILED)) == n_alerts
    assert alerts_counted(group) == n_alerts


# -- 5. the order-status worker's SLA defaults -----------------------------------------------------


@pytest.fixture
def clean_sla_env(monkeypatch) -> pytest.MonkeyPatch:
    for name in ("ORDERPIPE_STATUS_SLA_S", "ORDERPIPE_STATUS_SLA_CHECK_INTERVAL_S", "ORDERPIPE_STATUS_URL"):
        monkeypatch.delenv(name, raising=False)
    # `--bootstrap-servers` is required without it; the SLA options do not depend on it.
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    return monkeypatch


def test_the_order_status_worker_defaults_to_a_300_s_sla_and_no_fixed_check_interval(clean_sla_env):
    """Promise (README `ORDERPIPE_STATUS_SLA_S`, default 300; `ORDERPIPE_STATUS_SLA_CHECK_INTERVAL_S`,
    default SLA / 10): with nothing set, the worker's SLA is 300 s and no check interval is fixed,
    so the SLA-derived default applies."""
    args = parse_args([], Settings())
    assert args.sla_s == 300.0 == DEFAULT_SLA_S
    assert args.sla_check_interval_s is None
    assert default_sla_check_interval(args.sla_s) == 30.0


def test_the_sla_settings_come_from_the_environment(clean_sla_env):
    """Promise: `ORDERPIPE_STATUS_SLA_S` and `ORDERPIPE_STATUS_SLA_CHECK_INTERVAL_S` set the
    worker's defaults; `--sla-s` and `--sla-check-interval-s` override them."""
    clean_sla_env.setenv("ORDERPIPE_STATUS_SLA_S", "100")
    clean_sla_env.setenv("ORDERPIPE_STATUS_SLA_CHECK_INTERVAL_S", "2.5")
    args = parse_args([], Settings())
    assert (args.sla_s, args.sla_check_interval_s) == (100.0, 2.5)
    args = parse_args(["--sla-s", "60", "--sla-check-interval-s", "1"], Settings())
    assert (args.sla_s, args.sla_check_interval_s) == (60.0, 1.0)


@pytest.mark.parametrize(("sla_s", "interval_s"), [
    (300, 30.0),    # the default SLA: a tenth is exactly the upper bound
    (100, 10.0),    # a tenth
    (3, 0.5),       # a tenth would be 0.3: clamped up to 0.5
    (5, 0.5),       # exactly the lower bound
    (1000, 30.0),   # a tenth would be 100: clamped down to 30
])
def test_the_default_sla_check_interval_is_a_tenth_of_the_sla_within_half_a_second_and_30_s(sla_s, interval_s):
    """Promise (README `ORDERPIPE_STATUS_SLA_CHECK_INTERVAL_S`): default SLA / 10, 0.5 to 30 s."""
    assert default_sla_check_interval(sla_s) == pytest.approx(interval_s)
