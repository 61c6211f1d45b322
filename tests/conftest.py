"""Shared fixtures: one Kafka-protocol broker per session, and fresh databases per test.

Broker, in order of preference:
1. `KAFKA_BOOTSTRAP_SERVERS`, when set (a real cluster: CI or a developer's docker-compose);
2. a testcontainers `KafkaContainer`, when a Docker engine answers within a few seconds;
3. the embedded Tansu broker (`services.runtime.broker.EmbeddedBroker`), memory only.
The choice is shown in the pytest header and again in the summary.

Tests share that broker, so each one uses its own consumer group and, where it reads its own
input, its own topics (`private_group`). Database tests take `database_url`, which runs them
once on SQLite and once on PostgreSQL.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from services.runtime.admin import ensure_topics
from services.runtime.db import make_engine
from services.runtime.settings import Settings
from services.runtime.topology import ConsumerGroup, TopicSpec

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# -- broker -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerPlan:
    kind: str  # "external" | "testcontainers" | "embedded"
    detail: str


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


@functools.cache
def broker_plan() -> BrokerPlan:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if bootstrap:
        return BrokerPlan("external", f"KAFKA_BOOTSTRAP_SERVERS={bootstrap}")
    if _docker_answers():
        return BrokerPlan("testcontainers", "Kafka in a testcontainers KafkaContainer")
    return BrokerPlan("embedded", "embedded Tansu broker (no KAFKA_BOOTSTRAP_SERVERS, no Docker engine)")


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

        container = KafkaContainer().start()
        bootstrap, stop = container.get_bootstrap_server(), container.stop
    else:
        from services.runtime.broker import EmbeddedBroker

        broker = EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log").start()
        bootstrap, stop = broker.bootstrap_servers, broker.stop
    _chosen.update(kind=plan.kind, bootstrap=bootstrap)
    try:
        ensure_topics({"bootstrap.servers": bootstrap})
        yield bootstrap
    finally:
        gc.collect()  # destroy the tests' leftover clients first: no reconnect noise from them
        stop()


def settings_for(bootstrap: str, **overrides) -> Settings:
    """Settings for clients in tests: short group timeouts, so the first assignment comes fast
    (Tansu waits the rebalance timeout before it assigns) and a closed consumer leaves promptly."""
    values = {"max_poll_interval_ms": 2_000, "session_timeout_ms": 2_000, "consumer_batch_size": 100,
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
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return url


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A fresh, empty database for one test: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    base_url = request.getfixturevalue("postgres_url")
    name = f"orderpipe_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(base_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield f"{base_url.rsplit('/', 1)[0]}/{name}"
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


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
