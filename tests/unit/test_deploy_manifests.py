"""The Kubernetes manifests (deploy/k8s), validated offline.

- The generated files (Strimzi KafkaTopics, KEDA ScaledObjects) are what `orderpipe deploy`
  writes from the topology today: a topology change without regenerating them fails here.
- Every core resource of the base and the example overlay validates against the Kubernetes
  OpenAPI schemas shipped in `kubernetes-validate` (strict: unknown fields fail). Strimzi and
  KEDA resources are custom (no schema there), so they are checked field by field.
- The overlay is rendered with `kubectl kustomize` where kubectl is installed (it bundles
  kustomize); everywhere, the kustomizations may name only files that exist.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from services import registry
from services.cli import deploy_cmd
from services.tools.brokers.apache_kafka import KAFKA_VERSION, cluster_settings

SERVICE_NAMES = tuple(s.name for s in registry.SERVICES)

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "deploy/k8s/base"
OVERLAY = REPO / "deploy/k8s/overlays/example"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for
CONSOLE = "ops-console"  # the operators' web console: no service's process (services/console)
CUSTOM_KINDS = {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser", "ScaledObject", "TriggerAuthentication"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def _manifest_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")


BASE_DOCS = [d for f in _manifest_files(BASE) for d in _docs(f)]
WORKLOADS = {d["metadata"]["name"]: d for d in BASE_DOCS if d["kind"] in ("Deployment", "StatefulSet")}


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in BASE_DOCS if d["kind"] == kind}


# -- generated from the topology ------------------------------------------------------------------

def test_committed_kafka_topics_match_the_topology():
    assert (BASE / "kafka-topics.yaml").read_text() == deploy_cmd.kafka_topics_yaml(), \
        "deploy/k8s/base/kafka-topics.yaml drifted from services/registry.py: run `orderpipe deploy topics`"


def test_committed_kafka_users_match_the_topology():
    assert (BASE / "kafka-users.yaml").read_text() == deploy_cmd.kafka_users_yaml(), \
        "deploy/k8s/base/kafka-users.yaml drifted from services/registry.py: run `orderpipe deploy acls`"


def test_one_strimzi_kafka_user_per_principal_with_its_acls():
    users = {d["metadata"]["name"]: d for d in _docs(BASE / "kafka-users.yaml")}
    assert set(users) == {f"orderpipe-{n}" for n in (*SERVICE_NAMES, "order-status", "operators")}
    email = users["orderpipe-email"]["spec"]
    assert email["authentication"] == {"type": "scram-sha-512"}
    acls = {(a["resource"]["type"], a["resource"]["name"]): a["operations"] for a in email["authorization"]["acls"]}
    assert acls[("topic", "orders.created")] == ["Read", "Describe"] and acls[("group", "email")] == ["Read", "Describe"]
    assert acls[("topic", "email.sent")] == ["Write", "Describe"]
    assert ("topic", "invoices.issued") not in acls


def test_committed_scaled_objects_match_the_topology():
    assert (BASE / "keda-scaledobjects.yaml").read_text() == deploy_cmd.scaled_objects_yaml(), \
        "deploy/k8s/base/keda-scaledobjects.yaml drifted from services/registry.py: run `orderpipe deploy scaling`"


def test_one_strimzi_kafka_topic_per_declared_topic():
    topics = _by_kind("KafkaTopic")
    assert set(topics) == {t.name for t in registry.all_topics()}
    for spec in registry.all_topics():
        resource = topics[spec.name]
        assert resource["apiVersion"] == "kafka.strimzi.io/v1beta2"
        assert resource["metadata"]["labels"]["strimzi.io/cluster"]
        body = resource["spec"]
        assert body["topicName"] == spec.name and body["partitions"] == spec.partitions
        assert isinstance(body["replicas"], int) and body["config"]["min.insync.replicas"] < body["replicas"]
        assert body["config"]["cleanup.policy"] == spec.cleanup_policy
        if spec.cleanup_policy == "delete":
            assert body["config"]["retention.ms"] == spec.retention_ms


def test_one_keda_scaled_object_per_consumer_group_on_its_lag():
    scaled = _by_kind("ScaledObject")
    auth = _by_kind("TriggerAuthentication")
    assert set(scaled) == {g.name for g in registry.GROUPS}
    partitions = {t.name: t.partitions for t in registry.all_topics()}
    config = _by_kind("ConfigMap")["orderpipe-config"]["data"]
    for group in registry.GROUPS:
        spec = scaled[group.name]["spec"]
        target = WORKLOADS[spec["scaleTargetRef"]["name"]]
        assert target["kind"] == "Deployment" and "replicas" not in target["spec"]  # KEDA owns replicas
        assert target["spec"]["template"]["spec"]["containers"][0]["args"] == ["run", group.name]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= max(partitions[t] for t in group.inputs)
        triggers = spec["triggers"]
        assert sorted(t["metadata"]["topic"] for t in triggers) == sorted(group.inputs)
        for trigger in triggers:
            assert trigger["type"] == "kafka"
            assert trigger["metadata"]["consumerGroup"] == group.name
            assert trigger["metadata"]["bootstrapServersFromEnv"] in config
            assert int(trigger["metadata"]["lagThreshold"]) > 0
            assert trigger["authenticationRef"]["name"] in auth


def test_deploy_command_check_mode(tmp_path: Path):
    from typer.testing import CliRunner

    from services.cli.main import app

    runner = CliRunner()
    assert runner.invoke(app, ["deploy", "topics", "--check"]).exit_code == 0
    stale = tmp_path / "topics.yaml"
    stale.write_text("# old\n")
    assert runner.invoke(app, ["deploy", "topics", "--check", "-o", str(stale)]).exit_code == 1
    assert runner.invoke(app, ["deploy", "topics", "-o", str(stale)]).exit_code == 0
    assert stale.read_text() == deploy_cmd.kafka_topics_yaml()


def test_example_kafka_cluster_is_the_version_and_shape_the_three_node_test_cluster_proves():
    docs = {d["kind"]: d for d in _docs(OVERLAY / "kafka-cluster.yaml")}
    kafka, pool = docs["Kafka"], docs["KafkaNodePool"]
    assert kafka["spec"]["kafka"]["version"] == KAFKA_VERSION
    assert {k: str(v).lower() for k, v in kafka["spec"]["kafka"]["config"].items()} == cluster_settings(3)
    assert pool["spec"]["replicas"] == 3 and sorted(pool["spec"]["roles"]) == ["broker", "controller"]
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    # the clients connect where the overlay's config says the cluster is
    bootstrap = yaml.safe_load((OVERLAY / "config.yaml").read_text())["data"]["KAFKA_BOOTSTRAP_SERVERS"]
    port = next(listener["port"] for listener in kafka["spec"]["kafka"]["listeners"] if listener["tls"])
    assert bootstrap == f"{kafka['metadata']['name']}-kafka-bootstrap:{port}"


# -- schema validation ----------------------------------------------------------------------------

def _validate(doc: dict) -> str | None:
    if doc["kind"] in CUSTOM_KINDS:
        return None
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except SchemaNotFoundError:
        return f"no schema for {doc['apiVersion']} {doc['kind']}"
    except kubernetes_validate.ValidationError as exc:
        return f"{doc['kind']} {doc['metadata'].get('name')}: {str(exc).splitlines()[0]}"
    return None


@pytest.mark.parametrize("path", _manifest_files(BASE) + _manifest_files(OVERLAY), ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schemas(path: Path):
    errors = [e for doc in _docs(path) if "kind" in doc and (e := _validate(doc))]
    assert not errors, "\n".join(errors)


def test_the_validation_catches_a_mistake():
    broken = yaml.safe_load(yaml.safe_dump(WORKLOADS["inventory"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert _validate(broken)


# -- what the schemas cannot say ------------------------------------------------------------------

def _main_container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


def test_every_process_has_a_workload():
    runs = {tuple(_main_container(w).get("args", []))[:2]: name for name, w in WORKLOADS.items()}
    for process in registry.processes():
        assert ("run", process) in runs, f"no workload runs `orderpipe run {process}`"
    assert runs.get(("run", CONSOLE)) == CONSOLE, "no workload runs the ops console"
    assert _main_container(WORKLOADS["order-status"])["command"] == ["python", "-m", "streams.order_status"]
    assert WORKLOADS["order-status"]["kind"] == "StatefulSet"  # a RocksDB volume per worker


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_has_probes_resources_and_a_disruption_budget(name: str):
    workload = WORKLOADS[name]
    container = _main_container(workload)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ports, f"{probe} on an undeclared port"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # the console has no /readyz: a broker or database away shows on its pages, it stays in service
    assert container["readinessProbe"]["httpGet"]["path"] in (("/healthz",) if name == CONSOLE else ("/readyz", "/ready"))
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert any(all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
               for pdb in _by_kind("PodDisruptionBudget").values()), f"no PodDisruptionBudget selects {name}"
    if name == CONSOLE:  # serves no /metrics, so nothing to scrape
        assert "prometheus.io/scrape" not in workload["spec"]["template"]["metadata"].get("annotations", {})
        return
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) in ports.values()


def test_health_port_matches_the_config():
    config = _by_kind("ConfigMap")["orderpipe-config"]["data"]
    for name, workload in WORKLOADS.items():
        ports = {p["name"]: p["containerPort"] for p in _main_container(workload)["ports"]}
        if "health" in ports:
            assert ports["health"] == int(config["ORDERPIPE_HEALTH_PORT"]), name
    assert config["ORDERPIPE_HEALTH_HOST"] == "0.0.0.0"


def test_config_names_only_existing_settings():
    fields = registry.setting_variables()
    for path in (BASE / "config.yaml", OVERLAY / "config.yaml"):
        data = _docs(path)[0]["data"]
        assert not {k for k in data if k.startswith("ORDERPIPE_")} - fields, path


def test_migration_job_upgrades_every_database():
    job = _by_kind("Job")["db-migrate"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["db", "upgrade", "all"]
    assert {e["name"] for e in container["env"]} == {f"ORDERPIPE_{s.upper()}_DATABASE_URL" for s in SERVICE_NAMES}
    assert _by_kind("ConfigMap")["orderpipe-config"]["data"]["ORDERPIPE_DB_UPGRADE_ON_START"] == "false"


def test_required_secret_keys_are_provided_by_the_overlay():
    overlay = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    provided = {g["name"]: {lit.split("=", 1)[0] for lit in g.get("literals", [])}
                | {f.split("=", 1)[0] for f in g.get("files", [])} for g in overlay["secretGenerator"]}
    for doc in BASE_DOCS:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in provided[ref["name"]], f"{doc['metadata']['name']}: {ref}"
    for ref in _by_kind("TriggerAuthentication")["orderpipe-kafka"]["spec"]["secretTargetRef"]:
        assert ref["key"] in provided[ref["name"]]
    keda = yaml.safe_load((OVERLAY / "keda-trigger-auth.yaml").read_text())["spec"]["secretTargetRef"]
    for ref in keda:  # the overlay's, or a KafkaUser's Secret (Strimzi makes it, key `password`)
        assert ref["key"] in provided.get(ref["name"], set()) or (ref["name"] == "orderpipe-operators"
                                                                   and ref["key"] == "password"), ref


def test_each_kafka_client_connects_as_its_own_user_with_the_password_from_its_kafka_user():
    """The user services/ops/access.py gives the process, its password from the Secret Strimzi
    keeps for that KafkaUser (key `password`): never a shared login."""
    from services.ops.access import principals, user_name, user_of

    users = {p.name for p in principals()}
    for name, workload in WORKLOADS.items():
        env = {e["name"]: e for e in _main_container(workload).get("env", [])}
        if name == "orders-api":  # it never talks to Kafka (the relay publishes)
            assert "ORDERPIPE_KAFKA_SASL_USERNAME" not in env
            continue
        user = env["ORDERPIPE_KAFKA_SASL_USERNAME"]["value"]
        # the console reads and replays as `orderpipe dlt`/`lag` do: the operators' user
        assert user == (user_name("operators") if name == CONSOLE else user_of(name)) and user in users, name
        assert env["ORDERPIPE_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": user, "key": "password", "optional": True}, name
    overlay = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    [shared] = [lit for g in overlay["secretGenerator"] for lit in g.get("literals", [])
                if lit.startswith("KAFKA_CLIENT_CONFIG=")]
    assert "sasl.password" not in shared and "sasl.username" not in shared


# -- the ops console -------------------------------------------------------------------------------

def _console() -> tuple[dict, dict, dict[str, dict]]:
    workload = WORKLOADS[CONSOLE]
    container = _main_container(workload)
    return workload, container, {e["name"]: e for e in container.get("env", [])}


def test_console_service_selects_the_deployment_on_its_container_port():
    workload, container, env = _console()
    assert workload["kind"] == "Deployment" and workload["spec"]["replicas"] == 1
    assert _by_kind("Ingress") == {}  # exposed by an overlay, behind TLS (deploy/README.md)
    service = _by_kind("Service")[CONSOLE]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    [port] = service["spec"]["ports"]
    assert port["port"] == 8010 and port["targetPort"] in ports
    assert ports[port["targetPort"]] == int(env["ORDERPIPE_CONSOLE_PORT"]["value"])
    assert env["ORDERPIPE_CONSOLE_HOST"]["value"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        target = container[probe]["httpGet"]
        assert target["path"] == "/healthz" and ports.get(target["port"], target["port"]) == ports[port["targetPort"]]


def test_console_reads_every_database_and_its_secrets_from_the_secret():
    _, container, env = _console()
    assert container["args"] == ["run", CONSOLE]
    assert {"name": "orderpipe-config"} in [e["configMapRef"] for e in container["envFrom"]]
    migrate = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in
               _by_kind("Job")["db-migrate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    for service in SERVICE_NAMES:  # the same Secret keys the services and the migration use
        key = f"ORDERPIPE_{service.upper()}_DATABASE_URL"
        assert env[key]["valueFrom"]["secretKeyRef"] == migrate[key], key
    for variable, key in (("ORDERPIPE_CONSOLE_USERS", "CONSOLE_USERS"), ("ORDERPIPE_CONSOLE_SECRET", "CONSOLE_SECRET")):
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "orderpipe-secrets", "key": key}, variable  # required, not optional
    overlay = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    [secrets] = [g for g in overlay["secretGenerator"] if g["name"] == "orderpipe-secrets"]
    assert {"CONSOLE_USERS", "CONSOLE_SECRET"} <= {lit.split("=", 1)[0] for lit in secrets["literals"]}
    # every setting it is given exists (the ConfigMap's are checked in test_config_names_only_existing_settings)
    from services.console.settings import ConsoleSettings

    fields = registry.setting_variables() | {f"ORDERPIPE_{f.upper()}" for f in ConsoleSettings.model_fields}
    assert not {k for k in env if k.startswith("ORDERPIPE_")} - fields


def test_console_runs_as_non_root_on_a_read_only_file_system():
    workload, container, _ = _console()
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # not the invoice PDFs' claim in the base: an overlay mounts it where the cluster has ReadWriteMany
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert not claims
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["mountPath"] == "/data")


# -- kustomize -------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", [BASE, OVERLAY], ids=["base", "overlay"])
def test_kustomization_names_only_existing_files(folder: Path):
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    named = [*kustomization.get("resources", []),
             *(p["path"] for p in kustomization.get("patches", []) if "path" in p),
             *(f.split("=", 1)[-1] for g in kustomization.get("secretGenerator", []) for f in g.get("files", []))]
    for entry in named:
        target = (folder / entry).resolve()
        assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{folder.name}: {entry} does not exist"
    if folder == BASE:  # and nothing is left out
        assert set(kustomization["resources"]) == {p.name for p in _manifest_files(BASE)}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its bundled kustomize) is not installed")
def test_overlay_renders_and_validates():
    out = subprocess.run(["kubectl", "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"orderpipe"}
    errors = [e for d in docs if (e := _validate(d))]
    assert not errors, "\n".join(errors)
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            assert _main_container(d)["image"].startswith("registry.example.com/orderpipe:")
        if d["kind"] == "KafkaTopic":
            assert d["metadata"]["labels"]["strimzi.io/cluster"] == "prod"
