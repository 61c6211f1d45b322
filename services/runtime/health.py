"""`/healthz`, `/readyz` and `/metrics` for a service process, from a tiny HTTP server on a daemon
thread (stdlib `http.server`), so the consumer loop and the relay never serve HTTP themselves.

- `/healthz` (liveness): the process is not stuck. 200 unless a liveness check fails (the
  consumer loop stopped polling, the relay thread died); a restart is then the cure.
- `/readyz` (readiness): 200 only when the broker answers a metadata request and the database
  answers `SELECT 1`. The answer is cached for `cache_s`, so probes and scrapers cannot turn
  into a load on Kafka or the database.
- `/metrics`: prometheus-client's default registry (the runtime's counters, histograms, lag
  and backlog gauges, and the process collector).

A check is a callable that returns when healthy and raises with the reason otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger(__name__)

Check = Callable[[], None]


def kafka_check(client_config: Mapping[str, object], timeout_s: float = 2.0) -> Check:
    """The broker answers a metadata request. Its own AdminClient (built on first use, then
    kept): the service's consumer is never touched from this thread."""
    admin = None
    lock = threading.Lock()

    def check() -> None:
        nonlocal admin
        from confluent_kafka.admin import AdminClient

        with lock:
            if admin is None:
                admin = AdminClient({**client_config, "client.id": "orderpipe-health"})
            metadata = admin.list_topics(timeout=timeout_s)
        if not metadata.brokers:
            raise RuntimeError("metadata answer lists no brokers")

    return check


def database_check(url: str, timeout_s: float = 2.0) -> Check:
    """The database answers `SELECT 1`, on a one-connection engine of its own: a plain SQLite
    connection (the service's engine begins every transaction with BEGIN IMMEDIATE, which would
    queue behind the consumer's write lock) and a short connect timeout on PostgreSQL."""
    from sqlalchemy import create_engine, text

    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": timeout_s, "check_same_thread": False})
    else:
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        engine = create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True, pool_timeout=timeout_s,
                               connect_args={"connect_timeout": max(1, round(timeout_s))})

    def check() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    return check


def thread_check(thread: threading.Thread) -> Check:
    def check() -> None:
        if not thread.is_alive():
            raise RuntimeError(f"thread {thread.name} has stopped")

    return check


class Health:
    def __init__(self, ready: Mapping[str, Check], live: Mapping[str, Check] | None = None, *,
                 cache_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.ready_checks = dict(ready)
        self.live_checks = dict(live or {})
        self.cache_s = cache_s
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, bool, dict[str, str]] | None = None

    @staticmethod
    def _run(checks: Mapping[str, Check]) -> tuple[bool, dict[str, str]]:
        results: dict[str, str] = {}
        for name, check in checks.items():
            try:
                check()
                results[name] = "ok"
            except Exception as exc:
                results[name] = f"{type(exc).__name__}: {exc}"[:500]
        return all(v == "ok" for v in results.values()), results

    def ready(self) -> tuple[bool, dict[str, str]]:
        with self._lock:  # one probe at a time runs the checks; the others read its answer
            now = self.clock()
            if self._cached is None or now - self._cached[0] >= self.cache_s:
                ok, results = self._run(self.ready_checks)
                self._cached = (self.clock(), ok, results)
                if not ok:
                    log.warning("not ready", extra={"checks": results})
            return self._cached[1], self._cached[2]

    def live(self) -> tuple[bool, dict[str, str]]:
        return self._run(self.live_checks)


class HealthServer:
    """The HTTP server on its daemon thread; `port` is the bound one (pass 0 to let the OS pick)."""

    def __init__(self, health: Health, host: str = "127.0.0.1", port: int = 9100):
        handler = type("Handler", (_Handler,), {"health": health})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HealthServer:
        self.thread.start()
        log.info("health server listening", extra={"url": self.url})
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    health: Health

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, checks = self.health.live() if path == "/healthz" else self.health.ready()
            body = {"status": ("ok" if path == "/healthz" else "ready") if ok else "unavailable", "checks": checks}
            self._send(200 if ok else 503, json.dumps(body).encode(), "application/json")
        else:
            self._send(404, b'{"detail": "not found"}', "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # probes every few seconds: not worth a log line
        pass


def start_health_server(settings, database_url: str, live: Mapping[str, Check] | None = None) -> HealthServer | None:
    """A process's health server on ORDERPIPE_HEALTH_HOST:ORDERPIPE_HEALTH_PORT, ready when its
    broker (with ORDERPIPE_KAFKA_CLIENT_CONFIG: the same security settings) and its database
    answer; None when the port is 0 (turned off)."""
    from services.runtime.errors import Misconfigured
    from services.runtime.kafka import base_config

    if settings.health_port == 0:
        return None
    ready = {"kafka": kafka_check(base_config(settings)), "database": database_check(database_url)}
    try:
        server = HealthServer(Health(ready, live), settings.health_host, settings.health_port)
    except OSError as exc:  # the port is taken, or not this process's to bind
        raise Misconfigured(
            f"the health server cannot listen on {settings.health_host}:{settings.health_port} "
            f"({exc.strerror or exc}): set ORDERPIPE_HEALTH_PORT to a free port, or to 0 to turn it off") from None
    return server.start()
