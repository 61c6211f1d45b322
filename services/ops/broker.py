"""Kafka access for the operators' tools: assign-only reads, true end offsets, one producer.

The tools never join a consumer group (no rebalances, nothing to disturb): they assign
partitions directly and read committed offsets with OffsetFetch. Progress of replays and purges
is committed for the group `orderpipe-dlt` (see handled.py), which never has members.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from datetime import time as time_of_day
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from services.ops.errors import OpsError
from services.tools.brokers import quirks
from services.tools.brokers.quirks import EndOffsetsUnknown
from services.runtime.kafka import producer_config, retrying
from services.runtime.settings import Settings

# The consumer group whose committed offsets on a dead-letter topic say "everything below is
# handled" (replayed, parked or purged). Only `orderpipe dlt` commits for it; no one subscribes.
OPS_GROUP = "orderpipe-dlt"

TopicPart = tuple[str, int]


def watermarks(consumer: Consumer, parts: Iterable[TopicPart], timeout: float = 10.0) -> dict[TopicPart, tuple[int, int]]:
    """(low, end) offsets of each partition (`end_offsets`, right on both brokers), or OpsError."""
    try:
        return quirks.end_offsets(consumer, parts, timeout)
    except EndOffsetsUnknown as exc:
        raise OpsError(str(exc)) from None


def first_offsets_at(consumer: Consumer, ranges: dict[TopicPart, tuple[int, int]], timestamp_ms: int,
                     timeout: float = 10.0) -> dict[TopicPart, tuple[int, int]]:
    """`ranges` ((low, end) per partition) narrowed to the messages with a timestamp at or after
    `timestamp_ms`, by the broker's time index (ListOffsets by time). A broker that cannot answer
    leaves a range whole: this may read more, never miss a message. (Tansu answers the first
    offset for any time; Apache Kafka the first message at or after it, or -1 past the last.)"""
    asked = [TopicPartition(t, p, timestamp_ms) for (t, p) in ranges]
    try:
        found = consumer.offsets_for_times(asked, timeout) if asked else []
    except KafkaException:
        return dict(ranges)
    out = dict(ranges)
    for tp in found:
        low, end = ranges[(tp.topic, tp.partition)]
        if tp.error is not None:
            continue
        start = end if tp.offset == -1 else tp.offset  # -1: no message at or after the time
        out[(tp.topic, tp.partition)] = (min(max(low, start), end), end)
    return out


def _reason(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return err.str() if hasattr(err, "str") else str(exc)


class OpsKafka:
    """The clients of one CLI invocation; `close()` them at the end."""

    def __init__(self, settings: Settings, *, timeout: float = 10.0):
        if not settings.kafka_bootstrap_servers:
            raise OpsError("KAFKA_BOOTSTRAP_SERVERS is not set; export it (host:port of your Kafka cluster)")
        self.settings = settings
        self.bootstrap = settings.kafka_bootstrap_servers
        self.timeout = timeout
        self.errors: list[str] = []
        self._clients: list[Any] = []
        self._producer: Producer | None = None

    def _base(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, **self.settings.extra_client_config,
                # connection problems come back through error_cb and our own checks, not as log lines
                "log_level": 0, "error_cb": lambda e: self.errors.append(str(e))}

    def consumer(self, group_id: str = OPS_GROUP) -> Consumer:
        consumer = Consumer({
            **self._base(),
            "group.id": group_id,
            "client.id": "orderpipe-ops",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",  # what the pipeline's consumers see
            "enable.partition.eof": True,
            # Reads here are short and end at a partition's end, where a fetch would otherwise
            # wait the default 500 ms for data that is not coming.
            "fetch.wait.max.ms": 20,
        })
        self._clients.append(consumer)
        return consumer

    def producer(self) -> Producer:
        if self._producer is None:
            # the pipeline's producer settings: idempotent, acks=all, murmur2 (same partition per key)
            self._producer = Producer(producer_config(self.settings, **{
                "client.id": "orderpipe-ops", "log_level": 0, "error_cb": lambda e: self.errors.append(str(e))}))
        return self._producer

    def topics(self, consumer: Consumer | None = None, topic: str | None = None) -> dict[str, Any]:
        """Topic metadata (of every topic, or of `topic`); raises OpsError with one clear line
        when the broker does not answer."""
        client = consumer or self.consumer(f"orderpipe-ops-{uuid.uuid4().hex[:8]}")
        try:
            return client.list_topics(topic, timeout=self.timeout).topics
        except KafkaException as exc:
            detail = f" ({self.errors[-1]})" if self.errors else ""
            raise OpsError(f"cannot reach Kafka at {self.bootstrap}: {_reason(exc)}{detail}") from None

    def partitions(self, topic: str, metadata: dict[str, Any]) -> list[int]:
        meta = metadata.get(topic)
        if meta is None:
            # Under an authorizer, a listing of every topic leaves out the ones this user may
            # not describe: ask for this one by name, which says "not authorized" if that is why.
            meta = self.topics(topic=topic).get(topic)
        if meta is not None and meta.error is not None and meta.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            raise OpsError(f"Kafka denied access to topic {topic!r}: {meta.error.str()} (this Kafka user lacks the "
                           "ACL; the operators' user and its ACLs are in deploy/k8s/base/kafka-users.yaml)")
        if meta is None or (meta.error is not None and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            raise OpsError(f"topic {topic!r} does not exist (`orderpipe topics list` shows them; "
                           "`orderpipe topics create` makes the pipeline's, idempotently)")
        if meta.error is not None:
            raise OpsError(f"topic {topic!r}: {meta.error.str()}")
        return sorted(meta.partitions)

    def committed(self, group_id: str, parts: Iterable[TopicPart]) -> dict[TopicPart, int | None]:
        """The group's committed offsets (None: nothing committed)."""
        parts = list(parts)
        if not parts:
            return {}
        consumer = self.consumer(group_id)
        try:
            got = retrying(lambda: consumer.committed([TopicPartition(t, p) for t, p in parts], timeout=self.timeout),
                           self.timeout)
        except KafkaException as exc:
            raise OpsError(f"cannot read the committed offsets of group {group_id!r}: {_reason(exc)}") from None
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in got}

    def commit(self, consumer: Consumer, offsets: dict[TopicPart, int]) -> None:
        if offsets:
            positions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
            retrying(lambda: consumer.commit(offsets=positions, asynchronous=False), self.timeout)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.timeout)
        for client in self._clients:
            try:
                client.close()
            except RuntimeError:  # already closed
                pass
        self._clients.clear()

    def __enter__(self) -> OpsKafka:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scan(consumer: Consumer, ranges: dict[TopicPart, tuple[int, int]], stall_timeout: float = 15.0) -> Iterator[Any]:
    """Every message in [start, end) of each partition, in offset order per partition.

    Stops at the given ends even when newer messages arrive meanwhile. A partition also ends at
    its EOF (in read_committed mode that can come before the end, at the last stable offset)."""
    todo = {k: (s, e) for k, (s, e) in ranges.items() if s < e}
    if not todo:
        return
    pending = set(todo)
    consumer.assign([TopicPartition(t, p, s) for (t, p), (s, _) in todo.items()])
    try:
        last_progress = time.monotonic()
        while pending:
            # consume() waits for all 500 or the timeout: a short one keeps small reads fast
            messages = consumer.consume(500, 0.05)
            if not messages and time.monotonic() - last_progress > stall_timeout:
                names = ", ".join(f"{t}[{p}]" for t, p in sorted(pending)[:5])
                raise OpsError(f"reading stalled for {stall_timeout:g} s on {names}")
            for msg in messages:
                key = (msg.topic(), msg.partition())
                if key not in pending:
                    continue
                last_progress = time.monotonic()
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(key)
                        continue
                    raise OpsError(f"reading {key[0]}[{key[1]}]: {err.str()}")
                end = todo[key][1]
                if msg.offset() >= end:
                    pending.discard(key)
                    continue
                yield msg
                if msg.offset() + 1 >= end:
                    pending.discard(key)
    finally:
        consumer.unassign()


def follow_from(consumer: Consumer, starts: dict[TopicPart, int]) -> Iterator[Any]:
    """Every message from the given offsets on, waiting for new ones; ends only when closed."""
    consumer.assign([TopicPartition(t, p, o) for (t, p), o in starts.items()])
    try:
        while True:
            for msg in consumer.consume(500, 0.5):
                err = msg.error()
                if err is None:
                    yield msg
                elif err.code() != KafkaError._PARTITION_EOF:
                    raise OpsError(f"reading {msg.topic()}[{msg.partition()}]: {err.str()}")
    finally:
        consumer.unassign()


def read_one(consumer: Consumer, topic: str, partition: int, offset: int, timeout: float = 10.0) -> Any | None:
    """The message at exactly that offset, or None when there is none (deleted, past the end)."""
    consumer.assign([TopicPartition(topic, partition, offset)])
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.topic() != topic or msg.partition() != partition:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return None
                raise OpsError(f"reading {topic}[{partition}]: {err.str()}")
            if msg.offset() == offset:
                return msg
            if msg.offset() > offset:
                return None
        raise OpsError(f"no answer reading {topic}[{partition}] within {timeout:g} s")
    finally:
        consumer.unassign()


def json_default(value: Any) -> Any:
    """For json.dumps of decoded records (`orderpipe tail`, `dlt show`, the console): Avro logical
    types as analysts expect them, decimals as exact strings, times as ISO 8601."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date, time_of_day)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
