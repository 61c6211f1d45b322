"""Fix 6 of the order-status transport (streams/order_status/transport.py), on the run's broker.

The worker creates topics as it starts and joined its group at once; when a busy broker had not
given a new topic's partitions a leader yet, the assignment left the topic out and the group
rebalanced ~10 s later, when a metadata refresh saw it: a view ready moments before answered 503
(seen twice in the e2e tests on Apache Kafka). The worker now waits until every subscribed topic
is readable before it joins: `wait_until_topics_readable`, here against the real broker.
"""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaClient

from services.runtime.admin import ensure_topics
from services.runtime.topology import TopicSpec
from streams.order_status.transport import wait_until_topics_readable


def _name() -> str:
    return f"join-test-{uuid.uuid4().hex[:8]}"


def _wait(bootstrap: str, topics: list[str], timeout: float,
          create_after_first_look: tuple[str, ...] = ()) -> tuple[set[str], bool]:
    """What the wait reports missing, and whether the late topics had been created by then."""
    async def scenario() -> tuple[set[str], bool]:
        client = AIOKafkaClient(bootstrap_servers=bootstrap)
        await client.bootstrap()
        created = asyncio.Event()

        async def create_late() -> None:
            await asyncio.sleep(0.5)  # the wait has looked at least once and found them missing
            await asyncio.to_thread(ensure_topics, {"bootstrap.servers": bootstrap},
                                    [TopicSpec(t, partitions=3) for t in create_after_first_look])
            created.set()

        creator = asyncio.create_task(create_late()) if create_after_first_look else None
        try:
            missing = await wait_until_topics_readable(client, topics, timeout=timeout, interval=0.1)
            return missing, created.is_set()
        finally:
            if creator is not None:
                await creator
            await client.close()

    return asyncio.run(scenario())


def test_topics_that_exist_are_readable_at_once(kafka_bootstrap: str) -> None:
    topics = [_name(), _name()]
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, [TopicSpec(t, partitions=3) for t in topics])
    missing, _ = _wait(kafka_bootstrap, topics, timeout=30)
    assert missing == set()


def test_the_wait_lasts_until_a_topic_created_meanwhile_is_readable(kafka_bootstrap: str) -> None:
    existing, late = _name(), _name()
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, [TopicSpec(existing, partitions=3)])
    missing, late_created = _wait(kafka_bootstrap, [existing, late], timeout=60, create_after_first_look=(late,))
    assert missing == set()
    assert late_created, "the wait returned before the late topic was even created"


def test_a_topic_that_never_comes_is_reported_missing_after_the_timeout(kafka_bootstrap: str) -> None:
    existing, never = _name(), _name()
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, [TopicSpec(existing, partitions=3)])
    missing, _ = _wait(kafka_bootstrap, [existing, never], timeout=1.0)
    assert missing == {never}
