"""The order-status view: a Faust app that folds every order event into a changelog-backed table.

Data flow (all wired in `create_app`, nothing at import time):

    STATUS_INPUTS + every group's retry/DLT topics ──> fold-order-events ──┐
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

import asyncio
import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import faust
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from faust.exceptions import NotReady
from faust.types import EventT
from faust.web.exceptions import ServiceUnavailable

from services.runtime.alerts import Alerter
from services.runtime.codec import Codec, DecodeError, codec_from_settings
from services.runtime.crashpoints import crash_point
from services.runtime.envelope import (
    EVENT_ID,
    TRACEPARENT,
    Envelope,
    headers_to_dict,
    new_traceparent,
    trace_id_of,
)
from services.runtime.topology import DEFAULT_PARTITIONS, ORDERS_STATUS, STATUS_INPUTS
from streams.order_status import transport
from streams.order_status.inputs import (
    FoldInput,
    NotAnInput,
    failure_input,
    failure_topics,
    sla_input,
    sla_message,
)
from streams.order_status.status import (
    FINAL_ORDER_STATES,
    FOLDED_EVENTS,
    ORDER_STATES,
    OrderStatus,
    UnknownEvent,
    matches,
    next_status,
    parse_since,
    redelivered,
    sla_deadline_passed,
)

log = logging.getLogger("orderpipe.order_status")

TABLE_NAME = "order-status"
STATUS_EVENT_TYPE = "OrderStatus"
STATUS_SCHEMA_VERSION = 1
DEFAULT_SLA_S = 300.0
# Status message ids are derived, not random: re-publishing the status caused by the same input
# event (after a crash between the publish and the offset commit) carries the same event id.
_STATUS_ID_NAMESPACE = uuid.UUID("6f1d7c1e-54a3-4d0e-9a52-3b1b0c0d5e57")


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


def sla_topic_name(app_id: str) -> str:
    return f"{app_id}-sla-exceeded"


def partition_of(key: bytes, partitions: int = DEFAULT_PARTITIONS) -> int:
    """murmur2, as Java clients, aiokafka, Faust and our librdkafka producers (murmur2_random) hash keys."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def default_sla_check_interval(sla_s: float) -> float:
    return min(max(sla_s / 10, 0.5), 30.0)


def _broker_url(bootstrap_servers: str) -> str:
    # Faust separates several brokers with ";" inside one URL.
    return "kafka://" + ";".join(s.strip() for s in bootstrap_servers.split(",") if s.strip())


def _warn(event: str, **fields: Any) -> None:
    log.warning(json.dumps({"event": event, **fields}, default=str))


@dataclass
class Metrics:
    """Counters since this worker started (Prometheus counter semantics: they reset on restart)."""

    events_folded: int = 0
    republished: int = 0
    sla_exceeded: int = 0
    dead_lettered: int = 0
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
            ("fold_retries_total", "Inputs folded again after a failure (each is retried until it succeeds).",
             self.fold_retries),
        ):
            lines += [f"# HELP orderpipe_order_status_{name} {help_text}",
                      f"# TYPE orderpipe_order_status_{name} counter",
                      f"orderpipe_order_status_{name} {value}"]
        return "\n".join(lines) + "\n"


class SlaWatch:
    """The orders that can still pass their SLA (not final, not flagged), by deadline.

    Kept up to date by the fold, so a timer tick looks only at orders whose deadline passed,
    not at the whole table: scanning 100,000 stored statuses on every tick blocked the event
    loop for minutes, and the worker lost its group membership."""

    def __init__(self, sla_s: float):
        self.sla = timedelta(seconds=sla_s)
        self.deadlines: dict[bytes, datetime] = {}
        self.partitions: set[int] | None = None  # the assignment the index was built for

    def note(self, status: OrderStatus) -> None:
        key = status.order_id.encode()
        if status.state in FINAL_ORDER_STATES or status.sla_deadline is not None:
            self.deadlines.pop(key, None)
        else:
            self.deadlines[key] = status.created_at + self.sla

    async def rebuild(self, items: Iterable[tuple[bytes, dict]], partitions: set[int]) -> None:
        self.deadlines.clear()
        for n, (key, stored) in enumerate(items, 1):
            if stored.get("state") not in FINAL_ORDER_STATES and stored.get("sla_deadline") is None:
                self.deadlines[key] = datetime.fromisoformat(stored["created_at"]) + self.sla
            if n % 1000 == 0:
                await asyncio.sleep(0)
        self.partitions = set(partitions)

    def due(self, now: datetime) -> list[bytes]:
        """Keys whose deadline passed; they leave the index (the fold re-adds what stays open)."""
        keys = [k for k, deadline in self.deadlines.items() if deadline <= now]
        for k in keys:
            del self.deadlines[k]
        return keys


@dataclass(frozen=True)
class Applied:
    before: OrderStatus | None
    status: OrderStatus
    republish: bool = False  # the same status again, for a re-read input


def create_app(
    bootstrap_servers: str,
    *,
    data_dir: Path,
    web_port: int,
    web_host: str = "127.0.0.1",
    store: str | None = None,
    schema_registry_url: str | None = None,
    app_id: str = "order-status",
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
    codec = codec_from_settings(schema_registry_url)
    failures = failure_topics()
    metrics = Metrics()
    webhook = Alerter(app_id, alert_webhook_url)  # posts from a background thread; None: log and count only
    canonical = str(app.conf.canonical_url).rstrip("/")

    inputs = app.topic(*STATUS_INPUTS, *failures, key_serializer="raw", value_serializer="raw")
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
        applied = apply_event(event, codec, table, failures, sla_topic.get_topic_name())
        if applied is None:
            return
        count_and_alert(applied, metrics, webhook)
        status = applied.status
        sla_watch.note(status)
        await status_topic.send(key=status.order_id.encode(), value=codec.encode(
            STATUS_EVENT_TYPE, status.to_avro()), headers=status_headers(status, event))

    def still_owned(event: EventT) -> bool:
        return event.message.tp in app.consumer.assignment()

    async def fold(stream: Any) -> None:
        async for event in stream.events():
            await fold_until_done(fold_one, event, still_owned, metrics)

    app.agent(inputs, name="fold-order-events")(fold)
    app.agent(sla_topic, name="fold-sla")(fold)

    def local_partitions() -> set[int]:
        changelog = table.changelog_topic.get_topic_name()
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == changelog}

    def local_items() -> list[tuple[bytes, dict]]:
        # Only the partitions this worker owns: a memory:// store also holds standby replicas of
        # other workers' partitions (RocksDB iterates actives only; the filter is then a no-op).
        mine = local_partitions()
        return [(k, v) for k, v in table.items() if partition_of(k) in mine]

    def not_ready_reason() -> str | None:
        if app.rebalancing or app.in_recovery:
            return "rebalancing or restoring the table from its changelog"
        if not any(app.router.table_metadata(TABLE_NAME).values()):
            return "no partition assignment yet"
        return None

    sla_watch = SlaWatch(sla_s)

    @app.timer(interval=sla_check_interval_s or default_sla_check_interval(sla_s), name="sla-check")
    async def find_orders_past_sla() -> None:
        # Only detects; the fold sets the flag (inside stream processing, where a table write is
        # allowed and lands in the right changelog partition). Sending the same order twice
        # before the first is folded is harmless: the SLA input's event id is fixed per order.
        if not_ready_reason() is not None:
            return
        mine = local_partitions()
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

    async def routing_ready() -> None:
        # Faust's router hashes the key with the *producer's* metadata for the changelog topic,
        # which aiokafka fetches only once something was sent there: without this, a worker
        # restarted onto a recovered table answers every lookup with a TypeError (HTTP 500)
        # until the first new event arrives.
        # Only after an assignment, though: a metadata request for a topic that does not exist
        # yet makes a broker with auto-creation (Tansu; Kafka's default) create it with its
        # default partition count, and Faust then refuses the 6-partition changelog forever.
        reason = not_ready_reason()
        if reason is not None:
            raise ServiceUnavailable(f"order-status is starting: {reason}")
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

    def local_listing(states: frozenset[str] | None, since: datetime | None, limit: int) -> dict:
        found = [v for _, v in local_items() if matches(v, states, since)]
        found.sort(key=_newest_first)
        return {"scope": "local", "worker": canonical, "partitions": sorted(local_partitions()),
                "count": len(found), "statuses": found[:limit]}

    async def ask_peer(url: str, params: dict[str, str]) -> dict:
        try:
            async with app.http_client.get(f"{url.rstrip('/')}/status/", params={**params, "scope": "local"},
                                           timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status != 200:
                    raise ServiceUnavailable(f"worker {url} answered {response.status}: {(await response.text())[:200]}")
                return await response.json()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ServiceUnavailable(f"worker {url} is not answering: {exc!r}") from None

    @app.page("/status/")
    async def list_statuses(web: Any, request: Any) -> Any:
        """Statuses by state and time. Cluster-wide by default: this worker asks every worker
        owning a partition of the table (Faust's assignment metadata) and merges the answers."""
        try:
            states, since, limit = _list_params(request.query)
        except ValueError as exc:
            return web.json({"detail": str(exc)}, status=400)
        scope = request.query.get("scope", "cluster")
        reason = not_ready_reason()
        if reason is not None:
            raise ServiceUnavailable(f"order-status is starting: {reason}")
        if scope == "local":
            return web.json(local_listing(states, since, limit))
        if scope != "cluster":
            return web.json({"detail": "scope must be cluster or local"}, status=400)

        workers = sorted(url.rstrip("/") for url, tps in app.router.table_metadata(TABLE_NAME).items() if tps)
        params = {"limit": str(limit)}
        if states is not None:
            params["state"] = ",".join(sorted(states))
        if since is not None:
            params["since"] = since.isoformat()  # absolute, so every worker uses the same cut-off
        answers = await asyncio.gather(*(
            _as_coroutine(local_listing(states, since, limit)) if url == canonical else ask_peer(url, params)
            for url in workers))
        merged = merge_listings(answers, DEFAULT_PARTITIONS, limit)
        if merged is None:
            raise ServiceUnavailable("the partition assignment changed during the query; ask again")
        return web.json({**merged, "workers": workers})

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:  # liveness: the event loop answers
        return web.json({"status": "ok"})

    @app.page("/ready")
    async def ready(web: Any, request: Any) -> Any:
        reason = not_ready_reason()
        body = {"ready": reason is None, "reason": reason, "worker": canonical, "store": str(app.conf.store),
                "partitions": sorted(local_partitions()), "uptime_s": round(time.time() - metrics.started, 3)}
        if reason is None and request.query.get("count"):
            body["orders"] = len(local_items())
        return web.json(body, status=200 if reason is None else 503)

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        return web.text(metrics.prometheus(), content_type="text/plain")

    return app


async def _as_coroutine(value: Any) -> Any:
    return value


def _newest_first(stored: dict) -> tuple:
    return (-datetime.fromisoformat(stored["updated_at"]).timestamp(), stored["order_id"])


def _list_params(query: Any) -> tuple[frozenset[str] | None, datetime | None, int]:
    raw_states = query.getall("state", []) if hasattr(query, "getall") else [query.get("state") or ""]
    states = frozenset(s.strip().upper() for raw in raw_states for s in raw.split(",") if s.strip()) or None
    unknown = (states or frozenset()) - set(ORDER_STATES)
    if unknown:
        raise ValueError(f"unknown state {', '.join(sorted(unknown))}; known: {', '.join(ORDER_STATES)}")
    since = parse_since(query["since"], datetime.now(UTC)) if query.get("since") else None
    try:
        limit = int(query.get("limit", "1000"))
    except ValueError:
        raise ValueError("limit must be a number") from None
    if limit < 0:
        raise ValueError("limit must be >= 0")
    return states, since, limit


def merge_listings(answers: list[dict], partitions: int, limit: int) -> dict | None:
    """One listing from every worker's local one; None unless they cover each partition exactly
    once (the assignment moved between the metadata lookup and the answers)."""
    owned = [p for a in answers for p in a["partitions"]]
    if sorted(owned) != list(range(partitions)):
        return None
    statuses = sorted((s for a in answers for s in a["statuses"]), key=_newest_first)
    return {"scope": "cluster", "count": sum(a["count"] for a in answers), "statuses": statuses[:limit]}


def read_input(event: EventT, codec: Codec, failures: dict, sla_topic: str) -> FoldInput | None:
    """The fold input a message stands for; None for an event type the view does not fold.
    Raises DecodeError / NotAnInput for a message the view cannot read."""
    message = event.message
    if message.topic == sla_topic:
        return sla_input(event.value)
    decoded = codec.decode(event.value)
    headers = headers_to_dict(list(event.headers.items()))
    where = failures.get(message.topic)
    if where is not None:
        order_id = decoded.record.get("order_id")
        if not order_id:
            raise NotAnInput(f"a {decoded.event_type} copy without order_id")
        return failure_input(message.topic, where, headers, order_id)
    if decoded.event_type not in FOLDED_EVENTS:
        return None
    # Every producer sets event_id; the position is a stable stand-in for one that did not.
    event_id = headers.get(EVENT_ID) or f"{message.topic}:{message.partition}:{message.offset}"
    return FoldInput(decoded.event_type, decoded.record, event_id)


def apply_event(event: EventT, codec: Codec, table: Any, failures: dict | None = None,
                sla_topic: str = "") -> Applied | None:
    """Fold one input message into the table; return what changed, or None when nothing did.

    The view must keep running whatever arrives: a message it cannot read is logged and skipped
    here (its producer's consumers dead-letter it; the view only reports).
    """
    message = event.message
    position = f"{message.topic}:{message.partition}:{message.offset}"
    where = {"topic": message.topic, "partition": message.partition, "offset": message.offset}
    try:
        fold_input = read_input(event, codec, failure_topics() if failures is None else failures, sla_topic)
    except (DecodeError, NotAnInput) as exc:
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
    webhook when one is configured) when an order passes its SLA or one of its steps is
    dead-lettered."""
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


def _alert(webhook: Alerter | None, alert: str, status: OrderStatus, **fields: Any) -> None:
    payload = {"event": "order_status.alert", "alert": alert, "order_id": status.order_id,
               "state": status.state, "reason": status.reason, **fields}
    log.error(json.dumps(payload, default=str))
    if webhook is not None:
        webhook.post(json.loads(json.dumps({**payload, "group": "order-status",
                                            "at": datetime.now(UTC).isoformat()}, default=str)))


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
