"""The whole pipeline as supervised processes: what `orderpipe up` and `orderpipe demo` start.

Broker (a local one of the chosen kind, embedded Tansu or Apache Kafka, unless
KAFKA_BOOTSTRAP_SERVERS points at a cluster), topics, SMTP sink, the orders API and
relay, the consumer services (every process services/registry.py declares), the Faust
order-status worker and the operators' web console. Every child dies with us
(PR_SET_PDEATHSIG), and `stop()` ends them gracefully.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services import registry
from services.console.auth import hash_password
from services.runtime.admin import ensure_topics
from services.tools.brokers import LocalBroker, free_port, local_broker, wait_for_broker
from services.runtime.settings import Settings
from services.tools.supervisor import ProcessSpec, Supervisor

MARKER = "cluster.json"


class StackError(RuntimeError):
    """A problem the user can fix; the message says how."""


@dataclass
class StackInfo:
    bootstrap_servers: str
    cluster_id: str
    embedded: bool
    broker: str  # "embedded" | "kafka" (started here) | "external"
    data_dir: Path
    api_url: str
    status_url: str
    smtp: str | None
    maildir: Path | None
    log_dir: Path
    processes: dict[str, int] = field(default_factory=dict)
    # process -> base URL of its /healthz, /readyz, /metrics (orders-api and order-status serve
    # them on their own ports: api_url, status_url)
    health: dict[str, str] = field(default_factory=dict)
    console_url: str = ""
    # The operator `up` made for its console when ORDERPIPE_CONSOLE_USERS was not set: (name, password).
    console_login: tuple[str, str] | None = None


def check_data_dir(data_dir: Path, cluster_id: str, embedded: bool, fresh: bool) -> None:
    """Refuse to run on databases that belong to another broker.

    The embedded broker keeps everything in memory, so a new one has none of the events that
    old databases' outbox rows were marked "sent" for: running on them would lose orders
    silently. The same holds for a different real cluster.
    """
    marker = data_dir / MARKER
    has_state = data_dir.exists() and any(p.suffix == ".db" for p in data_dir.iterdir())
    if fresh and data_dir.exists():
        shutil.rmtree(data_dir)
        has_state = False
    if has_state:
        known = json.loads(marker.read_text())["cluster_id"] if marker.exists() else None
        if known != cluster_id:
            what = ("the embedded broker keeps events in memory only, so the events behind these databases are gone"
                    if embedded else f"they were written against Kafka cluster {known}, not {cluster_id}")
            raise StackError(
                f"data folder {data_dir} holds databases from an earlier run and {what}. "
                f"Run again with --fresh to start from a clean data folder (this deletes {data_dir}), "
                "or use another --data-dir; for durable runs use --broker kafka (a local Apache Kafka in the data "
                "folder) or point KAFKA_BOOTSTRAP_SERVERS at a Kafka cluster.")
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"cluster_id": cluster_id, "embedded": embedded}))


class Stack:
    def __init__(self, settings: Settings, *, data_dir: Path, broker: str = "embedded", fresh: bool = False,
                 api_port: int | None = None, status_port: int | None = None, console_port: int | None = None,
                 smtp_sink: bool = True,
                 extra_env: dict[str, str] | None = None, process_env: dict[str, dict[str, str]] | None = None,
                 progress=lambda line: None):
        self.settings = settings
        self.broker_kind = broker  # which local broker to start when KAFKA_BOOTSTRAP_SERVERS is unset
        self.progress = progress
        self.data_dir = data_dir.resolve()
        self.fresh = fresh
        self.api_port = api_port or free_port()
        self.status_port = status_port or free_port()
        self.console_port = console_port or free_port()
        self.smtp_sink = smtp_sink
        self.extra_env = extra_env or {}
        # per process, over the rest: e.g. each process its own Kafka user (ORDERPIPE_KAFKA_CLIENT_CONFIG)
        self.process_env = process_env or {}
        self.broker: LocalBroker | None = None
        self.supervisor: Supervisor | None = None
        self.info: StackInfo | None = None

    def start(self, timeout: float = 60.0) -> StackInfo:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> StackInfo:
        log_dir = self.data_dir / "logs"
        if self.settings.kafka_bootstrap_servers:
            kind, embedded = "external", False
            bootstrap = self.settings.kafka_bootstrap_servers
            cluster_id = wait_for_broker(bootstrap, timeout=15, client_config=self.settings.extra_client_config)
        else:
            if self.fresh and self.data_dir.exists():
                shutil.rmtree(self.data_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            # Apache Kafka keeps its logs in the data folder, beside the databases they belong to.
            self.broker = local_broker(self.broker_kind, self.data_dir / "kafka" if self.broker_kind == "kafka" else log_dir)
            kind, embedded = self.broker.kind, self.broker.embedded
            if embedded and any(p.suffix == ".db" for p in self.data_dir.iterdir()):
                # check before starting anything: a new embedded broker is always new
                check_data_dir(self.data_dir, "a new embedded broker", True, False)
            self.broker.start(progress=self.progress)
            bootstrap, cluster_id = self.broker.bootstrap_servers, self.broker.cluster_id
        check_data_dir(self.data_dir, cluster_id, embedded, fresh=False)
        log_dir.mkdir(parents=True, exist_ok=True)
        ensure_topics({"bootstrap.servers": bootstrap, **self.settings.extra_client_config}, registry.all_topics())

        api_url = f"http://127.0.0.1:{self.api_port}"
        status_url = f"http://127.0.0.1:{self.status_port}"
        env = {
            **(self.broker.client_env if self.broker else {}),
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "ORDERPIPE_DATA_DIR": str(self.data_dir),
            "ORDERPIPE_STATUS_URL": status_url,
            "ORDERPIPE_API_PORT": str(self.api_port),
            **self.extra_env,
        }
        smtp = maildir = None
        self.supervisor = Supervisor(log_dir)
        py = sys.executable
        if self.smtp_sink:
            smtp_port = free_port()
            maildir = self.data_dir / "maildir"
            env.update(ORDERPIPE_SMTP_HOST="127.0.0.1", ORDERPIPE_SMTP_PORT=str(smtp_port))
            smtp = f"127.0.0.1:{smtp_port}"
            self.supervisor.start(ProcessSpec("smtp-sink", [py, "-m", "services.email.smtp_sink", "--maildir",
                                                            str(maildir), "--port", str(smtp_port)], env,
                                              stop_last=True))
        health: dict[str, str] = {}
        for name, process in registry.processes().items():  # every service's processes, as declared
            process_env = env
            if process.health_port:  # one machine, several processes: each its own health port
                health_port = free_port()
                health[name] = f"http://127.0.0.1:{health_port}"
                process_env = {**env, "ORDERPIPE_HEALTH_HOST": "127.0.0.1", "ORDERPIPE_HEALTH_PORT": str(health_port)}
            self.supervisor.start(ProcessSpec(name, [py, "-m", "services.cli.main", "run", name],
                                              {**process_env, **self.process_env.get(name, {})}))
        self.supervisor.start(ProcessSpec("order-status", [
            py, "-m", "streams.order_status", "--bootstrap-servers", bootstrap,
            "--data-dir", str(self.data_dir / "order-status"), "--web-port", str(self.status_port)],
            {**env, **self.process_env.get("order-status", {})}))

        console_url = f"http://127.0.0.1:{self.console_port}"
        console_env, console_login = {**env, "ORDERPIPE_CONSOLE_PORT": str(self.console_port)}, None
        if not (env.get("ORDERPIPE_CONSOLE_USERS") or os.environ.get("ORDERPIPE_CONSOLE_USERS")):
            # A local stack gets one operator with a password of its own, printed by `up`.
            console_login = ("admin", secrets.token_urlsafe(12))
            console_env["ORDERPIPE_CONSOLE_USERS"] = f"admin:operator:{hash_password(console_login[1])}"
        self.supervisor.start(ProcessSpec("ops-console", [py, "-m", "services.console"],
                                          {**console_env, **self.process_env.get("ops-console", {})}))

        self._wait_http(f"{api_url}/healthz", "orders-api", timeout)
        self._wait_http(f"{status_url}/status/", "order-status", timeout)
        self._wait_http(f"{console_url}/healthz", "ops-console", timeout)
        self.info = StackInfo(bootstrap, cluster_id, embedded, kind, self.data_dir, api_url, status_url, smtp, maildir,
                              log_dir, self.supervisor.pids(), health, console_url, console_login)
        return self.info

    def _wait_http(self, url: str, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = self.supervisor.poll() if self.supervisor else []
            if name in dead:
                raise StackError(f"{name} failed to start; see {self.data_dir / 'logs' / (name + '.log')}")
            try:
                if httpx.get(url, timeout=1.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise StackError(f"{name} did not answer at {url} within {timeout:.0f} s; "
                         f"see {self.data_dir / 'logs' / (name + '.log')}")

    def stop(self) -> None:
        if self.supervisor:
            self.supervisor.stop_all()
            self.supervisor = None
        if self.broker:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> StackInfo:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

