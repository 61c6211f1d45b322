"""Shared fixtures: one Kafka-protocol broker per session, and fresh databases per test.

The broker is picked with `--broker` (or `ORDERPIPE_TEST_BROKER`): `make test` runs the
integration and e2e tiers once with each.
- `embedded` (default): the Tansu broker (`services.tools.brokers.EmbeddedBroker`), memory only;
- `kafka`: Apache Kafka, one KRaft node: a testcontainers `KafkaContainer` of the pinned version
  when a Docker engine answers within a few seconds, else the local Apache Kafka assembled
  from Maven Central (`services.tools.brokers.LocalKafka`);
- `KAFKA_BOOTSTRAP_SERVERS`, when set, overrides both (a cluster you run yourself).
The choice is shown in the pytest header and again in the summary.

Tests share that broker, so each one uses its own consumer group and, where it reads its own
input, its own topics (`private_group`). Database tests take `database_url`, which runs them
once on SQLite and once on PostgreSQL. Tests that need a cluster of their own (three nodes,
broker failures) take `kafka_cluster`.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from sqlalchemy import MetaData, Table, text
from sqlalchemy.engine import Engine

from services import registry
from services.runtime.admin import ensure_topics
from services.tools.brokers import BROKER_KINDS
from services.runtime.db import make_engine, outbox_table
from services.runtime.settings import Settings
from services.runtime.topology import ConsumerGroup, TopicSpec

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BROKERS = BROKER_KINDS


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--broker", choices=BROKERS, default=os.environ.get("ORDERPIPE_TEST_BROKER") or "embedded",
                     help="the broker the integration and e2e tiers run on (default: embedded, or "
                          "ORDERPIPE_TEST_BROKER); KAFKA_BOOTSTRAP_SERVERS overrides it")
    parser.addoption("--broker-bound-only", action="store_true",
                     help="run only the tests that use the run's broker (a fixture in BROKER_FIXTURES); "
                          "`make test` gives it to every broker pass after the first, where the others "
                          "have already run")
    parser.addoption("--apache-kafka-tests", choices=("with", "without", "only"), default="with",
                     help="the tests of what only Apache Kafka does (fixture apache_kafka_only: their own "
                          "clusters, outages, TLS and ACLs): with the others (default), without them, or "
                          "only them. `make test TEST_KAFKA_SPLIT=1` runs its Apache Kafka pass as two processes, one of each")


# A test that asks for none of these talks to no broker of the run (it may start an Apache Kafka
# of its own), so one pass of `make test` runs it, not one per broker.
BROKER_FIXTURES = frozenset({"kafka_bootstrap", "stack_broker", "kafka_cluster", "apache_kafka_only"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def wanted(item: pytest.Item) -> bool:
        fixtures = set(item.fixturenames)
        if config.getoption("--broker-bound-only") and not BROKER_FIXTURES & fixtures:
            return False
        apache_kafka_tests = config.getoption("--apache-kafka-tests")
        if apache_kafka_tests != "with" and ("apache_kafka_only" in fixtures) != (apache_kafka_tests == "only"):
            return False
        return True

    left_out = [item for item in items if not wanted(item)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if wanted(item)]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


# -- broker -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerPlan:
    kind: str  # "external" | "testcontainers" | "local-kafka" | "embedded"
    detail: str

    @property
    def is_apache_kafka(self) -> bool:
        return self.kind in ("testcontainers", "local-kafka")


def _docker_answers(timeout: float = 5.0) -> bool:
    """A quick ping; no engine runs on our machines, so this must fail fast, never hang."""
    try:
        import docker  # testcontainers' dependency
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


_option: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    _option["broker"] = config.getoption("--broker")


@functools.cache
def broker_plan() -> BrokerPlan:
    from services.tools.brokers import KAFKA_VERSION

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if bootstrap:
        return BrokerPlan("external", f"KAFKA_BOOTSTRAP_SERVERS={bootstrap}")
    if _option.get("broker", "embedded") == "embedded":
        return BrokerPlan("embedded", "embedded Tansu broker")
    if _docker_answers():
        return BrokerPlan("testcontainers", f"Apache Kafka {KAFKA_VERSION} in a testcontainers KafkaContainer")
    return BrokerPlan("local-kafka", f"local Apache Kafka {KAFKA_VERSION}, one KRaft node (no Docker engine)")


_chosen: dict[str, str] = {}


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"orderpipe broker: {broker_plan().detail}"]


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _chosen:
        terminalreporter.write_line(f"orderpipe broker used: {_chosen['kind']} at {_chosen['bootstrap']}")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """bootstrap.servers of the session's broker, with every declared topic created."""
    plan = broker_plan()
    stop: Callable[[], None] = lambda: None  # noqa: E731
    if plan.kind == "external":
        bootstrap = os.environ["KAFKA_BOOTSTRAP_SERVERS"].strip()
    elif plan.kind == "testcontainers":
        from testcontainers.kafka import KafkaContainer

        from services.tools.brokers import KAFKA_VERSION

        container = KafkaContainer(f"apache/kafka:{KAFKA_VERSION}").start()
        bootstrap, stop = container.get_bootstrap_server(), container.stop
    else:
        from services.tools.brokers import local_broker

        kind = "kafka" if plan.kind == "local-kafka" else "embedded"
        broker = local_broker(kind, tmp_path_factory.mktemp("broker")).start()
        bootstrap, stop = broker.bootstrap_servers, broker.stop
    _chosen.update(kind=plan.kind, bootstrap=bootstrap)
    try:
        ensure_topics({"bootstrap.servers": bootstrap}, registry.all_topics())
        yield bootstrap
    finally:
        gc.collect()  # destroy the tests' leftover clients first: no reconnect noise from them
        stop()


@pytest.fixture(scope="session")
def stack_broker() -> str:
    """The local broker kind (`Stack(broker=...)`, `orderpipe up --broker`) for e2e tests whose
    pipeline starts a broker of its own, as a user's `orderpipe up` does: the run's broker."""
    return "kafka" if broker_plan().is_apache_kafka else "embedded"


@pytest.fixture
def apache_kafka_only() -> None:
    """For tests of what only Apache Kafka does (compaction, replication, outside clients):
    they run in the `--broker kafka` pass of `make test`."""
    if not broker_plan().is_apache_kafka:
        pytest.skip(f"needs Apache Kafka; this run uses the {broker_plan().detail} (run with --broker kafka)")


@pytest.fixture
def kafka_cluster(tmp_path: Path, apache_kafka_only) -> Iterator[Callable[..., object]]:
    """Factory: a local Apache Kafka of its own for one test, `nodes` 1 or 3, extra broker
    `settings`; stopped (and its folder removed) after the test."""
    from services.tools.brokers import LocalKafka

    clusters: list[LocalKafka] = []

    def make(nodes: int = 3, settings: dict[str, str] | None = None) -> LocalKafka:
        cluster = LocalKafka(tmp_path / f"kafka-{len(clusters)}", nodes=nodes, settings=settings)
        clusters.append(cluster)
        cluster.start()
        ensure_topics({"bootstrap.servers": cluster.bootstrap_servers}, registry.all_topics())
        return cluster

    yield make
    gc.collect()
    for cluster in clusters:
        cluster.stop()
        shutil.rmtree(cluster.data_dir, ignore_errors=True)


def settings_for(bootstrap: str, **overrides) -> Settings:
    """Settings for clients in tests: short group timeouts, so the first assignment comes fast
    (Tansu waits the rebalance timeout before it assigns) and a closed consumer leaves promptly,
    and short fetch waits (Tansu holds every fetch for its whole wait)."""
    values = {"max_poll_interval_ms": 2_000, "session_timeout_ms": 2_000, "consumer_batch_size": 100,
              "fetch_wait_max_ms": 100,
              "relay_poll_interval_s": 0.02, "log_json": False, **overrides}
    return Settings(KAFKA_BOOTSTRAP_SERVERS=bootstrap, **values)


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def private_group(kafka_bootstrap: str) -> Callable[..., ConsumerGroup]:
    """Factory: a consumer group with a unique name reading its own, freshly created input topic
    (plus its retry and dead-letter topics), so no other test's messages can reach it."""

    def make(retry_delays_s: tuple[float, ...] = (1.0,), partitions: int = 1, prefix: str = "test") -> ConsumerGroup:
        name = unique_name(prefix)
        group = ConsumerGroup(name, inputs=(f"{name}.in",), retry_delays_s=retry_delays_s)
        source = group.inputs[0]
        names = [source, *group.retry_topics(source), group.dlt_topic(source)]
        ensure_topics({"bootstrap.servers": kafka_bootstrap}, [TopicSpec(n, partitions=partitions) for n in names])
        return group

    return make


# -- databases --------------------------------------------------------------------------------


def _psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A PostgreSQL server URL (its maintenance database) to create test databases in."""
    import psycopg

    url = os.environ.get("ORDERPIPE_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    try:
        psycopg.connect(_psycopg_url(url), connect_timeout=3).close()
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        message = f"PostgreSQL not reachable at {url} ({type(exc).__name__}: {reason}): set ORDERPIPE_TEST_POSTGRES_URL"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return url


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def database_factory(request: pytest.FixtureRequest, tmp_path) -> Iterator[Callable[[], str]]:
    """Factory: a fresh, empty database per call, SQLite files or new PostgreSQL databases
    (dropped after the test)."""
    made: list[str] = []
    server = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None

    def make() -> str:
        if server is None:
            made.append(f"sqlite:///{tmp_path / f'test-{len(made)}.db'}")
        else:
            name = f"orderpipe_test_{uuid.uuid4().hex[:12]}"
            _admin_statement(server, f'CREATE DATABASE "{name}"')
            made.append(f"{server.rsplit('/', 1)[0]}/{name}")
        return made[-1]

    yield make
    for url in made if server else ():
        _admin_statement(server, f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def _admin_statement(server: str, statement: str) -> None:
    admin = make_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(statement))
    finally:
        admin.dispose()


@pytest.fixture
def database_url(database_factory: Callable[[], str]) -> str:
    """A fresh, empty database for one test: a SQLite file, or a new PostgreSQL database."""
    return database_factory()


@pytest.fixture
def runtime_outbox(database_url: str, test_engine) -> tuple[Engine, Table]:
    """A fresh database (SQLite, then PostgreSQL) holding the runtime's outbox table, and the table."""
    engine = test_engine(database_url)
    table = outbox_table(MetaData())
    table.metadata.create_all(engine)
    return engine, table


def make_test_engine(url: str) -> Engine:
    return make_engine(url)


@pytest.fixture
def test_engine() -> Iterator[Callable[[str], Engine]]:
    """Factory around `make_test_engine` that disposes every engine it made after the test."""
    engines: list[Engine] = []

    def make(url: str) -> Engine:
        engines.append(make_test_engine(url))
        return engines[-1]

    yield make
    for engine in engines:
        engine.dispose()


# -- an alert webhook that records what it receives ---------------------------------------------

class _Webhook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    received: list[dict] = []
    server = HTTPServer(("127.0.0.1", 0), type("Hook", (_Webhook,), {"received": received}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", received
    server.shutdown()
    server.server_close()
