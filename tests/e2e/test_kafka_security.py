"""The pipeline on an Apache Kafka that takes only TLS and SCRAM logins (SASL_SSL, SCRAM-SHA-512):
a throw-away CA and broker key made here (tests/tls.py), the SCRAM user stored when the cluster is
formatted, every client (the four services, the relays, the order-status worker, topic creation)
configured with the settings the README documents (`ORDERPIPE_KAFKA_CLIENT_CONFIG`).

- every order reaches its final state through the encrypted, authenticated listener;
- a wrong password, or a CA that did not sign the broker's certificate, ends the process (a
  consumer service, the order-status worker) within seconds with one line naming the problem
  (no hang, no reconnect loop, no traceback), and the password is in none of its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from rich.progress import Progress
from tls import make_tls

from services.pipeline.demo import place_all, sample_orders, wait_for_final
from services.pipeline.stack import Stack
from services.runtime.settings import Settings
from services.tools.brokers import free_port
from services.tools.brokers.apache_kafka import SecureListener

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
USER, PASSWORD = "orderpipe", "tls-and-scram-only-9f3c"


def client_config(tls_ca: Path, password: str = PASSWORD) -> str:
    return (f"security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512;sasl.username={USER};"
            f"sasl.password={password};ssl.ca.location={tls_ca}")


@pytest.fixture
def secure_kafka(kafka_cluster, tmp_path: Path):
    tls = make_tls(tmp_path / "tls")
    cluster = kafka_cluster(nodes=1, secure=SecureListener(tls.keystore, tls.keystore_password, ((USER, PASSWORD),)))
    return cluster, tls


def test_the_whole_pipeline_runs_through_tls_and_scram(secure_kafka, tmp_path: Path, monkeypatch):
    cluster, tls = secure_kafka
    monkeypatch.setenv("ORDERPIPE_KAFKA_CLIENT_CONFIG", client_config(tls.ca_pem))
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", cluster.secure_bootstrap_servers)
    data_dir = tmp_path / "data"
    samples = sample_orders(20, seed=11)
    with Stack(Settings(data_dir=data_dir), data_dir=data_dir) as info:
        assert info.broker == "external" and info.bootstrap_servers == cluster.secure_bootstrap_servers
        with httpx.Client(base_url=info.api_url, timeout=10) as client, \
                Progress(console=Console(file=open(os.devnull, "w"))) as progress:
            placed = place_all(client, samples, progress)
            final = wait_for_final(client, placed, 180, progress)
        assert {oid: view["state"] for oid, view in final.items()} == {oid: o.expected for oid, o in placed.items()}
        logs = "".join(p.read_text(errors="replace") for p in info.log_dir.glob("*.log"))
    assert PASSWORD not in logs, "a process logged the SASL password"


PROCESSES = {  # a consumer service (librdkafka) and the order-status worker (aiokafka under Faust)
    "inventory": [sys.executable, "-m", "services.cli.main", "run", "inventory"],
    "order-status": [sys.executable, "-m", "streams.order_status", "--web-port", "0"],
}


@pytest.mark.parametrize("problem", ["wrong password", "untrusted certificate"])
@pytest.mark.parametrize("process", list(PROCESSES))
def test_a_refused_connection_ends_the_process_in_seconds_with_one_line(secure_kafka, tmp_path: Path, problem,
                                                                         process):
    cluster, tls = secure_kafka
    wrong = "not-" + PASSWORD
    config = (client_config(tls.ca_pem, wrong) if problem == "wrong password"
              else client_config(make_tls(tmp_path / "other-ca", "some other CA").ca_pem))
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": cluster.secure_bootstrap_servers,
           "ORDERPIPE_KAFKA_CLIENT_CONFIG": config, "ORDERPIPE_DATA_DIR": str(tmp_path / "data"),
           "ORDERPIPE_HEALTH_PORT": "0", "ORDERPIPE_LOG_JSON": "true"}
    started = time.monotonic()
    argv = [*PROCESSES[process][:-1], str(free_port())] if process == "order-status" else PROCESSES[process]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-2000:]
    # one line says why it stopped (librdkafka's own log lines of the failed attempts are around it)
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    expected = ("SASL authentication error" if problem == "wrong password" else "certificate verify failed")
    assert line.startswith("error: Kafka refused the connection: ") and expected in line, done.stderr[-2000:]
    assert ("sasl.password" if problem == "wrong password" else "ssl.ca.location") in line
    assert "Traceback" not in done.stderr + done.stdout
    assert PASSWORD not in done.stderr + done.stdout and wrong not in done.stderr + done.stdout
    assert took < 60, f"took {took:.0f} s to give up"  # seconds after the JVM-free start; generous under load
