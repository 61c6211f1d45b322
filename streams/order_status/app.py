"""The order-status view: a Faust app that folds every order event into a changelog-backed table.

This module is the wiring (`create_app`, nothing at import time); the parts are status.py (the
pure fold), inputs.py (messages to fold inputs), fold.py (the fold as the worker runs it),
sla.py (the SLA timer's index), web.py (the HTTP pages) and transport.py (Faust's Kafka
transport with the fixes recovery and commits need). Data flow:

    STATUS_INPUTS + orderpipe.failures ──────────────> fold-order-events ──┐
    <app_id>-sla-exceeded (from the SLA timer) ──────> fold-sla ───────────┤
                                                                            v
                        Table "order-status" (JSON, changelog) ──> orders.status (Avro OrderStatus)
    GET /status/{order_id}/   answered by the worker that owns the key (table_route)
    GET /status/?state=&since=&limit=   every worker's partitions (fan-out), or ?scope=local
    GET /ready, GET /metrics  this worker's readiness and alert counters

Delivery is at-least-once: after a crash the worker re-reads from its last committed offset,
restores the table from its changelog, and re-applies some events. `next_status` ignores event
ids it has applied, so an upstream duplicate produces no table write and no orders.status
message. A re-read of the very message that was applied (same position) is different: the
worker may have died after the table write and before the producer flushed the changelog
record and the orders.status message, so the status is written and published again (same
derived event id; orders.status readers see at most a duplicate).

Co-partitioning: every input is keyed by order_id with murmur2 (the partitioner Faust's
producer uses too) and has the same partition count, so the table's changelog partition, the
input partitions and the partition `table_route` computes for a key are all the same.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
from faust.types import EventT

from services.runtime.alerts import Alerter
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.topology import (
    DEFAULT_PARTITIONS, FAILURES, ORDER_STATUS_APP, ORDERS_STATUS, STATUS_INPUTS, sla_topic_name,
)
from streams.order_status import transport
from streams.order_status.fold import (
    TABLE_NAME,
    Metrics,
    apply_event,
    count_and_alert,
    fold_until_done,
    partition_of,
    status_headers,
    status_value,
)
from streams.order_status.inputs import sla_message
from streams.order_status.sla import DEFAULT_SLA_S, SlaWatch, default_sla_check_interval
from streams.order_status.status import sla_deadline_passed
from streams.order_status.web import WorkerView, add_pages

log = logging.getLogger("orderpipe.order_status")


# RocksDB settings per partition's database. Faust's defaults (three 64 MB write buffers and a
# 2 GB block cache each, six partitions here) let the worker's memory climb for hundreds of
# megabytes as orders come in before the first flush: the 5-minute soak read that as growth.
# Small write buffers flush to disk sooner; the cache holds what queries read.
ROCKSDB_OPTIONS = {
    "write_buffer_size": 4 * 1024**2,
    "max_write_buffer_number": 2,
    "block_cache_size": 16 * 1024**2,
}


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


def create_app(
    bootstrap_servers: str,
    *,
    data_dir: Path,
    web_port: int,
    web_host: str = "127.0.0.1",
    store: str | None = None,
    codec: Codec | None = None,  # default: the embedded registry (codec_from_settings for a real one)
    app_id: str = ORDER_STATUS_APP,
    sla_s: float = DEFAULT_SLA_S,
    sla_check_interval_s: float | None = None,
    broker_credentials: Any = None,  # services.runtime.kafka.faust_broker_credentials: TLS, SASL
    alert_webhook_url: str | None = None,
    fetch_wait_max_ms: int = 100,  # Settings.fetch_wait_max_ms; Faust's own default is 1,500
) -> faust.App:
    app = faust.App(
        app_id,
        broker=_broker_url(bootstrap_servers),
        broker_credentials=broker_credentials,
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
        broker_rebalance_timeout=10.0,
        # aiokafka uses the poll interval only on the client side (not as the JoinGroup's
        # rebalance timeout, unlike librdkafka), so it can stay long. It must: under a burst the
        # fetcher waits for full stream buffers and a commit waits for the producer's flush; once
        # that took > 10 s, aiokafka left the group and then refused to rejoin while the fetcher
        # stayed idle, and the worker sat on no partitions for good (seen with 2,000 orders).
        # A dead worker is still detected by the session timeout.
        broker_max_poll_interval=300.0,
        # The consumer rejoins when its subscribed topics' metadata changes, but it refreshes
        # metadata only this often (aiokafka's default: 5 min). On a fresh Apache Kafka the
        # worker creates its changelog and SLA topics and joins at once; a loaded broker had not
        # published them yet (seen 2 s late), the assignment left them out, and the worker sat
        # with no table partitions ("no partition assignment yet") for 5 minutes.
        consumer_metadata_max_age_ms=10_000,
        # Faust refuses a store whose persisted changelog offset is beyond the changelog's end
        # (a store that outlived its broker). It used to be off because Tansu's ListOffsets
        # answers short; the transport installed below reads end offsets from a fetch instead.
        recovery_consistency_check=True,
        web_enabled=True,
        web_bind=web_host,
        web_host=web_host,
        web_port=web_port,
        # table_route forwards a request unless the owner's URL equals this one.
        canonical_url=f"http://{web_host}:{web_port}",
    )
    # Changelog end offsets from a fetch, not only ListOffsets: see transport.py (else a restore
    # on the embedded broker stops inside the last batch and loses the rest of it).
    transport.install(app, fetch_max_wait_ms=fetch_wait_max_ms)
    codec = codec or Codec(EmbeddedRegistry())
    metrics = Metrics()
    webhook = Alerter(app_id, alert_webhook_url)  # posts from a background thread; None: log and count only

    inputs = app.topic(*STATUS_INPUTS, FAILURES, key_serializer="raw", value_serializer="raw")
    # Internal: Faust creates it with the table's partition count; the timer sends with the
    # key's murmur2 partition (Faust's producer default), so the check reaches the key's owner.
    sla_topic = app.topic(sla_topic_name(app_id), partitions=DEFAULT_PARTITIONS, internal=True,
                          key_serializer="raw", value_serializer="raw")
    status_topic = app.topic(ORDERS_STATUS, key_serializer="raw", value_serializer="raw")
    # Keys are the raw UTF-8 order id, exactly the input messages' key bytes: a `str` key type
    # would be JSON-encoded ('"id"'), hash to another partition, and send table_route to a
    # worker that does not own the order.
    table = app.Table(TABLE_NAME, partitions=DEFAULT_PARTITIONS, key_type=bytes, value_type=None,
                      options=ROCKSDB_OPTIONS)  # the memory:// store ignores them

    async def fold_one(event: EventT) -> None:
        applied = apply_event(event, codec, table, sla_topic.get_topic_name())
        if applied is None:
            return
        count_and_alert(applied, metrics, webhook)
        status = applied.status
        sla_watch.note(status)
        await status_topic.send(key=status.order_id.encode(), value=status_value(codec, status),
                                headers=status_headers(status, event))

    def still_owned(event: EventT) -> bool:
        return event.message.tp in app.consumer.assignment()

    async def fold(stream: Any) -> None:
        async for event in stream.events():
            await fold_until_done(fold_one, event, still_owned, metrics)

    app.agent(inputs, name="fold-order-events")(fold)
    app.agent(sla_topic, name="fold-sla")(fold)

    view = WorkerView(app, table)
    sla_watch = SlaWatch(sla_s)

    @app.timer(interval=sla_check_interval_s or default_sla_check_interval(sla_s), name="sla-check")
    async def find_orders_past_sla() -> None:
        # Only detects; the fold sets the flag (inside stream processing, where a table write is
        # allowed and lands in the right changelog partition). Sending the same order twice
        # before the first is folded is harmless: the SLA input's event id is fixed per order.
        if view.not_ready_reason() is not None:
            return
        mine = view.local_partitions()
        if sla_watch.partitions != mine:
            # After a start or a rebalance: the orders restored from the changelog. One scan,
            # yielding to the event loop as it goes (heartbeats, the fold and queries go on).
            await sla_watch.rebuild(((k, v) for k, v in table.items() if partition_of(k) in mine), mine)
        now = datetime.now(UTC)
        for key in sla_watch.due(now):
            stored = table.get(key)  # the table, not the index, decides
            deadline = sla_deadline_passed(stored, sla_s, now) if stored is not None else None
            if deadline is not None and partition_of(key) in mine:
                await sla_topic.send(key=key, value=sla_message(stored["order_id"], deadline))

    add_pages(app, view, metrics)
    return app
