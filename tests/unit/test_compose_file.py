"""docker-compose.yml, validated offline: no Docker engine runs here (nor in CI), so neither
`docker compose config` nor a real start can check it. The Compose Specification schema
(vendored, tests/data/README.md) checks the shape; the other tests check what the schema cannot:
the wiring between the containers and the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from services import registry
from services.console.settings import ConsoleSettings
from services.tools.brokers.apache_kafka import KAFKA_VERSION, cluster_settings

SERVICE_NAMES = tuple(s.name for s in registry.SERVICES)

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())  # resolves the <<: merge keys
SERVICES_ = COMPOSE["services"]
# every container running the orderpipe image, one-shot steps included
ORDERPIPE = {name: s for name, s in SERVICES_.items() if s.get("image") == "orderpipe:dev"}
LONG_RUNNING = {name: s for name, s in ORDERPIPE.items() if s.get("restart") != "no"}
ONE_SHOT = {name: s for name, s in ORDERPIPE.items() if s.get("restart") == "no"}
KAFKA_NODES = ("kafka-1", "kafka-2", "kafka-3")
BOOTSTRAP = ",".join(f"{node}:9092" for node in KAFKA_NODES)
CONSOLE = "ops-console"  # no service's process (registry.processes() does not list it): services/console


def _command(service: dict) -> list[str]:
    return [*(service.get("entrypoint") or []), *(service.get("command") or [])]


def test_matches_the_compose_specification_schema():
    schema = json.loads((REPO / "tests/data/compose-spec.json").read_text())
    schema["properties"]["name"] = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"}
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft201909Validator(schema).iter_errors(COMPOSE)]
    assert not errors, "\n".join(errors)


def test_the_schema_check_would_catch_a_mistake():
    schema = json.loads((REPO / "tests/data/compose-spec.json").read_text())
    broken = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    broken["services"]["inventory"]["healthcheck"]["intervall"] = "5s"
    assert not jsonschema.Draft201909Validator(schema).is_valid(broken)


def test_every_process_runs_in_its_own_container():
    commands = {tuple(_command(s)) for s in LONG_RUNNING.values()}
    for process in registry.processes():
        assert ("run", process) in commands, f"no container runs `orderpipe run {process}`"
    assert ("run", CONSOLE) in commands, "no container runs the ops console"
    assert any(c[:3] == ("python", "-m", "streams.order_status") for c in commands), "no order-status worker"
    assert ("topics", "create") in {tuple(_command(s)) for s in ONE_SHOT.values()}
    assert ("db", "upgrade", "all") in {tuple(_command(s)) for s in ONE_SHOT.values()}
    for infra, image in (*((node, "apache/kafka:") for node in KAFKA_NODES), ("schema-registry", "confluentinc/cp-schema-registry:"),
                         ("postgres", "postgres:"), ("mailpit", "axllent/mailpit:"), ("prometheus", "prom/prometheus:")):
        assert SERVICES_[infra]["image"].startswith(image)


@pytest.mark.parametrize("node", KAFKA_NODES)
def test_kafka_runs_in_kraft_mode(node: str):
    env = SERVICES_[node]["environment"]
    assert "broker" in env["KAFKA_PROCESS_ROLES"] and "controller" in env["KAFKA_PROCESS_ROLES"]
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == ",".join(f"{i}@kafka-{i}:9093" for i in (1, 2, 3))
    assert env["KAFKA_NODE_ID"] == int(node[-1]) and f"INTERNAL://{node}:9092" in env["KAFKA_ADVERTISED_LISTENERS"]


@pytest.mark.parametrize("node", KAFKA_NODES)
def test_kafka_is_the_version_and_shape_the_three_node_test_cluster_proves(node: str):
    """The pinned version, and replication 3 / min ISR 2 / no auto-created topics / compaction
    on: what tests/e2e/test_kafka_broker_failures.py runs its broker failures against."""
    service = SERVICES_[node]
    assert service["image"] == f"apache/kafka:{KAFKA_VERSION}"
    env = {k: str(v) for k, v in service["environment"].items()}
    for key, value in cluster_settings(3).items():
        assert env.get("KAFKA_" + key.upper().replace(".", "_")) == value, key
    assert SERVICES_["schema-registry"]["environment"]["SCHEMA_REGISTRY_KAFKASTORE_TOPIC_REPLICATION_FACTOR"] == 3


@pytest.mark.parametrize("name", sorted(LONG_RUNNING))
def test_services_are_wired_to_kafka_the_registry_and_health(name: str):
    service = LONG_RUNNING[name]
    env = service["environment"]
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == BOOTSTRAP
    assert env["SCHEMA_REGISTRY_URL"] == "http://schema-registry:8081"
    assert "healthcheck" in service, f"{name} has no healthcheck"
    probe = " ".join(service["healthcheck"]["test"])
    assert re.search(r"/(readyz|healthz)'", probe), probe
    if _command(service)[:1] == ["run"] and _command(service)[1] not in ("orders-api", CONSOLE):
        assert f":{env['ORDERPIPE_HEALTH_PORT']}/readyz" in probe and env["ORDERPIPE_HEALTH_HOST"] == "0.0.0.0"
    waits_for = service.get("depends_on", {})
    assert waits_for.get("topics", {}).get("condition") == "service_completed_successfully"
    if any(k.endswith("_DATABASE_URL") for k in env):
        assert waits_for["migrate"]["condition"] == "service_completed_successfully"
        assert env["ORDERPIPE_DB_UPGRADE_ON_START"] == "false"


def test_every_orderpipe_setting_in_the_file_exists():
    """A typo in an ORDERPIPE_ variable would be ignored silently by pydantic-settings."""
    fields = registry.setting_variables() | {f"ORDERPIPE_{f.upper()}" for f in ConsoleSettings.model_fields}
    for name, service in ORDERPIPE.items():
        unknown = {k for k in service.get("environment", {}) if k.startswith("ORDERPIPE_")} - fields
        assert not unknown, f"{name}: {unknown}"


def test_depends_on_names_existing_services():
    for name, service in SERVICES_.items():
        for target in service.get("depends_on", {}):
            assert target in SERVICES_, f"{name} depends on unknown {target}"


def test_database_urls_match_the_postgres_init_script():
    init = (REPO / "deploy/compose/postgres-init.sql").read_text()
    for service in SERVICE_NAMES:
        assert f"CREATE ROLE {service} " in init and f"CREATE DATABASE {service} " in init
        url = f"postgresql://{service}:{service}@postgres:5432/{service}"
        key = f"ORDERPIPE_{service.upper()}_DATABASE_URL"
        assert SERVICES_["migrate"]["environment"][key] == url
        users = [n for n, s in LONG_RUNNING.items() if s["environment"].get(key)]
        assert users and all(LONG_RUNNING[n]["environment"][key] == url for n in users)


def test_mounted_files_exist():
    for name, service in SERVICES_.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).is_file(), f"{name} mounts missing {source}"


def test_prometheus_scrapes_every_process():
    config = yaml.safe_load((REPO / "deploy/compose/prometheus.yml").read_text())
    targets: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets |= {(n, sd["port"]) for n in sd["names"]}
        for static in job.get("static_configs", []):
            targets |= {(t.split(":")[0], int(t.split(":")[1])) for t in static["targets"]}
    for name, service in LONG_RUNNING.items():
        command = _command(service)
        if command == ["run", CONSOLE]:  # no /metrics: the operators' pages, not the pipeline
            continue
        port = 8000 if command == ["run", "orders-api"] else 6066 if "streams.order_status" in command else 9100
        assert (name, port) in targets, f"Prometheus does not scrape {name}:{port}"


# -- the ops console ------------------------------------------------------------------------------

def test_the_console_reads_what_its_pages_show():
    """Every service's database (timelines, documents, mails, each group's held keys), the
    order-status view, Kafka and the invoice PDFs: the same values the services themselves get."""
    [name] = [n for n, s in LONG_RUNNING.items() if _command(s) == ["run", CONSOLE]]
    console = LONG_RUNNING[name]
    env = console["environment"]
    for service in SERVICE_NAMES:
        key = f"ORDERPIPE_{service.upper()}_DATABASE_URL"
        assert env.get(key) == SERVICES_["migrate"]["environment"][key], f"the console lacks {key}"
    status = SERVICES_["order-status"]
    web_port = status["command"][status["command"].index("--web-port") + 1]
    assert env["ORDERPIPE_STATUS_URL"] == f"http://order-status:{web_port}"
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == BOOTSTRAP
    # the PDFs: the invoice service's volume at the console's data folder, read only
    [invoice_volume] = [v for v in SERVICES_["invoice"]["volumes"] if v.endswith(":/data")]
    assert f"{invoice_volume}:ro" in console["volumes"] and env["ORDERPIPE_DATA_DIR"] == "/data"


def test_the_console_listens_where_it_is_published_and_probed():
    [console] = [s for s in LONG_RUNNING.values() if _command(s) == ["run", CONSOLE]]
    env = console["environment"]
    port = env["ORDERPIPE_CONSOLE_PORT"]
    assert env["ORDERPIPE_CONSOLE_HOST"] == "0.0.0.0"  # inside the container; the host publishes loopback only
    assert console["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f"http://127.0.0.1:{port}/healthz'" in " ".join(console["healthcheck"]["test"])
    # users and the session secret from the environment of `docker compose`, never in the file
    assert env["ORDERPIPE_CONSOLE_USERS"] == "${ORDERPIPE_CONSOLE_USERS:-}"
    assert env["ORDERPIPE_CONSOLE_SECRET"] == "${ORDERPIPE_CONSOLE_SECRET:-}"
