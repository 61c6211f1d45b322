"""The order-status view: a Faust app that folds every order event into a changelog-backed table.

Data flow (all wired in `create_app`, nothing at import time):

    STATUS_INPUTS (raw Avro bytes) ──> fold_order_events ──> Table "order-status" (JSON, changelog)
                                                        └──> orders.status (Avro OrderStatus)
    GET /status/{order_id}/   answered by the worker that owns the key (table_route)
    GET /status/?state=...    this worker's partitions only

Delivery is at-least-once: after a crash the worker re-reads from its last committed offset,
restores the table from its changelog, and re-applies some events. That is harmless because
`next_status` ignores event ids it has applied and its fold is idempotent anyway; a duplicate
produces no table write and no orders.status message.

Co-partitioning: every input is keyed by order_id with murmur2 (the partitioner Faust's
producer uses too), so the table's changelog partition, the input partition and the
partition `table_route` computes for a key are all the same.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.exceptions import NotReady
from faust.types import EventT
from faust.web.exceptions import ServiceUnavailable

from services.runtime.codec import Codec, DecodeError, codec_from_settings
from services.runtime.envelope import (
    EVENT_ID,
    TRACEPARENT,
    Envelope,
    headers_to_dict,
    new_traceparent,
    trace_id_of,
)
from services.runtime.topology import DEFAULT_PARTITIONS, ORDERS_STATUS, STATUS_INPUTS
from streams.order_status.status import FOLDED_EVENTS, OrderStatus, UnknownEvent, next_status

log = logging.getLogger("orderpipe.order_status")

TABLE_NAME = "order-status"
STATUS_EVENT_TYPE = "OrderStatus"
STATUS_SCHEMA_VERSION = 1
# Status message ids are derived, not random: re-publishing the status caused by the same input
# event (after a crash between the publish and the offset commit) carries the same event id.
_STATUS_ID_NAMESPACE = uuid.UUID("6f1d7c1e-54a3-4d0e-9a52-3b1b0c0d5e57")


def default_store() -> str:
    """RocksDB (via rocksdict) survives restarts without replaying the changelog; memory:// does not."""
    try:
        import rocksdict  # noqa: F401
    except ImportError:
        return "memory://"
    return "rocksdb://"


def _broker_url(bootstrap_servers: str) -> str:
    # Faust separates several brokers with ";" inside one URL.
    return "kafka://" + ";".join(s.strip() for s in bootstrap_servers.split(",") if s.strip())


def _warn(event: str, **fields: Any) -> None:
    log.warning(json.dumps({"event": event, **fields}, default=str))


def create_app(
    bootstrap_servers: str,
    *,
    data_dir: Path,
    web_port: int,
    web_host: str = "127.0.0.1",
    store: str | None = None,
    schema_registry_url: str | None = None,
    app_id: str = "order-status",
) -> faust.App:
    app = faust.App(
        app_id,
        broker=_broker_url(bootstrap_servers),
        store=store or default_store(),
        datadir=str(Path(data_dir)),
        autodiscover=False,
        topic_partitions=DEFAULT_PARTITIONS,
        consumer_auto_offset_reset="earliest",
        # Tansu holds a JoinGroup up to the rebalance timeout (aiokafka's default: 60 s) and
        # evicts members on the session timeout; with these values the first assignment
        # arrives ~3 s after the join request, ~4 s after the worker starts.
        broker_session_timeout=6.0,
        broker_heartbeat_interval=2.0,
        broker_max_poll_interval=10.0,
        broker_rebalance_timeout=10.0,
        # Tansu answers ListOffsets(latest) with the last *batch's* base offset + 1, not the last
        # offset + 1, so after a batched changelog write the persisted RocksDB offset looks
        # "ahead of the topic" and Faust's check kills every restart against the same broker
        # (ConsistencyError). The check only guards against a store outliving its topics, which
        # the embedded mode prevents by starting from a clean data folder.
        recovery_consistency_check=False,
        web_enabled=True,
        web_bind=web_host,
        web_host=web_host,
        web_port=web_port,
        # table_route forwards a request unless the owner's URL equals this one.
        canonical_url=f"http://{web_host}:{web_port}",
    )
    codec = codec_from_settings(schema_registry_url)

    inputs = app.topic(*STATUS_INPUTS, key_serializer="raw", value_serializer="raw")
    status_topic = app.topic(ORDERS_STATUS, key_serializer="raw", value_serializer="raw")
    # Keys are the raw UTF-8 order id, exactly the input messages' key bytes: a `str` key type
    # would be JSON-encoded ('"id"'), hash to another partition, and send table_route to a
    # worker that does not own the order.
    table = app.Table(TABLE_NAME, partitions=DEFAULT_PARTITIONS, key_type=bytes, value_type=None)

    @app.agent(inputs, name="fold-order-events")
    async def fold_order_events(stream: Any) -> None:
        async for event in stream.events():
            status = apply_event(event, codec, table)
            if status is not None:
                await status_topic.send(key=status.order_id.encode(), value=codec.encode(
                    STATUS_EVENT_TYPE, status.to_avro()), headers=status_headers(status, event))

    async def routing_ready() -> None:
        # Faust's router hashes the key with the *producer's* metadata for the changelog topic,
        # which aiokafka fetches only once something was sent there: without this, a worker
        # restarted onto a recovered table answers every lookup with a TypeError (HTTP 500)
        # until the first new event arrives.
        # Only after an assignment, though: a metadata request for a topic that does not exist
        # yet makes a broker with auto-creation (Tansu; Kafka's default) create it with its
        # default partition count, and Faust then refuses the 4-partition changelog forever.
        if not any(app.router.table_metadata(TABLE_NAME).values()):
            raise ServiceUnavailable("order-status is starting: no partition assignment yet")
        try:
            producer = app.producer._ensure_producer()  # the aiokafka producer; private in Faust
            await asyncio.wait_for(producer.partitions_for(table.changelog_topic.get_topic_name()), 5.0)
        except (NotReady, asyncio.TimeoutError, KafkaError) as exc:
            raise ServiceUnavailable(f"order-status is starting: {type(exc).__name__}") from None

    def when_routable(view: Any) -> Any:
        @functools.wraps(view)
        async def guarded(web: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            await routing_ready()
            return await view(web, request, *args, **kwargs)

        return guarded

    @app.page("/status/{order_id}/")
    @when_routable
    @app.table_route(table=table, match_info="order_id")
    async def get_status(web: Any, request: Any, order_id: str) -> Any:
        stored = table.get(order_id.encode())
        if stored is None:
            return web.json({"detail": "order not found"}, status=404)
        return web.json(stored)

    @app.page("/status/")
    async def list_statuses(web: Any, request: Any) -> Any:
        # Local only: the partitions this worker owns. A cluster-wide listing would have to ask
        # every worker (app.router.tables_metadata()) and merge.
        state = request.query.get("state")
        limit = int(request.query.get("limit", "1000"))
        found = [v for v in table.values() if state is None or v.get("state") == state]
        found.sort(key=lambda v: v["order_id"])
        return web.json({"scope": "local", "count": len(found), "statuses": found[:limit]})

    return app


def apply_event(event: EventT, codec: Codec, table: Any) -> OrderStatus | None:
    """Fold one input message into the table; return the new status, or None when nothing changed.

    The view must keep running whatever arrives: a message it cannot read is logged and skipped
    here (its producer's consumers dead-letter it; the view only reports).
    """
    message = event.message
    where = {"topic": message.topic, "partition": message.partition, "offset": message.offset}
    try:
        decoded = codec.decode(event.value)
    except DecodeError as exc:
        _warn("order_status.undecodable_skipped", **where, reason=str(exc))
        return None
    if decoded.event_type not in FOLDED_EVENTS:
        return None
    headers = headers_to_dict(list(event.headers.items()))
    # Every producer sets event_id; the position is a stable stand-in for one that did not.
    event_id = headers.get(EVENT_ID) or f"{message.topic}:{message.partition}:{message.offset}"
    order_id = decoded.record.get("order_id")
    key = event.key.decode("utf-8", "replace") if isinstance(event.key, bytes) else event.key
    if not order_id or key != order_id:
        # The table entry must live on the partition its key hashes to, or table_route and
        # changelog recovery would look for it elsewhere.
        _warn("order_status.key_mismatch_skipped", **where, key=key, order_id=order_id)
        return None
    # The broker timestamp of the step event (producer create time), so a replay gives the same times.
    at = datetime.fromtimestamp(message.timestamp, UTC) if (message.timestamp or 0) > 0 else datetime.now(UTC)
    stored = table.get(order_id.encode())
    current = OrderStatus.from_json(stored) if stored is not None else None
    try:
        status = next_status(current, decoded.event_type, decoded.record, event_id, at)
    except (UnknownEvent, KeyError, ValueError) as exc:  # a record that violates its own schema's meaning
        _warn("order_status.unfoldable_skipped", **where, event_type=decoded.event_type, reason=repr(exc))
        return None
    if status is current:
        return None
    table[order_id.encode()] = status.to_json()
    return status


def status_headers(status: OrderStatus, cause: EventT) -> list[tuple[str, bytes]]:
    headers = headers_to_dict(list(cause.headers.items()))
    cause_id = status.applied_event_ids[-1]
    return Envelope(
        event_id=str(uuid.uuid5(_STATUS_ID_NAMESPACE, f"{status.order_id}:{cause_id}")),
        event_type=STATUS_EVENT_TYPE,
        schema_version=STATUS_SCHEMA_VERSION,
        correlation_id=status.order_id,
        causation_id=cause_id,
        produced_at=datetime.now(UTC),
        traceparent=new_traceparent(trace_id_of(headers.get(TRACEPARENT))),
    ).to_headers()
