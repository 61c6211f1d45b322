"""Is a Kafka-protocol broker answering? Shared by both local brokers and by `orderpipe up` on
an external cluster: nothing here depends on which broker answers."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path


class BrokerUnavailable(RuntimeError):
    """No broker answered, or a local broker could not be started."""


class PortTaken(BrokerUnavailable):
    """Our broker could not have the port (it exited, or another broker answers there)."""


def _ephemeral_ports() -> range:
    """The ports the OS hands to outgoing connections and to listeners bound to port 0."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, for a server started a moment later.

    Picked below the ephemeral range when there is room: a port from that range can be taken in
    between by any process's outgoing connection (a service `up` started failed three times in
    a row with "Address already in use" on its health port), where below it only another
    listener picking the same port could take it. Never the same port twice in a process: a
    stack picks a dozen ports before its servers bind any, and once gave inventory's health
    server and the order-status worker the same one (the worker could not start)."""
    with _handed_out_lock:
        port = _pick_unbound_port()
        _handed_out.add(port)
        return port


def _picking_range() -> range | None:
    """Where free_port picks: ORDERPIPE_TEST_PORT_RANGE (`LOW-HIGH`) when set; else from
    _LOWEST_PICKED up to the ephemeral range, if there is room (None: leave it to the OS).
    `make test` gives each of its side-by-side passes a range of its own (tests/broker_passes.sh):
    two processes picking from one range can hand out the same still-unbound port, which
    `_handed_out` only prevents within a process."""
    configured = os.environ.get(PORT_RANGE_VARIABLE, "").strip()
    if not configured:
        below = range(_LOWEST_PICKED, _ephemeral_ports().start)
        return below if len(below) > 1000 else None
    low, _, high = configured.partition("-")
    try:
        picked = range(int(low), int(high) + 1)
    except ValueError:
        picked = range(0)
    if not (1024 <= picked.start and picked.stop <= 65536 and len(picked) >= 100):
        raise ValueError(f"{PORT_RANGE_VARIABLE}={configured!r}: expected LOW-HIGH, at least 100 ports "
                         "between 1024 and 65535, e.g. 20000-26000")
    return picked


def _pick_unbound_port() -> int:
    picking = _picking_range()
    if picking is not None:
        for _ in range(100):
            port = _random.randrange(picking.start, picking.stop)
            if port not in _handed_out and _bindable(port):
                return port
    while True:  # the OS's choice, from the ephemeral range
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            return port


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


PORT_RANGE_VARIABLE = "ORDERPIPE_TEST_PORT_RANGE"
_LOWEST_PICKED = 20000  # above the well-known and most registered servers' ports (PostgreSQL 5432, ...)
_handed_out: set[int] = set()  # every port free_port returned in this process
_handed_out_lock = threading.Lock()
_random = random.SystemRandom()  # not the seeded module generator: processes started together must differ


def _probe(bootstrap_servers: str, timeout: float, client_config: dict[str, str] | None = None) -> str:
    """One metadata request; return the cluster id or raise with the reason."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # A plain TCP connect first: it fails fast and quietly while the broker is still binding,
    # where librdkafka would log a "Connection refused" line to stderr on every attempt. Any
    # listed server will do: in a cluster, some may be down.
    errors = []
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
                break
        except OSError as exc:
            errors.append(exc)
    else:
        raise errors[-1]
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, **(client_config or {}), "log_level": 0})
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise OSError(str(exc.args[0]) if exc.args else str(exc)) from exc
    return metadata.cluster_id or ""


def wait_for_broker(bootstrap_servers: str, timeout: float = 30.0, client_config: dict[str, str] | None = None) -> str:
    """Block until a metadata request answers; return the cluster id. `client_config`: the
    clients' TLS and SASL settings (ORDERPIPE_KAFKA_CLIENT_CONFIG), when the listener wants them.

    Raises BrokerUnavailable with a one-line message when nothing answers within `timeout`.
    """
    deadline = time.monotonic() + timeout
    last_error = "no attempt made"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerUnavailable(
                f"no Kafka broker answered at {bootstrap_servers} within {timeout:g}s "
                f"(last error: {last_error})"
            )
        try:
            return _probe(bootstrap_servers, min(remaining, 2.0), client_config)
        except (OSError, ValueError) as exc:
            last_error = str(exc) or type(exc).__name__
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
