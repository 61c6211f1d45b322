"""The operator's story, on the whole pipeline as `orderpipe up` starts it.

1. The SMTP server works: the first orders complete, each with one e-mail.
2. The SMTP server goes down (nothing listens on its port any more): e-mail sends fail with
   connection refused, a retryable error; after the retries (short delays via
   ORDERPIPE_WORKERS) the OrderCreated events land in `orders.created.email.dlt`. Those orders
   do not complete.
3. The fault is fixed (the server is back), and `orderpipe dlt replay --group email --yes`
   puts the dead letters back into email's retry chain only.
4. Every order ends COMPLETED in the status view (GET /orders/{id}), and every order got
   exactly one e-mail, counted at the SMTP server by Message-ID.
5. Replaying the same messages again, this time to the original topic (every group sees them),
   sends no second e-mail and changes no order: the groups' inboxes know the event ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from services import registry
from services.pipeline.demo import sample_orders
from services.pipeline.stack import Stack
from services.email.smtp_sink import SmtpSink, read_maildir
from services.ops.audit import AuditLog
from services.ops.broker import OpsKafka
from services.ops.deadletters import dlt_topics
from services.ops.lag import consumer_lag
from services.ops.reprocess import Selection, collect
from services.tools.brokers import free_port
from services.runtime.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FIRST, SECOND = 3, 4


def place(client: httpx.Client, orders) -> dict[str, str]:
    """order id -> customer e-mail"""
    placed = {}
    for order in orders:
        r = client.post("/orders", json=order.body)
        r.raise_for_status()
        placed[r.json()["order_id"]] = order.body["customer_email"]
    return placed


def wait_until(condition, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)
    return value


def states(client: httpx.Client, order_ids) -> dict[str, str]:
    return {oid: client.get(f"/orders/{oid}").json().get("state") for oid in order_ids}


def test_dead_letters_are_replayed_once_the_fault_is_fixed(tmp_path: Path, stack_broker: str):
    data_dir, maildir, smtp_port = tmp_path / "data", tmp_path / "maildir", free_port()
    env = {
        "ORDERPIPE_SMTP_HOST": "127.0.0.1", "ORDERPIPE_SMTP_PORT": str(smtp_port),
        # short retries and no circuit breaker, so a failing send reaches the dead letters in seconds
        "ORDERPIPE_WORKERS": json.dumps({"email": {"retry_delays_s": [0.3, 0.3], "breaker_enabled": False}}),
    }
    samples = sample_orders(FIRST + SECOND, seed=5, reject_every=0)
    sink = SmtpSink(maildir, port=smtp_port).start()
    try:
        with Stack(Settings(data_dir=data_dir), data_dir=data_dir, broker=stack_broker, smtp_sink=False, extra_env=env) as info, \
                httpx.Client(base_url=info.api_url, timeout=10) as client:
            cli_env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": info.bootstrap_servers,
                       "ORDERPIPE_OPERATOR": "on-call", "COLUMNS": "200"}

            def cli(*args: str) -> str:
                done = subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=cli_env,
                                      capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, (args, done.stdout, done.stderr)
                return done.stdout

            kafka = OpsKafka(Settings(KAFKA_BOOTSTRAP_SERVERS=info.bootstrap_servers))
            audit = AuditLog(kafka)
            email_dlt = Selection(dlt_topics([registry.group("email")]))

            # 1. the SMTP server works
            first = place(client, samples[:FIRST])
            wait_until(lambda: set(states(client, first).values()) == {"COMPLETED"}, "the first orders")

            # 2. it goes down: the e-mails of the next orders end as dead letters
            sink.stop()
            second = place(client, samples[FIRST:])
            dead = wait_until(lambda: (letters := collect(kafka, audit, email_dlt).letters) and
                              len(letters) >= SECOND and letters, "the dead letters")
            assert sorted(dl.key_text for dl, _ in dead) == sorted(second)
            assert {dl.exception_type for dl, _ in dead} == {"services.email.mailer.MailDeliveryError"}
            assert "COMPLETED" not in states(client, second).values()
            listed = cli("dlt", "list")
            assert "email" in listed and "MailDeliveryError" in listed and f"{SECOND} in total" in listed

            # 3. the fault is fixed; the operator replays email's dead letters
            sink = SmtpSink(maildir, port=smtp_port).start()
            out = cli("dlt", "replay", "--group", "email", "--yes")
            assert f"replayed {SECOND} of {SECOND}" in out

            # 4. every order completes, and every order has exactly one e-mail
            placed = {**first, **second}
            wait_until(lambda: set(states(client, placed).values()) == {"COMPLETED"}, "every order COMPLETED")
            mails = read_maildir(maildir)
            assert set(Counter(m["Message-ID"] for m in mails).values()) == {1}
            assert sorted(m["To"] for m in mails) == sorted(placed.values())
            assert cli("dlt", "list", "--json") == ""

            # 5. the same messages again, to every group: nothing happens twice
            out = cli("dlt", "replay", "--group", "email", "--include-handled", "--to", "original", "--yes")
            assert f"replayed {SECOND} of {SECOND}" in out

            def settled():
                rows = consumer_lag(kafka, audit, [registry.group(g) for g in ("inventory", "email", "invoice", "analytics")])
                return all(r.lag == 0 for r in rows)

            wait_until(settled, "every group to read the replayed events")
            assert "email: lag 0 on input, 0 in retry topics, 0 unhandled dead letters" in cli("lag")
            assert len(read_maildir(maildir)) == len(placed), "no second e-mail"
            assert set(states(client, placed).values()) == {"COMPLETED"}

            runs = [json.loads(line) for line in cli("dlt", "audit", "--json").splitlines()]
            assert [(r["action"], r["count"], r["outcome"], r["user"]) for r in runs] == [
                ("replay", SECOND, "completed", "on-call"), ("replay", SECOND, "completed", "on-call")]
            kafka.close()
    finally:
        sink.stop()
