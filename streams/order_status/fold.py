"""The fold, as the worker runs it: from an input message to a table write and a status to publish.

`apply_event` reads one message (`read_input`: event topics, failure notices, the SLA topic), folds it with the pure `next_status` (status.py) and writes the table; `fold_until_done`
retries it in place until it succeeds (an exception must never reach Faust);
`count_and_alert` keeps the metrics and raises alerts; `status_value` and `status_headers` make
the status published to orders.status (Avro, schema version `STATUS_SCHEMA_VERSION`) and its
envelope. The wiring is in app.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka.partitioner import murmur2
from faust.types import EventT

from services.runtime.alerts import Alerter
from services.runtime.codec import Codec, DecodeError
from services.runtime.crashpoints import crash_point
from services.runtime.envelope import EVENT_ID, TRACEPARENT, Envelope, headers_to_dict, new_traceparent, trace_id_of
from services.runtime.failure_notices import NotANotice, read_notice
from services.runtime.topology import DEFAULT_PARTITIONS, FAILURES
from streams.order_status.inputs import FoldInput, NotAnInput, failure_input, sla_input
from streams.order_status.status import FOLDED_EVENTS, OrderStatus, UnknownEvent, next_status, redelivered

log = logging.getLogger("orderpipe.order_status")

TABLE_NAME = "order-status"  # the Faust table of every order's status (JSON), and its changelog
STATUS_EVENT_TYPE = "OrderStatus"
# The version the status is encoded with and its envelope names: pinned, not the registry's latest,
# so that a newer schema checked in before the code writing it cannot be picked by accident.
STATUS_SCHEMA_VERSION = 2
# Status message ids are derived, not random: re-publishing the status caused by the same input
# event (after a crash between the publish and the offset commit) carries the same event id.
_STATUS_ID_NAMESPACE = uuid.UUID("6f1d7c1e-54a3-4d0e-9a52-3b1b0c0d5e57")


def partition_of(key: bytes, partitions: int = DEFAULT_PARTITIONS) -> int:
    """murmur2, as Java clients, aiokafka, Faust and our librdkafka producers (murmur2_random) hash keys."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _warn(event: str, **fields: Any) -> None:
    log.warning(json.dumps({"event": event, **fields}, default=str))


@dataclass
class Metrics:
    """Counters since this worker started (Prometheus counter semantics: they reset on restart)."""

    events_folded: int = 0
    republished: int = 0
    sla_exceeded: int = 0
    dead_lettered: int = 0
    compensation_dead_lettered: int = 0
    fold_retries: int = 0
    started: float = field(default_factory=time.time)

    def prometheus(self) -> str:
        lines = []
        for name, help_text, value in (
            ("events_folded_total", "Inputs that changed an order's status.", self.events_folded),
            ("republished_total", "Statuses written again for a re-read input (after a crash or rebalance).",
             self.republished),
            ("sla_exceeded_total", "Orders found unfinished after the SLA (alerts raised).", self.sla_exceeded),
            ("dead_lettered_total", "Order steps that reached a dead-letter topic (alerts raised).",
             self.dead_lettered),
            ("compensation_dead_lettered_total",
             "Compensations of cancelled orders that reached a dead-letter topic (alerts raised).",
             self.compensation_dead_lettered),
            ("fold_retries_total", "Inputs folded again after a failure (each is retried until it succeeds).",
             self.fold_retries),
        ):
            lines += [f"# HELP orderpipe_order_status_{name} {help_text}",
                      f"# TYPE orderpipe_order_status_{name} counter",
                      f"orderpipe_order_status_{name} {value}"]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Applied:
    before: OrderStatus | None
    status: OrderStatus
    republish: bool = False  # the same status again, for a re-read input


def read_input(event: EventT, codec: Codec, sla_topic: str) -> FoldInput | None:
    """The fold input a message stands for; None for an event type the view does not fold.
    Raises DecodeError / NotAnInput / NotANotice for a message the view cannot read."""
    message = event.message
    if message.topic == sla_topic:
        return sla_input(event.value)
    if message.topic == FAILURES:
        return failure_input(read_notice(event.value))
    decoded = codec.decode(event.value)
    if decoded.event_type not in FOLDED_EVENTS:
        return None
    # Every producer sets event_id; the position is a stable stand-in for one that did not.
    event_id = headers_to_dict(list(event.headers.items())).get(EVENT_ID) or f"{message.topic}:{message.partition}:{message.offset}"
    return FoldInput(decoded.event_type, decoded.record, event_id)


def apply_event(event: EventT, codec: Codec, table: Any, sla_topic: str = "") -> Applied | None:
    """Fold one input message into the table; return what changed, or None when nothing did.

    The view must keep running whatever arrives: a message it cannot read is logged and skipped
    here (its producer's consumers dead-letter it; the view only reports).
    """
    message = event.message
    position = f"{message.topic}:{message.partition}:{message.offset}"
    where = {"topic": message.topic, "partition": message.partition, "offset": message.offset}
    try:
        fold_input = read_input(event, codec, sla_topic)
    except (DecodeError, NotAnInput, NotANotice) as exc:
        _warn("order_status.undecodable_skipped", **where, reason=str(exc))
        return None
    if fold_input is None:
        return None
    order_id = fold_input.record.get("order_id")
    key = event.key.decode("utf-8", "replace") if isinstance(event.key, bytes) else event.key
    if not order_id or key != order_id:
        # The table entry must live on the partition its key hashes to, or table_route and
        # changelog recovery would look for it elsewhere.
        _warn("order_status.key_mismatch_skipped", **where, key=key, order_id=order_id)
        return None
    # The broker timestamp of the input (producer create time), so a replay gives the same times.
    at = datetime.fromtimestamp(message.timestamp, UTC) if (message.timestamp or 0) > 0 else datetime.now(UTC)
    crash_point("status.before_fold")
    stored = table.get(order_id.encode())
    current = OrderStatus.from_json(stored) if stored is not None else None
    try:
        status = next_status(current, fold_input.event_type, fold_input.record, fold_input.event_id, at, position)
    except (UnknownEvent, KeyError, ValueError, TypeError) as exc:  # a record that violates its own schema's meaning
        _warn("order_status.unfoldable_skipped", **where, event_type=fold_input.event_type, reason=repr(exc))
        return None
    if status is current:
        if not redelivered(current, fold_input.event_id, position):
            return None
        applied = Applied(current, current, republish=True)
    else:
        applied = Applied(current, status)
    # Written again on a re-read, too: the changelog record may be what the crash lost.
    table[order_id.encode()] = applied.status.to_json()
    crash_point("status.after_fold")
    return applied


async def fold_until_done(fold_one: Callable[[EventT], Awaitable[None]], event: EventT,
                          still_owned: Callable[[EventT], bool], metrics: Metrics,
                          first_delay_s: float = 0.1, max_delay_s: float = 5.0) -> None:
    """Fold one event, retrying it in place until it succeeds or its partition moves away.

    An exception must not reach Faust: its stream acknowledges the event being processed even
    when the agent crashes, and the supervisor restarts the agent on the *next* event, so the
    failed one was lost and its order stayed PENDING for good. Seen on Apache Kafka: the first
    table write found the changelog topic just created, with 0 partitions in the consumer's
    metadata (PartitionsMismatch until the next metadata refresh). Folding again is safe: event
    ids make a re-applied input a no-op that only writes the status again."""
    delay = first_delay_s
    while True:
        try:
            await fold_one(event)
            return
        except Exception as exc:  # noqa: BLE001 - any failure: keep the event, never skip it
            message = event.message
            if not still_owned(event):
                # Its new owner reads it again: this worker's offset for it was never committed.
                _warn("order_status.fold_abandoned_after_revoke", topic=message.topic,
                      partition=message.partition, offset=message.offset, reason=repr(exc))
                return
            metrics.fold_retries += 1
            _warn("order_status.fold_retry", topic=message.topic, partition=message.partition,
                  offset=message.offset, reason=repr(exc), retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)


def count_and_alert(applied: Applied, metrics: Metrics, webhook: Alerter | None = None) -> None:
    """Count the change; raise an alert (one JSON log line at ERROR, and a POST to the alert
    webhook when one is configured) when an order passes its SLA, one of its steps is
    dead-lettered, or the compensation of one of its steps (the order was cancelled) is."""
    if applied.republish:
        metrics.republished += 1
        return
    metrics.events_folded += 1
    before, status = applied.before, applied.status
    if status.sla_deadline is not None and (before is None or before.sla_deadline is None):
        metrics.sla_exceeded += 1
        _alert(webhook, "sla_exceeded", status, deadline=status.sla_deadline, unfinished=status.unfinished_steps())
    for name, step in status.steps.items():
        if step.state == "dead_lettered" and (before is None or before.steps[name].state != "dead_lettered"):
            metrics.dead_lettered += 1
            _alert(webhook, "step_dead_lettered", status, step=name, error=step.last_error, detail=step.detail)
        if step.compensation == "dead_lettered" and (
                before is None or before.steps[name].compensation != "dead_lettered"):
            metrics.compensation_dead_lettered += 1
            _alert(webhook, "compensation_dead_lettered", status, step=name, detail=step.compensation_detail)


def _alert(webhook: Alerter | None, alert: str, status: OrderStatus, **fields: Any) -> None:
    payload = {"event": "order_status.alert", "alert": alert, "order_id": status.order_id,
               "state": status.state, "reason": status.reason, **fields}
    log.error(json.dumps(payload, default=str))
    if webhook is not None:
        webhook.post(json.loads(json.dumps({**payload, "group": "order-status",
                                            "at": datetime.now(UTC).isoformat()}, default=str)))


def status_value(codec: Codec, status: OrderStatus) -> bytes:
    """The status as published to orders.status: Avro with the schema its headers name."""
    return codec.encode(STATUS_EVENT_TYPE, status.to_avro(), version=STATUS_SCHEMA_VERSION)


def status_headers(status: OrderStatus, cause: EventT) -> list[tuple[str, bytes]]:
    traceparent = cause.headers.get(TRACEPARENT)  # the one header of the cause the status carries on
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("utf-8", "backslashreplace")
    cause_id = status.applied_event_ids[-1]
    return Envelope(
        event_id=str(uuid.uuid5(_STATUS_ID_NAMESPACE, f"{status.order_id}:{cause_id}")),
        event_type=STATUS_EVENT_TYPE,
        schema_version=STATUS_SCHEMA_VERSION,
        correlation_id=status.order_id,
        causation_id=cause_id,
        produced_at=datetime.now(UTC),
        traceparent=new_traceparent(trace_id_of(traceparent)),
    ).to_headers()
