"""Topic administration: create the topics the caller declares (`registry.all_topics()` for the pipeline's)."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from services.runtime.topology import TopicSpec


@dataclass(frozen=True)
class TopicResult:
    name: str
    created: bool  # False: it already existed


def ensure_topics(bootstrap_config: dict, specs: list[TopicSpec], timeout: float = 30.0) -> list[TopicResult]:
    """Create these topics; existing ones are left as they are (idempotent)."""
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
