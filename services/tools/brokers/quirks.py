"""What the embedded broker (Tansu 0.6) needs beyond the Kafka protocol, in one place.

`make test` runs the integration and e2e tiers on Tansu and on Apache Kafka, so every entry
here is exercised on both. Everything else in orderpipe is plain Kafka protocol.

| Tansu quirk | handled by | on Apache Kafka |
|---|---|---|
| ListOffsets(latest) answers the last batch's base offset + 1, short of the end when that batch holds several records | `end_offsets()` below (lag, dead letters, audit, tail); for Faust's changelog restore: `streams/order_status/transport.py` (it patches aiokafka, so it lives with the worker) | both answers agree; the fetch only confirms |
| JoinGroup is held for the whole rebalance timeout, which librdkafka takes from `max.poll.interval.ms` (300 s default: ~25 s to a first assignment) | `EMBEDDED_CLIENT_ENV`: 10 s for the processes `orderpipe up` starts on it | answered as soon as the group is complete: the production default stays |
| (the same, for the order-status worker: aiokafka takes its JoinGroup rebalance timeout from Faust's `broker_rebalance_timeout`) | `streams/order_status/app.py`: 10 s, on both brokers | members rejoin within seconds, so 10 s is ample there too |
| every fetch is held for its whole `fetch.wait.max.ms`, even when data arrives | `EMBEDDED_CLIENT_ENV`: 100 ms (latency per hop ~ half of it) | a waiting fetch is answered when data arrives; the wait only sets how often an idle consumer asks: 500 ms |
| `cleanup.policy=compact` is accepted and never run | nothing: the status fold is idempotent per key | compacts (`tests/integration/test_kafka_compaction.py`) |
| memory only: a restart is an empty broker | `services/pipeline/stack.py: check_data_dir` refuses databases that outlived it | durable (`up --broker kafka` continues after a restart) |
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from services.runtime.kafka import retrying

# Client settings (as the processes' environment) for everything that runs on the embedded
# broker; `EmbeddedBroker.client_env` hands them to `orderpipe up`'s processes.
EMBEDDED_CLIENT_ENV = {
    "ORDERPIPE_MAX_POLL_INTERVAL_MS": "10000",
    "ORDERPIPE_FETCH_WAIT_MAX_MS": "100",
}

TopicPart = tuple[str, int]


class EndOffsetsUnknown(RuntimeError):
    """The end offsets could not be read (the message says which and why)."""


def end_offsets(consumer: Consumer, parts: Iterable[TopicPart], timeout: float = 10.0) -> dict[TopicPart, tuple[int, int]]:
    """(low, end) offsets of each partition, right on Apache Kafka and on the embedded broker.

    `get_watermark_offsets` asks ListOffsets; Tansu's answer can fall short (see above). The
    high watermark in a fetch response is right on both, so for each partition ListOffsets calls
    non-empty we fetch once from just below its answer (inside the last batch on Tansu, the last
    record on Kafka) and take the larger of the two. A partition ListOffsets calls empty has no
    batch at all, so it is empty on both brokers. `consumer` is left unassigned.
    """
    result: dict[TopicPart, tuple[int, int]] = {}
    probe: list[TopicPartition] = []
    for topic, p in dict.fromkeys(parts):  # several groups read one topic: ask once (assign refuses twins)
        try:
            low, high = retrying(lambda: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout),
                                 timeout)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            reason = err.str() if hasattr(err, "str") else str(exc)
            raise EndOffsetsUnknown(f"cannot read the offsets of {topic}[{p}]: {reason}") from None
        result[(topic, p)] = (low, high)
        if high > low:
            probe.append(TopicPartition(topic, p, max(low, high - 1)))
    if not probe:
        return result
    pending = {(tp.topic, tp.partition) for tp in probe}
    consumer.assign(probe)
    try:
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.05):
                key = (msg.topic(), msg.partition())
                err = msg.error()
                if key not in pending or (err is not None and err.code() != KafkaError._PARTITION_EOF):
                    continue
                # the fetch response that carried this message (or EOF) set the cached high watermark
                _, fetched = consumer.get_watermark_offsets(TopicPartition(*key), cached=True)
                low, high = result[key]
                result[key] = (low, max(high, fetched))
                pending.discard(key)
    finally:
        consumer.unassign()
    if pending:
        names = ", ".join(f"{t}[{p}]" for t, p in sorted(pending)[:5])
        raise EndOffsetsUnknown(f"could not read the end offsets of {len(pending)} partition(s) within {timeout:g} s: {names}")
    return result
