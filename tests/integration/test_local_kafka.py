"""The local Apache Kafka (`services.tools.brokers.LocalKafka`): durable across a restart,
replicated as production is when it has three nodes, and never outlived by its JVMs.

Runs in the `--broker kafka` pass of `make test`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from reading import delivered, wait_until
from services.runtime.admin import ensure_topics
from services.tools.brokers import KAFKA_VERSION, BrokerUnavailable, LocalKafka, free_port, wait_for_broker
from services.tools.brokers.apache_kafka import new_cluster_id
from services.runtime.topology import TopicSpec

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("apache_kafka_only")]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _read_values(bootstrap: str, topic: str) -> list[bytes]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "enable.partition.eof": True,
                         "enable.auto.commit": False, "log_level": 0})
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        values, deadline = [], time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                break  # partition EOF
            values.append(msg.value())
        return values
    finally:
        consumer.close()


def test_data_survives_a_stop_and_start_on_the_same_folder(tmp_path: Path):
    folder = tmp_path / "kafka"
    with LocalKafka(folder) as first:
        ensure_topics({"bootstrap.servers": first.bootstrap_servers}, [TopicSpec("kept", partitions=1)])
        producer = Producer({"bootstrap.servers": first.bootstrap_servers, "acks": "all"})
        for i in range(10):
            producer.produce("kept", value=f"v{i}".encode())
        delivered(producer)
        cluster_id, bootstrap = first.cluster_id, first.bootstrap_servers
    again = LocalKafka(folder).start()
    try:
        assert (again.cluster_id, again.bootstrap_servers) == (cluster_id, bootstrap)
        assert _read_values(again.bootstrap_servers, "kept") == [f"v{i}".encode() for i in range(10)]
    finally:
        again.stop()


def test_three_nodes_replicate_as_production_does(kafka_cluster):
    cluster = kafka_cluster(nodes=3)
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})
    metadata = admin.list_topics("orders.created", timeout=10)
    assert len(metadata.brokers) == 3
    for partition in metadata.topics["orders.created"].partitions.values():
        assert sorted(partition.replicas) == [1, 2, 3] and sorted(partition.isrs) == [1, 2, 3]
    resource = ConfigResource(ConfigResource.Type.TOPIC, "orders.created")
    config = wait_until(lambda: _described(admin, resource), what="orders.created's config from the node asked")
    assert config["min.insync.replicas"].value == "2"
    # one node down: writes with acks=all still go through (2 in sync)
    cluster.kill(cluster.leader_of("orders.created", 0))
    producer = Producer({"bootstrap.servers": cluster.bootstrap_servers, "acks": "all", "enable.idempotence": True})
    producer.produce("orders.created", key=b"k", value=b"v", partition=0)
    assert producer.flush(30) == 0


def test_a_taken_port_is_reported(tmp_path: Path):
    with LocalKafka(tmp_path / "a") as running:
        # a second cluster whose saved layout names the first one's client port
        node = running.nodes[0]
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "cluster.json").write_text(json.dumps({
            "cluster_id": new_cluster_id(), "version": KAFKA_VERSION,
            "nodes": [{"node_id": 1, "port": node.port, "controller_port": free_port()}]}))
        second = LocalKafka(tmp_path / "b")
        try:
            with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{node.port}"):
                second.start(timeout=60)
        finally:
            second.stop()
        assert running.cluster_id == wait_for_broker(running.bootstrap_servers)  # untouched


def test_no_jvm_outlives_a_sigkilled_parent(tmp_path: Path):
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from services.tools.brokers import LocalKafka\n"
        f"k = LocalKafka(Path({str(tmp_path / 'kafka')!r}), nodes=3).start()\n"
        "print(' '.join(str(n.pid) for n in k.nodes), flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel can help
        parent.wait(5)
        assert all(_wait_gone(p) for p in pids), f"JVMs {pids} outlived their parent"
    finally:
        parent.kill()
        parent.wait()


def test_a_session_timeout_the_broker_refuses_stops_the_service_with_what_to_fix(kafka_bootstrap: str, tmp_path: Path):
    """Kafka refuses a session timeout below its group.min.session.timeout.ms on every JoinGroup;
    the service says so and what to set, instead of asking again forever."""
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "ORDERPIPE_DATA_DIR": str(tmp_path),
           "ORDERPIPE_SESSION_TIMEOUT_MS": "500", "ORDERPIPE_HEALTH_PORT": "0", "COLUMNS": "300"}
    done = subprocess.run([sys.executable, "-m", "services.cli.main", "run", "inventory"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Invalid session timeout" in done.stderr and "ORDERPIPE_SESSION_TIMEOUT_MS" in done.stderr
    assert "Traceback" not in done.stderr


def _described(admin: AdminClient, resource: ConfigResource) -> dict | None:
    """The topic's config, or None while the node asked does not know the new topic yet (its
    metadata catches up a moment after the controller created it)."""
    try:
        return admin.describe_configs([resource])[resource].result(10)
    except KafkaException as exc:
        if exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return None
        raise
