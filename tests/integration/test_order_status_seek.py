"""Fix 5 of the order-status transport (streams/order_status/transport.py), on the run's broker.

Faust drops records it fetched while the assignment changes, and counts on the seek to the
committed offsets at the end of every recovery to read them again. aiokafka's
`seek_to_committed` leaves a partition with nothing committed where it is, i.e. past the dropped
records: a worker that joined during a burst then never folded them (the two-workers test under
load; a stock.rejected partition after a broker failure). `seek_to_committed_or_beginning` puts
such a partition back at its beginning and leaves the others at their committed offsets.
"""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from confluent_kafka import Producer

from services.runtime.admin import ensure_topics
from services.runtime.topology import TopicSpec
from streams.order_status.transport import seek_to_committed_or_beginning

RECORDS = 5


def _topic_with_records(bootstrap: str) -> str:
    topic = f"seek-test-{uuid.uuid4().hex[:8]}"
    ensure_topics({"bootstrap.servers": bootstrap}, [TopicSpec(topic, partitions=2)])
    producer = Producer({"bootstrap.servers": bootstrap})
    for partition in (0, 1):
        for n in range(RECORDS):
            producer.produce(topic, key=b"k", value=str(n).encode(), partition=partition)
    assert producer.flush(30) == 0
    return topic


async def _read_to_the_end(consumer: AIOKafkaConsumer, parts: list[TopicPartition]) -> None:
    """Consume every record without handing it on: where a worker's positions are after Faust
    dropped what it fetched."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while [await consumer.position(tp) for tp in parts] != [RECORDS] * len(parts):
        assert loop.time() < deadline, "the records never arrived"
        await consumer.getmany(*parts, timeout_ms=500)


def test_a_partition_with_nothing_committed_is_read_again_from_its_beginning(kafka_bootstrap: str) -> None:
    topic = _topic_with_records(kafka_bootstrap)
    uncommitted, committed_at_2 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    parts = [uncommitted, committed_at_2]

    async def scenario() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"seek-{uuid.uuid4().hex[:8]}",
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            consumer.assign(parts)
            await _read_to_the_end(consumer, parts)
            await consumer.commit({committed_at_2: 2})

            # What the fix is for: aiokafka's own seek leaves the uncommitted partition at its end.
            await consumer.seek_to_committed()
            assert [await consumer.position(tp) for tp in parts] == [RECORDS, 2]

            await _read_to_the_end(consumer, parts)
            committed = await seek_to_committed_or_beginning(consumer, skip=lambda tp: False)
            assert committed == {uncommitted: None, committed_at_2: 2}
            assert [await consumer.position(tp) for tp in parts] == [0, 2]
            again: list = []
            for _ in range(10):  # the uncommitted partition's records arrive again, from offset 0
                again = (await consumer.getmany(uncommitted, timeout_ms=3000)).get(uncommitted, [])
                if again:
                    break
            assert again and again[0].offset == 0

            # A partition the caller skips (the changelogs, which Faust positions itself) stays put.
            await _read_to_the_end(consumer, parts)
            await seek_to_committed_or_beginning(consumer, skip=lambda tp: tp == uncommitted)
            assert [await consumer.position(tp) for tp in parts] == [RECORDS, 2]
        finally:
            await consumer.stop()

    asyncio.run(scenario())
