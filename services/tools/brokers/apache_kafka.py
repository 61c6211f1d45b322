"""A local Apache Kafka: KRaft nodes on 127.0.0.1, assembled from Maven Central.

What production runs, on this machine: `org.apache.kafka:kafka_2.13` with its runtime
dependencies and a log4j2 backend, copied once by Maven into a cache folder outside the
repository, then one combined broker+controller node, or a cluster of three (replication 3,
`min.insync.replicas=2`), each node with its own log folder. Unlike the embedded broker it
keeps its data on disk: started again on the same folder it is the same cluster (same id,
same topics, same offsets), which is what makes `orderpipe up --broker kafka` durable.

Every JVM dies with the process that started it (`die_with_parent`, so even a SIGKILLed
parent leaves none behind), and `stop()` shuts the nodes down cleanly (SIGTERM: controlled
shutdown), SIGKILL only past a timeout. The chaos tests use `kill`, `freeze` and `start` of
single nodes.
"""

from __future__ import annotations

import atexit
import base64
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from services.tools.brokers.probe import BrokerUnavailable, PortTaken, free_port, wait_for_broker
from services.tools.supervisor import die_with_parent

# The one place the Kafka version is pinned: docker-compose.yml runs the same image tag
# (tests/unit/test_compose_file.py checks it), and deploy/ the same Strimzi `version`.
KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.24.3"  # the log4j2 backend the broker logs through (Kafka 4 uses log4j2)
SLF4J_VERSION = "2.0.17"  # kafka_2.13's pom pulls slf4j 1.7, which log4j-slf4j2-impl cannot bind
MIN_JAVA = 17

def cluster_settings(nodes: int) -> dict[str, str]:
    """The broker settings that decide durability and the topic layout, for a cluster of
    `nodes`: three nodes are production's shape (every topic on 3 replicas, an acknowledged write
    on at least 2). docker-compose.yml and the Strimzi `Kafka` in deploy/ carry the 3-node values
    (tests/unit/test_compose_file.py and test_deploy_manifests.py compare them)."""
    replicas, min_isr = ("3", "2") if nodes >= 3 else ("1", "1")
    return {
        "default.replication.factor": replicas,
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": replicas,
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": replicas,
        "share.coordinator.state.topic.min.isr": min_isr,
        # as in production: `orderpipe topics create` declares the topics, Faust its own; a typo or
        # an early metadata request must not create a topic with the default partition count
        "auto.create.topics.enable": "false",
        "num.partitions": "6",
        "log.cleaner.enable": "true",  # compacted topics (orders.status, Faust's changelog)
        # a new group's first rebalance does not wait 3 s for more members
        "group.initial.rebalance.delay.ms": "0",
    }


# What only the local nodes get: shorter waits where a test would sit them out.
_LOCAL_SETTINGS = {
    # The tests run consumers with a 2 s session timeout (a killed member leaves fast); Kafka's
    # default floor is 6 s. The services' own default (6 s) is within Kafka's default floor.
    "group.min.session.timeout.ms": "1000",
    # Let a cluster's nodes notice a dead peer within seconds (defaults: 9 s / 2 s).
    "broker.session.timeout.ms": "6000",
    "broker.heartbeat.interval.ms": "1000",
}


@dataclass(frozen=True)
class SecureListener:
    """A SASL_SSL client listener beside the plaintext one: TLS with the broker certificate in
    `keystore` (PKCS#12, under `keystore_password`), SCRAM-SHA-512 logins for `users` (name ->
    password, stored when the cluster is formatted). With `acls` the standard authorizer is on:
    a principal may do only what an ACL allows it (`super_users` everything). The plaintext
    listener stays for the nodes themselves and the local admin (its principal, ANONYMOUS, is a
    super user then): bind it to loopback only, as here.

    The test that uses it makes a throw-away CA and keys (tests/tls.py); nothing is committed."""

    keystore: Path
    keystore_password: str
    users: tuple[tuple[str, str], ...]
    acls: bool = False
    super_users: tuple[str, ...] = ()

    def settings(self) -> dict[str, str]:
        listener = "listener.name.sasl_ssl"
        settings = {
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            f"{listener}.sasl.enabled.mechanisms": "SCRAM-SHA-512",
            f"{listener}.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            f"{listener}.ssl.keystore.type": "PKCS12",
            f"{listener}.ssl.keystore.location": str(self.keystore),
            f"{listener}.ssl.keystore.password": self.keystore_password,
            f"{listener}.ssl.key.password": self.keystore_password,
        }
        if self.acls:
            supers = ["User:ANONYMOUS", *(f"User:{name}" for name in self.super_users)]
            settings |= {"authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                         "super.users": ";".join(supers), "allow.everyone.if.no.acl.found": "false"}
        return settings

    def scram_arguments(self) -> list[str]:
        """StorageTool's `--add-scram` for every user (KRaft keeps SCRAM credentials in its metadata)."""
        return [arg for name, password in self.users
                for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]")]


class KafkaUnavailable(BrokerUnavailable):
    """Java or Maven is missing, or the Kafka libraries could not be assembled."""


def cache_dir() -> Path:
    """Where the assembled libraries live, outside any repository and shared by every clone."""
    base = os.environ.get("ORDERPIPE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orderpipe")
    return Path(base) / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}"


def java_major_version(java: str = "java") -> int | None:
    """The major version of `java` on PATH, or None when there is none."""
    if shutil.which(java) is None:
        return None
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not found:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def check_java() -> None:
    major = java_major_version()
    if major is None:
        raise KafkaUnavailable(f"the local Apache Kafka needs Java {MIN_JAVA} or newer: no `java` on PATH "
                               "(install OpenJDK 17, e.g. `apt-get install openjdk-17-jre-headless`)")
    if major < MIN_JAVA:
        raise KafkaUnavailable(f"the local Apache Kafka needs Java {MIN_JAVA} or newer, `java` on PATH is "
                               f"Java {major} (install OpenJDK 17 and put it first on PATH)")


_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>orderpipe</groupId><artifactId>local-kafka</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_{scala}</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>{slf4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""


def kafka_libs(progress=lambda line: None) -> Path:
    """The folder of Kafka's jars, assembled by Maven on first use (about 45 MB, seconds with a
    warm ~/.m2). Safe when several processes ask at once: one assembles, the others wait."""
    target = cache_dir()
    lib = target / "lib"
    if (lib / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar").exists():
        return lib
    check_java()
    if shutil.which("mvn") is None:
        raise KafkaUnavailable("the local Apache Kafka is assembled from Maven Central by Maven: no `mvn` on PATH "
                               "(install it, e.g. `apt-get install maven`)")
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (lib / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar").exists():
            return lib
        progress(f"assembling Apache Kafka {KAFKA_VERSION} from Maven Central into {target} (once)")
        with tempfile.TemporaryDirectory(dir=target) as work:
            pom = Path(work) / "pom.xml"
            pom.write_text(_POM.format(scala=SCALA_VERSION, kafka=KAFKA_VERSION, slf4j=SLF4J_VERSION,
                                       log4j=LOG4J_VERSION))
            partial = Path(work) / "lib"
            result = subprocess.run(
                ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", "-DincludeScope=runtime",
                 f"-DoutputDirectory={partial}"], capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                tail = " ".join((result.stdout + result.stderr).split())[-300:]
                raise KafkaUnavailable(f"Maven could not assemble Apache Kafka {KAFKA_VERSION}: {tail}")
            # drop the slf4j 1.7 API that kafka_2.13's pom brings beside the 2.x one
            for old in partial.glob("slf4j-api-1.*.jar"):
                old.unlink()
            if lib.exists():
                shutil.rmtree(lib)
            partial.rename(lib)  # whole or not at all: a killed assembly leaves no half folder
    return lib


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding. Never one that starts
    with "-" (as Kafka's own Uuid.randomUuid avoids): StorageTool's argument parser takes that for
    an option, and formatting fails (one id in 64)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


_LOG4J2 = """Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        Pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Logger:
      - name: kafka.request.logger
        level: WARN
      - name: org.apache.kafka.controller
        level: WARN
      - name: state.change.logger
        level: WARN
    Root:
      level: INFO
      AppenderRef:
        - ref: STDOUT
"""


@dataclass
class KafkaNode:
    """One combined broker+controller JVM."""

    node_id: int
    port: int  # the client listener
    controller_port: int
    folder: Path
    secure_port: int | None = None  # the SASL_SSL listener, when the cluster has one
    proc: subprocess.Popen | None = None
    log: IO[bytes] | None = field(default=None, repr=False)
    frozen: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def secure_address(self) -> str | None:
        return f"127.0.0.1:{self.secure_port}" if self.secure_port else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running else None


class LocalKafka:
    """Apache Kafka on 127.0.0.1: `nodes` KRaft nodes (1, or 3 for a replicated cluster) whose
    logs live under `data_dir`. Started on a folder it made before, it is the same cluster."""

    embedded = False  # data on disk, survives a restart
    kind = "kafka"
    client_env: dict[str, str] = {}  # the clients' defaults are Kafka's

    def __init__(self, data_dir: Path, nodes: int = 1, settings: dict[str, str] | None = None,
                 heap_mb: int = 512, secure: SecureListener | None = None) -> None:
        if nodes not in (1, 3):
            raise ValueError("a local Kafka has 1 node or 3 (replication 3, min.insync.replicas 2)")
        self.data_dir = Path(data_dir).resolve()
        self.size = nodes
        self.extra_settings = dict(settings or {})
        self.heap_mb = heap_mb
        self.secure = secure
        self.cluster_id = ""
        self.nodes: list[KafkaNode] = []

    # -- layout ----------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(n.address for n in self.nodes)

    @property
    def secure_bootstrap_servers(self) -> str:
        """The SASL_SSL listeners (with `secure`)."""
        return ",".join(n.secure_address for n in self.nodes if n.secure_address)

    @property
    def log_path(self) -> Path:
        return self.nodes[0].folder / "server.log"

    @property
    def pids(self) -> list[int]:
        """The running nodes' JVM process ids, in node order (CPU and memory accounting)."""
        return [n.pid for n in self.nodes if n.pid is not None]

    def _load_or_create_layout(self) -> None:
        """Cluster id and ports are chosen once and kept in `cluster.json`: a restarted node must
        come back where its peers and the clients' metadata expect it."""
        manifest = self.data_dir / "cluster.json"
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            if saved.get("nodes") and len(saved["nodes"]) != self.size:
                raise BrokerUnavailable(f"{self.data_dir} holds a {len(saved['nodes'])}-node Kafka cluster, "
                                        f"not {self.size}; use another folder")
            if saved.get("version") != KAFKA_VERSION:
                raise BrokerUnavailable(f"{self.data_dir} was written by Kafka {saved.get('version')}, this is "
                                        f"{KAFKA_VERSION}; use another folder (or delete it)")
            self.cluster_id = saved["cluster_id"]
            self.nodes = [KafkaNode(n["node_id"], n["port"], n["controller_port"], self.data_dir / f"node-{n['node_id']}",
                                    n.get("secure_port")) for n in saved["nodes"]]
            if bool(self.secure) != all(n.secure_port for n in self.nodes):
                raise BrokerUnavailable(f"{self.data_dir} was made {'without' if self.secure else 'with'} a SASL_SSL "
                                        "listener; use another folder")
            return
        self.cluster_id = new_cluster_id()
        self.nodes = [KafkaNode(i, free_port(), free_port(), self.data_dir / f"node-{i}",
                                free_port() if self.secure else None) for i in range(1, self.size + 1)]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({
            "cluster_id": self.cluster_id, "version": KAFKA_VERSION,
            "nodes": [{"node_id": n.node_id, "port": n.port, "controller_port": n.controller_port,
                       **({"secure_port": n.secure_port} if n.secure_port else {})} for n in self.nodes],
        }, indent=2))

    def _server_properties(self, node: KafkaNode) -> str:
        secure = f",SASL_SSL://{node.secure_address}" if self.secure else ""
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes),
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}{secure}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}{secure}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
                                              + (",SASL_SSL:SASL_SSL" if self.secure else ""),
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(node.folder / "data"),
            **cluster_settings(self.size),
            **_LOCAL_SETTINGS,
            **(self.secure.settings() if self.secure else {}),
            **self.extra_settings,
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    # -- life cycle ------------------------------------------------------------------------

    def start(self, timeout: float = 120.0, progress=lambda line: None) -> LocalKafka:
        lib = kafka_libs(progress)
        check_java()
        self._load_or_create_layout()
        for node in self.nodes:
            node.folder.mkdir(parents=True, exist_ok=True)
            (node.folder / "server.properties").write_text(self._server_properties(node))
            (node.folder / "log4j2.yaml").write_text(_LOG4J2)
            if not (node.folder / "data" / "meta.properties").exists():
                self._format(lib, node)
        progress(f"starting Apache Kafka {KAFKA_VERSION} ({self.size} node{'s' if self.size > 1 else ''}) "
                 f"on {self.bootstrap_servers}")
        atexit.register(self.stop)
        for node in self.nodes:
            self._spawn(lib, node)
        self.wait_ready(timeout)
        return self

    def _java(self, lib: Path, node: KafkaNode, main: str, *args: str) -> list[str]:
        # The JVM's scratch files stay in the node's folder: lz4-java unpacks a native library
        # into java.io.tmpdir and the JVM writes /tmp/hsperfdata_*, both left in /tmp by a node
        # that is SIGKILLed (the chaos tests do that dozens of times).
        scratch = node.folder / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        return ["java", f"-Xms{min(256, self.heap_mb)}m", f"-Xmx{self.heap_mb}m", "-XX:+UseG1GC",
                "-XX:-UsePerfData", f"-Djava.io.tmpdir={scratch}",
                "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={node.folder / 'log4j2.yaml'}",
                f"-Dkafka.logs.dir={node.folder}", "-cp", f"{lib}/*", main, *args]

    def _format(self, lib: Path, node: KafkaNode) -> None:
        result = subprocess.run(
            self._java(lib, node, "kafka.tools.StorageTool", "format", "-t", self.cluster_id,
                       "-c", str(node.folder / "server.properties"),
                       *(self.secure.scram_arguments() if self.secure else [])),
            capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            tail = " ".join((result.stdout + result.stderr).split())[-300:]
            raise BrokerUnavailable(f"formatting Kafka node {node.node_id} in {node.folder} failed: {tail}")

    def _spawn(self, lib: Path, node: KafkaNode) -> None:
        if node.running:
            return
        if node.log is None:
            node.log = open(node.folder / "server.log", "ab", buffering=0)
        node.proc = subprocess.Popen(
            self._java(lib, node, "kafka.Kafka", str(node.folder / "server.properties")),
            stdin=subprocess.DEVNULL, stdout=node.log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            # Own session: Ctrl-C in a terminal must not stop the brokers before the services
            # have committed and left their groups.
            start_new_session=True,
        )
        node.frozen = False

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every running node answers and the cluster has registered them all."""
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        running = [n for n in self.nodes if n.running]
        for node in running:
            while True:
                code = node.proc.poll()
                if code is not None:
                    raise PortTaken(f"Kafka node {node.node_id} exited with code {code} while starting on "
                                    f"{node.address}; see {node.folder / 'server.log'}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnavailable(f"Kafka node {node.node_id} did not answer on {node.address} within "
                                            f"{timeout:g}s; see {node.folder / 'server.log'}")
                try:
                    found = wait_for_broker(node.address, timeout=max(0.5, min(2.0, remaining)))
                except BrokerUnavailable:
                    continue
                if found != self.cluster_id:
                    raise PortTaken(f"the broker on {node.address} has cluster id {found!r}, expected "
                                    f"{self.cluster_id!r}: the port is taken by another broker")
                break
        admin = AdminClient({"bootstrap.servers": ",".join(n.address for n in running), "log_level": 0})
        wanted = {n.node_id for n in running}
        while True:
            try:
                registered = set(admin.list_topics(timeout=5).brokers)
            except Exception:
                registered = set()
            if wanted <= registered:
                return
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"Kafka nodes {sorted(wanted - registered)} did not register within "
                                        f"{timeout:g}s; see their server.log under {self.data_dir}")
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """Controlled shutdown of every node at once (SIGTERM), SIGKILL past `timeout`. Idempotent."""
        for node in self.nodes:
            if node.running:
                if node.frozen:
                    os.kill(node.proc.pid, signal.SIGCONT)
                node.proc.terminate()
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
                node.proc = None
            if node.log is not None:
                node.log.close()
                node.log = None
        atexit.unregister(self.stop)

    # -- failures, for the chaos and outage tests ------------------------------------------

    def node(self, node_id: int) -> KafkaNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node: no controlled shutdown, the page cache is all it leaves."""
        node = self.node(node_id)
        if node.running:
            node.proc.kill()
            node.proc.wait()
        node.proc, node.frozen = None, False

    def freeze(self, node_id: int) -> None:
        """SIGSTOP one node: its sockets stay open and nothing answers (a GC pause, a hung VM)."""
        node = self.node(node_id)
        os.kill(node.proc.pid, signal.SIGSTOP)
        node.frozen = True

    def thaw(self, node_id: int) -> None:
        node = self.node(node_id)
        os.kill(node.proc.pid, signal.SIGCONT)
        node.frozen = False

    def restart(self, node_id: int, timeout: float = 120.0) -> None:
        """Start a stopped or killed node again and wait until the cluster has it back."""
        self._spawn(kafka_libs(), self.node(node_id))
        self.wait_ready(timeout)

    def leader_of(self, topic: str, partition: int = 0, timeout: float = 30.0) -> int:
        """The node id leading `topic`'s partition, as the cluster's metadata says now.

        The node asked may not have the partition in its metadata cache yet (a topic just
        created, or a leader just moved), so this asks again until one names a leader."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": ",".join(n.address for n in self.nodes if n.running),
                             "log_level": 0})
        deadline = time.monotonic() + timeout
        while True:
            topics = admin.list_topics(topic, timeout=10).topics
            known = topics[topic].partitions.get(partition) if topic in topics else None
            if known is not None and known.leader >= 0:
                return known.leader
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"no node names a leader for {topic}[{partition}] after {timeout:.0f} s")
            time.sleep(0.2)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        up = sum(n.running for n in self.nodes)
        return f"LocalKafka({self.bootstrap_servers or self.data_dir}, {up}/{self.size} nodes running)"
