"""The pipeline on an Apache Kafka that takes only TLS and SCRAM logins (SASL_SSL, SCRAM-SHA-512):
a throw-away CA and broker key made here (tests/tls.py), the SCRAM user stored when the cluster is
formatted, every client (the four services, the relays, the order-status worker, topic creation)
configured with the settings the README documents (`ORDERPIPE_KAFKA_CLIENT_CONFIG`).

- `orderpipe up` with the Kafka, SMTP and Schema Registry logins: every order reaches its final
  state through the encrypted, authenticated listener, and no password is printed or logged;
- a wrong password, or a CA that did not sign the broker's certificate, ends the process (a
  consumer service, the order-status worker) within seconds with one line naming the problem
  (no hang, no reconnect loop, no traceback), and the password is in none of its output;
- under Kafka's standard authorizer each process, and the operators' commands, work with only
  the rights services/ops/access.py derives, and are refused elsewhere with one clear line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from rich.progress import Progress
from conftest import broker_plan
from schema_registry import SchemaRegistry
from tls import make_tls

from services.email.smtp_sink import read_maildir
from services.pipeline.demo import place_all, sample_orders, wait_for_final
from services.pipeline.stack import Stack
from services.runtime.settings import Settings
from services.tools.brokers import free_port
from services.tools.brokers.apache_kafka import LocalKafka, SecureListener

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("apache_kafka_only")]  # the --broker kafka pass

REPO = Path(__file__).resolve().parents[2]
USER, PASSWORD = "orderpipe", "tls-and-scram-only-9f3c"


def client_config(tls_ca: Path, password: str = PASSWORD) -> str:
    return (f"security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512;sasl.username={USER};"
            f"sasl.password={password};ssl.ca.location={tls_ca}")


def _local_kafka(folder: Path, secure: SecureListener) -> Iterator[LocalKafka]:
    if not broker_plan().is_apache_kafka:  # module-scoped fixtures come before `apache_kafka_only`
        pytest.skip(f"needs Apache Kafka; this run uses the {broker_plan().detail} (run with --broker kafka)")
    cluster = LocalKafka(folder, nodes=1, secure=secure).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory):
    """One SASL_SSL Kafka for this module's TLS tests (a JVM start each would add minutes)."""
    folder = tmp_path_factory.mktemp("secure-kafka")
    tls = make_tls(folder / "tls")
    yield from ((cluster, tls) for cluster in
                _local_kafka(folder / "kafka", SecureListener(tls.keystore, tls.keystore_password, ((USER, PASSWORD),))))


def _start_up(env: dict[str, str], data_dir: Path, api_port: int) -> tuple[subprocess.Popen, list[str]]:
    """`orderpipe up`, as an operator starts it, until it says it is running; its output so far."""
    up = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up", "--data-dir", str(data_dir),
                           "--api-port", str(api_port), "--status-port", str(free_port())], cwd=REPO, env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (line := up.stdout.readline()):
        output.append(line)
        if "pipeline is running" in line:
            break
    return up, output


def test_the_whole_pipeline_runs_through_tls_and_scram_and_shows_no_secret(secure_kafka, tmp_path: Path):
    """`orderpipe up` with every login the README documents: Kafka (SASL_SSL, SCRAM), the SMTP
    server (the sink then requires that login) and the Schema Registry (basic auth; a real one,
    Apicurio Registry 2.4.2: tests/schema_registry.py). Orders complete, mails arrive, schemas are
    registered as the registry's user (as the registry records it); no password is in `up`'s
    output or in any process's log."""
    cluster, tls = secure_kafka
    smtp_password, registry_password = "smtp-pw-4d1a", "registry-pw-8e27"
    data_dir, api_port = tmp_path / "data", free_port()
    samples = sample_orders(20, seed=11)
    with SchemaRegistry({"orderpipe": registry_password}) as schema_registry:
        env = {**os.environ, "COLUMNS": "300", "KAFKA_BOOTSTRAP_SERVERS": cluster.secure_bootstrap_servers,
               "ORDERPIPE_KAFKA_CLIENT_CONFIG": client_config(tls.ca_pem),
               "ORDERPIPE_SMTP_USERNAME": "shop", "ORDERPIPE_SMTP_PASSWORD": smtp_password,
               "SCHEMA_REGISTRY_URL": schema_registry.url,
               "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": f"orderpipe:{registry_password}"}
        up, output = _start_up(env, data_dir, api_port)
        try:
            assert "pipeline is running" in output[-1], "".join(output)
            with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as client, \
                    Progress(console=Console(file=open(os.devnull, "w"))) as progress:
                placed = place_all(client, samples, progress)
                final = wait_for_final(client, placed, 180, progress)
        finally:
            up.send_signal(signal.SIGINT)
            rest, _ = up.communicate(timeout=180)
        output.append(rest)
        registered_by = {user for subject in schema_registry.subjects() for user in schema_registry.created_by(subject)}
    assert "stopped" in rest and up.returncode == 0, rest
    assert {oid: view["state"] for oid, view in final.items()} == {oid: o.expected for oid, o in placed.items()}
    mailed = {oid for oid, view in final.items() if view["steps"]["email"]["state"] == "done"}
    assert mailed and {m["Subject"].removeprefix("Your order ") for m in read_maildir(data_dir / "maildir")} == mailed
    assert registered_by == {"orderpipe"}
    shown = "".join(output) + "".join(p.read_text(errors="replace") for p in (data_dir / "logs").glob("*.log"))
    for secret in (PASSWORD, smtp_password, registry_password):
        assert secret not in shown, "a secret was printed or logged"


def _command(process: str) -> list[str]:
    """A consumer service (librdkafka) or the order-status worker (aiokafka under Faust)."""
    if process == "order-status":
        return [sys.executable, "-m", "streams.order_status", "--web-port", str(free_port())]
    return [sys.executable, "-m", "services.cli.main", "run", process]


@pytest.mark.parametrize("problem", ["wrong password", "untrusted certificate"])
@pytest.mark.parametrize("process", ["inventory", "order-status"])
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
    done = subprocess.run(_command(process), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
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


# -- least privilege, under Kafka's standard authorizer ---------------------------------------------

ADMIN = "orderpipe-admin"  # creates the topics, as Strimzi's topic operator would


def _password(user: str) -> str:
    return f"{user}-pw-7c1e"


def _as(user: str, ca: Path) -> str:
    return (f"security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512;sasl.username={user};"
            f"sasl.password={_password(user)};ssl.ca.location={ca}")


def _librdkafka(config: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in config.split(";"))


@pytest.fixture(scope="module")
def authorizing_kafka(tmp_path_factory: pytest.TempPathFactory):
    """SASL_SSL with the standard authorizer on, a SCRAM user per principal of
    services/ops/access.py holding exactly its ACLs, and an admin user for the topics."""
    from confluent_kafka.admin import (
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    from services import registry
    from services.ops.access import acl_bindings, principals
    from services.runtime.admin import ensure_topics

    folder = tmp_path_factory.mktemp("authorizing-kafka")
    tls = make_tls(folder / "tls")
    users = tuple((name, _password(name)) for name in [*(p.name for p in principals()), ADMIN])
    running = _local_kafka(folder / "kafka", SecureListener(tls.keystore, tls.keystore_password, users,
                                                            acls=True, super_users=(ADMIN,)))
    cluster = next(running)
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})  # the loopback listener: the nodes' own
    ensure_topics({"bootstrap.servers": cluster.bootstrap_servers}, registry.all_topics())  # as Strimzi would
    wanted = [b for p in principals() for b in acl_bindings(p)]
    everything = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, None, None, AclOperation.ANY,
                                  AclPermissionType.ANY)
    # Seen here, not understood: ACLs created while the controller is still busy with a burst of
    # new topics are answered "created" and then are not there. So: create until they are listed.
    deadline = time.monotonic() + 60
    while len(admin.describe_acls(everything).result(30)) < len(wanted):
        assert time.monotonic() < deadline, "the ACLs did not stay"
        for future in admin.create_acls(wanted).values():
            future.result(30)
        time.sleep(2)
    yield cluster, tls
    running.close()  # stops the cluster


def test_every_process_works_with_only_its_own_users_rights(authorizing_kafka, tmp_path: Path, monkeypatch):
    from services import registry
    from services.ops.access import user_of

    cluster, tls = authorizing_kafka
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", cluster.secure_bootstrap_servers)
    monkeypatch.setenv("ORDERPIPE_KAFKA_CLIENT_CONFIG", _as(ADMIN, tls.ca_pem))  # topic creation only
    # as the Kubernetes manifests do: the process's own user and password win over the shared config's
    own_user = {name: {"ORDERPIPE_KAFKA_SASL_USERNAME": user_of(name), "ORDERPIPE_KAFKA_SASL_PASSWORD":
                       _password(user_of(name))} for name in [*registry.processes(), "order-status"]}
    data_dir = tmp_path / "data"
    with Stack(Settings(data_dir=data_dir), data_dir=data_dir, process_env=own_user) as info:
        with httpx.Client(base_url=info.api_url, timeout=10) as client, \
                Progress(console=Console(file=open(os.devnull, "w"))) as progress:
            # every seventh e-mail address refused: its dead letter and its failure notice are
            # written under the e-mail user's ACLs, and only the notice makes the order STALLED
            placed = place_all(client, sample_orders(20, seed=12, refuse_every=7), progress)
            final = wait_for_final(client, placed, 180, progress)
        assert {oid: view["state"] for oid, view in final.items()} == {oid: o.expected for oid, o in placed.items()}
        assert sum(o.expected == "STALLED" for o in placed.values()) >= 2


def test_the_email_user_is_refused_what_email_does_not_do(authorizing_kafka, tmp_path: Path):
    """It may not read invoices.issued, nor write orders.created, nor join inventory's group; a
    service started with another's user stops with one line naming what was denied."""
    from confluent_kafka import Consumer, KafkaError, Producer

    cluster, tls = authorizing_kafka
    email = {"bootstrap.servers": cluster.secure_bootstrap_servers, **_librdkafka(_as("orderpipe-email", tls.ca_pem))}

    reader = Consumer({**email, "group.id": "email", "enable.auto.commit": False, "log_level": 0})
    reader.subscribe(["invoices.issued"])  # as the services subscribe
    denied = None
    deadline = time.monotonic() + 60
    while denied is None and time.monotonic() < deadline:
        msg = reader.poll(0.5)
        if msg is not None and msg.error():
            denied = msg.error().code()
    reader.close()
    assert denied == KafkaError.TOPIC_AUTHORIZATION_FAILED

    reports = []
    writer = Producer({**email, "log_level": 0})
    writer.produce("orders.created", key=b"o-x", value=b"x", on_delivery=lambda err, msg: reports.append(err))
    assert writer.flush(60) == 0, "no delivery report within 60 s"
    assert [e.code() if e else None for e in reports] == [KafkaError.TOPIC_AUTHORIZATION_FAILED]

    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": cluster.secure_bootstrap_servers,
           "ORDERPIPE_KAFKA_CLIENT_CONFIG": _as("orderpipe-email", tls.ca_pem),
           "ORDERPIPE_DATA_DIR": str(tmp_path / "data"), "ORDERPIPE_HEALTH_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "services.cli.main", "run", "inventory"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: Kafka denied group inventory") and "kafka-users.yaml" in line, line
    assert "Traceback" not in done.stderr


def _orderpipe_as(user: str, cluster, ca: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "300", "KAFKA_BOOTSTRAP_SERVERS": cluster.secure_bootstrap_servers,
           "ORDERPIPE_KAFKA_CLIENT_CONFIG": _as(user, ca), "ORDERPIPE_OPERATOR": "ops-alice"}
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _dead_letters(cluster, ca: Path, group: str, key: str) -> list[dict]:
    listed = _orderpipe_as("orderpipe-operators", cluster, ca, "dlt", "list", "--group", group, "--key", key, "--json")
    assert listed.returncode == 0, listed.stderr
    return [json.loads(line) for line in listed.stdout.splitlines()]


def test_operators_replay_purge_and_audit_with_only_their_users_rights(authorizing_kafka, tmp_path: Path,
                                                                        monkeypatch):
    """A message no one can decode is dead-lettered by every group reading orders.created, each
    with its own user; the operators' user lists, replays and purges those dead letters, reads
    the audit log and the lag. The e-mail service's user may not purge another group's."""
    from confluent_kafka import Producer

    from services import registry
    from services.ops.access import user_of

    cluster, tls = authorizing_kafka
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", cluster.secure_bootstrap_servers)
    monkeypatch.setenv("ORDERPIPE_KAFKA_CLIENT_CONFIG", _as(ADMIN, tls.ca_pem))
    own_user = {name: {"ORDERPIPE_KAFKA_CLIENT_CONFIG": _as(user_of(name), tls.ca_pem)}
                for name in [*registry.processes(), "order-status"]}
    key = f"o-undecodable-{tmp_path.name[-6:]}"
    data_dir = tmp_path / "data"
    with Stack(Settings(data_dir=data_dir), data_dir=data_dir, process_env=own_user):
        admin = Producer({"bootstrap.servers": cluster.bootstrap_servers})
        admin.produce("orders.created", key=key.encode(), value=b"not an Avro event")
        assert admin.flush(30) == 0
        deadline = time.monotonic() + 120
        while not (_dead_letters(cluster, tls.ca_pem, "inventory", key) and
                   _dead_letters(cluster, tls.ca_pem, "email", key)):
            assert time.monotonic() < deadline, "the undecodable message was not dead-lettered"
            time.sleep(1)
    [letter] = _dead_letters(cluster, tls.ca_pem, "inventory", key)
    assert letter["exception_type"].endswith("DecodeError") and letter["topic"] == "orders.created.inventory.dlt"

    operators = ("orderpipe-operators", cluster, tls.ca_pem)
    replayed = _orderpipe_as(*operators, "dlt", "replay", "--group", "inventory", "--key", key, "--yes")
    assert replayed.returncode == 0 and "replayed 1 of 1" in replayed.stdout, replayed.stdout + replayed.stderr
    purged = _orderpipe_as(*operators, "dlt", "purge", "--group", "email", "--key", key, "--yes")
    assert purged.returncode == 0 and "purged 1 of 1" in purged.stdout, purged.stdout + purged.stderr
    assert _dead_letters(cluster, tls.ca_pem, "inventory", key) == _dead_letters(cluster, tls.ca_pem, "email", key) == []
    back = _orderpipe_as(*operators, "tail", "orders.created.inventory.retry.1", "--from-beginning", "--json")
    assert back.returncode == 0 and [json.loads(line)["key"] for line in back.stdout.splitlines()] == [key], back.stderr

    audit = _orderpipe_as(*operators, "dlt", "audit", "--json")
    assert audit.returncode == 0, audit.stderr
    runs = [json.loads(line) for line in audit.stdout.splitlines()]
    assert [(r["action"], r["outcome"], r["count"], r["user"]) for r in runs][-2:] == [
        ("replay", "completed", 1, "ops-alice"), ("purge", "completed", 1, "ops-alice")]
    lag = _orderpipe_as(*operators, "lag")
    assert lag.returncode == 0 and "inventory" in lag.stdout, lag.stderr

    refused = _orderpipe_as("orderpipe-email", cluster, tls.ca_pem, "dlt", "purge", "--group", "analytics",
                            "--key", key, "--yes")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    [line] = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: Kafka denied access to topic ") and "kafka-users.yaml" in line, line
    assert "Traceback" not in refused.stderr
