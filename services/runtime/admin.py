"""Topic administration from the topology declaration."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from services.runtime.topology import TopicSpec, all_topics


@dataclass(frozen=True)
class TopicResult:
    name: str
    created: bool  # False: it already existed


def ensure_topics(bootstrap_config: dict, specs: list[TopicSpec] | None = None,
                  timeout: float = 30.0) -> list[TopicResult]:
    """Create the declared topics; existing ones are left as they are (idempotent)."""
    specs = all_topics() if specs is None else specs
    admin = AdminClient(bootstrap_config)
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=-1, config=s.config()) for s in specs],
        request_timeout=timeout,
    )
    results = []
    for name, future in futures.items():
        try:
            future.result(timeout)
            results.append(TopicResult(name, True))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            results.append(TopicResult(name, False))
    return sorted(results, key=lambda r: r.name)
