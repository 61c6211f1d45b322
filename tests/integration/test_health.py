"""Health, readiness, metrics and message logs of a consumer service process, on the session's
broker: `run_service` (what `orderpipe run <service>` runs) with a small handler on a private
group, its health server on a free port."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import MetaData

from conftest import settings_for
from reading import delivered, read_all
from services import registry
from services.tools.brokers import free_port
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.errors import PermanentError
from services.runtime.events import OrderCreated, OrderLine
from services.runtime.handler import Service, UnitOfWork
from services.runtime.health import Health, HealthServer, database_check, kafka_check
from services.runtime.kafka import make_producer
from services.runtime.logs import JsonFormatter
from services.runtime.service_main import run_service

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CODEC = Codec(EmbeddedRegistry())
REPO = Path(__file__).resolve().parents[2]
BAD = "order-that-fails"


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def metric(base_url: str, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def fails_for_one_order(event: OrderCreated, uow: UnitOfWork) -> list:
    if event.order_id.startswith(BAD):
        raise PermanentError(f"cannot handle {event.order_id}")
    return []


def produce_order(producer, topic: str, order_id: str) -> str:
    event = OrderCreated(order_id=order_id, customer_id="c-1", customer_email="ada@example.com", currency="EUR",
                         lines=[OrderLine(sku="SKU-1", quantity=1, unit_price=Decimal("9.90"))], total=Decimal("9.90"),
                         created_at=datetime.now(UTC).replace(microsecond=0))
    envelope = Envelope(event_id=new_event_id(), event_type="OrderCreated",
                        schema_version=OrderCreated.schema_version, correlation_id=order_id)
    producer.produce(topic, key=order_id.encode(), headers=envelope.to_headers(),
                     value=CODEC.encode("OrderCreated", event.model_dump(), OrderCreated.schema_version))
    return envelope.event_id


@pytest.fixture
def running_service(kafka_bootstrap: str, private_group, tmp_path) -> Iterator[tuple[str, object]]:
    """A consumer service process's insides in a thread: migrations (the analytics database's
    schema: inbox and outbox), the consumer loop, the relay thread, the health server."""
    group = private_group(partitions=2, prefix="health")
    port = free_port()
    settings = settings_for(kafka_bootstrap, health_port=port,
                            analytics_database_url=f"sqlite:///{tmp_path / 'analytics.db'}")
    stop = threading.Event()
    failed: list[BaseException] = []

    def build(_runtime) -> Service:
        return Service(group, MetaData(), {OrderCreated: [fails_for_one_order]}, batch_size=50)

    def run() -> None:
        try:
            run_service(dataclasses.replace(registry.service("analytics"), build=build), settings, stop)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, name="service-under-test", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        yield base_url, group
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive(), "the service did not stop"
    assert not failed, failed


def test_health_readiness_metrics_and_message_logs(running_service, kafka_bootstrap: str, caplog):
    base_url, group = running_service
    caplog.set_level(logging.INFO)

    def answers(path: str) -> int | None:
        try:
            return httpx.get(base_url + path, timeout=5).status_code
        except httpx.HTTPError:
            return None

    assert wait_until(lambda: answers("/healthz") == 200, what="/healthz")
    ready = httpx.get(f"{base_url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"kafka": "ok", "database": "ok"}

    producer = make_producer(settings_for(kafka_bootstrap))
    good = [f"order-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for order_id in good:
        produce_order(producer, group.inputs[0], order_id)
    bad_order = f"{BAD}-{uuid.uuid4().hex[:8]}"
    bad_event = produce_order(producer, group.inputs[0], bad_order)
    delivered(producer)

    name = group.name
    wait_until(lambda: metric(base_url, "orderpipe_messages_processed_total", group=name) == len(good),
               what="processed counter")
    wait_until(lambda: metric(base_url, "orderpipe_messages_dead_lettered_total", group=name) == 1,
               what="dead-lettered counter")
    assert metric(base_url, "orderpipe_handler_seconds_count", group=name) >= len(good) + 1
    # librdkafka's statistics (every 5 s) give the lag of each assigned input partition: all done
    wait_until(lambda: metric(base_url, "orderpipe_consumer_lag", group=name, topic=group.inputs[0]) is not None,
               timeout=20, what="consumer lag gauge")
    # Every partition that got messages reports a lag, and it is 0 (absent is not 0).
    written = {partition for partition, *_ in read_all(kafka_bootstrap, group.inputs[0])}
    wait_until(lambda: all(metric(base_url, "orderpipe_consumer_lag", group=name, topic=group.inputs[0],
                                  partition=str(p)) == 0.0 for p in written), timeout=20, what="lag 0")
    assert metric(base_url, "orderpipe_outbox_backlog", service="analytics") == 0

    # Every log line about a message says which order, which event and which group, as JSON.
    about_bad = [json.loads(JsonFormatter("analytics").format(r)) for r in caplog.records
                 if getattr(r, "order_id", None) == bad_order]
    messages = {line["msg"] for line in about_bad}
    assert "handler failed" in messages, messages
    for line in about_bad:
        assert (line["order_id"], line["event_id"], line["group"]) == (bad_order, bad_event, name), line
        assert line["level"] in ("warning", "error", "info") and line["service"] == "analytics"


def test_not_ready_when_the_database_does_not_answer(kafka_bootstrap: str):
    health = Health({"kafka": kafka_check({"bootstrap.servers": kafka_bootstrap}),
                     "database": database_check(f"postgresql://orderpipe@127.0.0.1:{free_port()}/nowhere")})
    with serve(health) as base_url:
        answer = httpx.get(f"{base_url}/readyz", timeout=10)
        assert answer.status_code == 503
        checks = answer.json()["checks"]
        assert checks["kafka"] == "ok" and checks["database"] != "ok"
        assert httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200  # alive: no restart for that


def test_not_ready_when_the_broker_does_not_answer(tmp_path):
    health = Health({"kafka": kafka_check({"bootstrap.servers": f"127.0.0.1:{free_port()}"}, timeout_s=1.0),
                     "database": database_check(f"sqlite:///{tmp_path / 'x.db'}")})
    with serve(health) as base_url:
        answer = httpx.get(f"{base_url}/readyz", timeout=10)
        assert answer.status_code == 503
        checks = answer.json()["checks"]
        assert checks["database"] == "ok" and checks["kafka"] != "ok"


class serve:
    def __init__(self, health: Health):
        self.server = HealthServer(health, "127.0.0.1", 0)

    def __enter__(self) -> str:
        return self.server.start().url

    def __exit__(self, *exc) -> None:
        self.server.stop()


@pytest.mark.parametrize("process", ["inventory", "orders-relay"])
def test_a_taken_health_port_stops_the_process_with_what_to_fix(process: str, tmp_path):
    """Another program holds the port: one line naming the address and the setting, exit 1, no
    traceback, and the process gone (the relay thread stopped with it). No broker needed: the
    health server starts before the first poll."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "ORDERPIPE_DATA_DIR": str(tmp_path),
               "ORDERPIPE_HEALTH_HOST": "127.0.0.1", "ORDERPIPE_HEALTH_PORT": str(port), "COLUMNS": "300"}
        done = subprocess.run([sys.executable, "-m", "services.cli.main", "run", process], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=90)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the health server cannot listen on 127.0.0.1:{port} (Address already in use): "
                      "set ORDERPIPE_HEALTH_PORT to a free port, or to 0 to turn it off"], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_taken_web_port_stops_the_order_status_worker_with_what_to_fix(tmp_path):
    """The worker's web port (its status pages and /ready) is checked before Faust starts: one
    line and exit 1, not the traceback Faust prints when its web server fails to bind."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "streams.order_status", "--bootstrap-servers", "127.0.0.1:1",
                               "--data-dir", str(tmp_path), "--web-port", str(port)],
                              cwd=REPO, env={**os.environ, "COLUMNS": "300"}, capture_output=True, text=True, timeout=90)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        f"error: the order-status worker cannot listen on 127.0.0.1:{port} (Address already in use): "
        "set --web-port (or the port of ORDERPIPE_STATUS_URL) to a free port"]
