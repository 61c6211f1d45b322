"""The order-status worker on a real broker: events in, statuses out (HTTP and orders.status)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from services.runtime.admin import ensure_topics
from services.runtime.broker import EmbeddedBroker, free_port
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.envelope import EVENT_ID, Envelope, headers_to_dict, new_event_id
from services.runtime.kafka import PARTITIONER
from services.runtime.supervisor import die_with_parent
from services.runtime.topology import DEFAULT_PARTITIONS, ORDERS_STATUS, TOPIC_FOR_EVENT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
FINAL = {"COMPLETED", "FAILED"}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as b:
        ensure_topics({"bootstrap.servers": b.bootstrap_servers})
        yield b


class Worker:
    """`python -m streams.order_status` as a child process that cannot outlive the test."""

    def __init__(self, bootstrap: str, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.order_status", "--bootstrap-servers", bootstrap,
             "--data-dir", str(data_dir), "--web-port", str(self.port), "--loglevel", "info"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent,
        )

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def start_worker(broker: EmbeddedBroker, tmp_path: Path) -> Iterator:
    started: list[Worker] = []

    def start(data_dir: Path | None = None) -> Worker:
        data_dir = data_dir or tmp_path / f"order-status-{len(started)}"
        worker = Worker(broker.bootstrap_servers, data_dir, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:  # all at once: a worker left alone would rejoin the group first
        worker.terminate()
    for worker in started:
        worker.stop()


def order_events(order_id: str, rejected: bool) -> list[tuple[str, dict]]:
    now = datetime.now(UTC)
    events = [
        ("OrderCreated", {"order_id": order_id, "customer_id": "c-1", "customer_email": "c@example.com",
                          "currency": "EUR", "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": Decimal("5.00")}],
                          "total": Decimal("10.00"), "created_at": now}),
        ("ConfirmationEmailSent", {"order_id": order_id, "message_id": f"<{order_id}@orderpipe>",
                                   "recipient": "c@example.com", "sent_at": now}),
        ("OrderRecorded", {"order_id": order_id, "units": 2, "revenue": Decimal("10.00"), "currency": "EUR",
                           "recorded_at": now}),
    ]
    if rejected:
        events.append(("StockRejected", {"order_id": order_id, "reason": "out of stock: SKU-1",
                                         "missing": [{"sku": "SKU-1", "requested": 2, "available": 0}],
                                         "rejected_at": now}))
    else:
        events += [
            ("StockReserved", {"order_id": order_id, "lines": [{"sku": "SKU-1", "quantity": 2}], "reserved_at": now}),
            ("InvoiceIssued", {"order_id": order_id, "invoice_number": f"INV-{order_id[:8]}", "total": Decimal("10.00"),
                               "currency": "EUR", "pdf_path": "x.pdf", "issued_at": now}),
        ]
    return events


def produce_orders(bootstrap: str, orders: dict[str, bool], codec: Codec) -> None:
    """Every event of every order, shuffled across topics, some delivered twice, plus one garbage message."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": PARTITIONER, "enable.idempotence": True})
    messages = []
    for order_id, rejected in orders.items():
        for event_type, record in order_events(order_id, rejected):
            headers = Envelope(new_event_id(), event_type, 1, order_id).to_headers()
            messages.append((TOPIC_FOR_EVENT[event_type], order_id, codec.encode(event_type, record), headers))
    rng = random.Random(7)
    rng.shuffle(messages)  # events of one order on different topics have no order anyway
    messages += rng.sample(messages, 10)  # at-least-once upstream: same event id again
    garbage_key = next(iter(orders))
    messages.insert(len(messages) // 2, ("orders.created", garbage_key, b"not avro at all", []))
    for topic, key, value, headers in messages:
        producer.produce(topic, key=key.encode(), value=value, headers=headers)
    assert producer.flush(30) == 0
    producer.close()  # Tansu waits for open connections when it stops


def settled(status: dict) -> bool:
    # FAILED comes with the rejection, possibly before the e-mail and analytics steps report.
    return status["state"] in FINAL and all(step["state"] != "pending" for step in status["steps"].values())


def wait_final(worker: Worker, order_ids: list[str], deadline_s: float = 60.0) -> dict[str, dict]:
    final: dict[str, dict] = {}
    last: dict[str, object] = {}
    deadline = time.monotonic() + deadline_s
    with httpx.Client(base_url=worker.url, timeout=5.0) as http:
        while len(final) < len(order_ids) and time.monotonic() < deadline:
            assert worker.proc.poll() is None, f"worker exited:\n{worker.log_tail()}"
            for order_id in order_ids:
                if order_id in final:
                    continue
                try:
                    response = http.get(f"/status/{order_id}/")
                except httpx.TransportError as exc:  # the web server is still starting
                    last[order_id] = repr(exc)
                    continue
                last[order_id] = (response.status_code, response.text[:200])
                if response.status_code == 200 and settled(response.json()):
                    final[order_id] = response.json()
            time.sleep(0.2)
    missing = {o: last.get(o) for o in order_ids if o not in final}
    assert not missing, f"no final status within {deadline_s:g}s: {missing}\n{worker.log_tail()}"
    return final


def read_status_topic(bootstrap: str, codec: Codec, expected: int) -> list[tuple[int, str, dict, dict]]:
    """orders.status from the start, read without a group (no rebalance to wait for).

    Faust sends in the background, so the last statuses may reach the topic a little after the
    HTTP view shows them: read until `expected` messages arrived, then a little longer to catch
    any extra (duplicate) ones.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(ORDERS_STATUS, p, 0) for p in range(DEFAULT_PARTITIONS)])
        out = []
        deadline = time.monotonic() + 30
        quiet_until = None
        while time.monotonic() < deadline and (quiet_until is None or time.monotonic() < quiet_until):
            msg = consumer.poll(0.2)
            if msg is not None:
                assert not msg.error(), msg.error()
                decoded = codec.decode(msg.value())
                assert decoded.event_type == "OrderStatus"
                out.append((msg.partition(), msg.key().decode(), decoded.record, headers_to_dict(msg.headers())))
            if len(out) >= expected and quiet_until is None:
                quiet_until = time.monotonic() + 1.0
        return out
    finally:
        consumer.close()


def test_worker_folds_events_into_statuses(broker: EmbeddedBroker, start_worker, tmp_path: Path) -> None:
    codec = Codec(EmbeddedRegistry())
    orders = {str(uuid.uuid4()): i % 4 == 0 for i in range(20)}  # every 4th order is rejected
    started = time.monotonic()
    worker = start_worker()
    produce_orders(broker.bootstrap_servers, orders, codec)

    final = wait_final(worker, list(orders))
    print(f"20 orders final {time.monotonic() - started:.1f}s after the worker was spawned")

    for order_id, rejected in orders.items():
        status = final[order_id]
        steps = {name: step["state"] for name, step in status["steps"].items()}
        if rejected:
            assert status["state"] == "FAILED" and status["reason"] == "out of stock: SKU-1"
            assert steps == {"inventory": "failed", "email": "done", "invoice": "skipped", "analytics": "done"}
        else:
            assert status["state"] == "COMPLETED" and status["reason"] is None
            assert steps == dict.fromkeys(["inventory", "email", "invoice", "analytics"], "done")
            assert status["steps"]["invoice"]["detail"] == f"INV-{order_id[:8]}"

    with httpx.Client(base_url=worker.url, timeout=5.0) as http:
        missing = http.get(f"/status/{uuid.uuid4()}/")
        assert (missing.status_code, missing.json()) == (404, {"detail": "order not found"})
        failed = http.get("/status/", params={"state": "FAILED"}).json()
        assert failed["scope"] == "local"
        assert {s["order_id"] for s in failed["statuses"]} == {o for o, rejected in orders.items() if rejected}

    # Each change was published once (duplicates produced no message), keyed and partitioned by
    # order id like the inputs, and the last message per order is its final status.
    # 5 events per reserved order, 4 per rejected one: every distinct event changes the status
    # (OrderCreated at least its created_at), duplicates and garbage change nothing.
    expected = sum(4 if rejected else 5 for rejected in orders.values())
    published = read_status_topic(broker.bootstrap_servers, codec, expected)
    latest: dict[str, dict] = {}
    ids = set()
    for _partition, key, record, headers in published:
        assert record["order_id"] == key
        assert headers["event_type"] == "OrderStatus" and headers["correlation_id"] == key
        ids.add(headers[EVENT_ID])
        latest[key] = record
    assert len(ids) == len(published) == expected
    assert {k: r["state"] for k, r in latest.items()} == {
        o: "FAILED" if rejected else "COMPLETED" for o, rejected in orders.items()}
    assert "order_status.undecodable_skipped" in worker.log_path.read_text()

    # Restarted on the same data dir, the worker answers from its RocksDB store without any new event.
    assert worker.stop() == 0
    again = start_worker(tmp_path / "order-status-0")
    final_again = wait_final(again, list(orders))
    assert {o: s["state"] for o, s in final_again.items()} == {o: s["state"] for o, s in final.items()}


def test_two_workers_split_the_partitions_and_answer_for_each_other(broker: EmbeddedBroker, start_worker) -> None:
    # DESIGN.md reports a second Faust worker once sat on its partitions without processing.
    codec = Codec(EmbeddedRegistry())
    orders = {str(uuid.uuid4()): i % 4 == 0 for i in range(20)}
    first, second = start_worker(), start_worker()
    produce_orders(broker.bootstrap_servers, orders, codec)

    # Each worker answers for every order: its own from its table, the others via table_route.
    for worker in (first, second):
        final = wait_final(worker, list(orders))
        assert {o: s["state"] for o, s in final.items()} == {
            o: "FAILED" if rejected else "COMPLETED" for o, rejected in orders.items()}

    # Both did part of the work (20 random keys all landing on one worker's 3 partitions: ~1e-6).
    local = {}
    for worker in (first, second):
        statuses = httpx.get(f"{worker.url}/status/", params={"limit": 10_000}, timeout=5).json()["statuses"]
        local[worker.port] = {s["order_id"] for s in statuses} & set(orders)
    assert all(local.values()), local
    assert set.union(*local.values()) == set(orders) and not set.intersection(*local.values())
