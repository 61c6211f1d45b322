"""The embedded Tansu broker: it works, it is new on every start, and it never leaks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from reading import delivered
from services.tools.brokers import BrokerUnavailable, EmbeddedBroker, free_port, wait_for_broker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0) but is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_started_broker_produces_and_consumes(tmp_path: Path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as broker:
        assert broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
        assert wait_for_broker(broker.bootstrap_servers, timeout=5) == broker.cluster_id

        topic = f"t-{uuid.uuid4().hex[:8]}"
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
        producer.produce(topic, key=b"order-1", value=b"hello")
        delivered(producer)
        # Tansu drains open connections on SIGTERM (~5 s): close clients before stopping.
        producer.close()

        consumer = Consumer({
            "bootstrap.servers": broker.bootstrap_servers,
            "group.id": "g1",
            "auto.offset.reset": "earliest",
            # Tansu waits for the rebalance timeout before the first assignment.
            "max.poll.interval.ms": 10000,
            "session.timeout.ms": 6000,
        })
        try:
            consumer.subscribe([topic])
            msg = None
            deadline = time.monotonic() + 30
            while msg is None and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is not None and msg.error():
                    pytest.fail(str(msg.error()))
            assert msg is not None, "no message consumed within 30s"
            assert (msg.key(), msg.value()) == (b"order-1", b"hello")
        finally:
            consumer.close()
    assert "listening on" in (tmp_path / "broker.log").read_text()


def test_every_start_is_a_new_cluster() -> None:
    first, second = EmbeddedBroker(), EmbeddedBroker()
    assert first.cluster_id != second.cluster_id

    with first:
        id_before = first.cluster_id
    with first:  # restarted: empty again, so it must not look like the old broker
        assert first.cluster_id != id_before
        assert wait_for_broker(first.bootstrap_servers, timeout=5) == first.cluster_id

    pinned = EmbeddedBroker(cluster_id="pinned-cluster")
    with pinned:
        assert wait_for_broker(pinned.bootstrap_servers, timeout=5) == "pinned-cluster"


def test_stop_frees_the_port_and_is_idempotent() -> None:
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    pid = broker.pid
    assert pid is not None
    broker.stop()
    broker.stop()
    assert not _alive(pid)
    with socket.socket() as s:  # raises if the port were still held
        s.bind(("127.0.0.1", port))
    with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}"):
        wait_for_broker(f"127.0.0.1:{port}", timeout=0.5)


def test_taken_port_is_reported() -> None:
    with EmbeddedBroker() as running:
        with pytest.raises(BrokerUnavailable):
            EmbeddedBroker(port=running.port).start(timeout=5)


def test_broker_dies_with_a_sigkilled_parent() -> None:
    code = (
        "import sys, time\n"
        "from services.tools.brokers import EmbeddedBroker\n"
        "b = EmbeddedBroker().start()\n"
        "print(b.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        broker_pid = int(parent.stdout.readline())
        assert _alive(broker_pid)
        parent.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel can help
        parent.wait(5)
        assert _wait_gone(broker_pid), f"broker pid {broker_pid} outlived its parent"
    finally:
        parent.kill()
        parent.wait()
