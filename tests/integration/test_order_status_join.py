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


class _CountingClient:
    """The aiokafka client, counting the wait's looks at the metadata and remembering which of
    `watched` the first look found readable."""

    def __init__(self, client: AIOKafkaClient, watched: tuple[str, ...]) -> None:
        self._client = client
        self._watched = watched
        self.looks = 0
        self.first_look_had: set[str] = set()
        self.first_look_done = asyncio.Event()

    async def fetch_all_metadata(self):
        cluster = await self._client.fetch_all_metadata()
        self.looks += 1
        if not self.first_look_done.is_set():
            self.first_look_had = {t for t in self._watched if cluster.available_partitions_for_topic(t)}
            self.first_look_done.set()
        return cluster


def _wait(bootstrap: str, topics: list[str], timeout: float,
          create_after_first_look: tuple[str, ...] = ()) -> tuple[set[str], _CountingClient]:
    """What the wait reports missing, and its client (how often and what it looked at). Topics in
    `create_after_first_look` are created once the wait has looked at the metadata once."""
    async def scenario() -> tuple[set[str], _CountingClient]:
        client = AIOKafkaClient(bootstrap_servers=bootstrap)
        await client.bootstrap()
        counting = _CountingClient(client, create_after_first_look)

        async def create_late() -> None:
            await counting.first_look_done.wait()
            await asyncio.to_thread(ensure_topics, {"bootstrap.servers": bootstrap},
                                    [TopicSpec(t, partitions=3) for t in create_after_first_look])

        creator = asyncio.create_task(create_late()) if create_after_first_look else None
        try:
            return await wait_until_topics_readable(counting, topics, timeout=timeout, interval=0.1), counting
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
    missing, client = _wait(kafka_bootstrap, [existing, late], timeout=60, create_after_first_look=(late,))
    assert client.first_look_had == set()  # the wait's first look found the late topic missing...
    assert missing == set() and client.looks >= 2  # ...and it kept looking until the topic was readable


def test_a_topic_that_never_comes_is_reported_missing_after_the_timeout(kafka_bootstrap: str) -> None:
    existing, never = _name(), _name()
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, [TopicSpec(existing, partitions=3)])
    missing, _ = _wait(kafka_bootstrap, [existing, never], timeout=1.0)
    assert missing == {never}
