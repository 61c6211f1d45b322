"""The worker's HTTP pages (Faust web): one order's status, lists by state and time across every
worker, readiness and metrics. What this worker holds and whether it can answer is `WorkerView`.

    GET /status/{order_id}/   answered by the worker that owns the key (table_route)
    GET /status/?state=&since=&limit=   every worker's partitions (fan-out), or ?scope=local
    GET /healthz, /ready, /metrics
    GET /openapi.json   what each of them answers (openapi.py)
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import faust
from aiokafka.errors import KafkaError
from faust.exceptions import NotReady
from faust.web.exceptions import ServiceUnavailable

from services.runtime.topology import DEFAULT_PARTITIONS
from streams.order_status.fold import TABLE_NAME, Metrics, partition_of
from streams.order_status.openapi import openapi_document
from streams.order_status.status import ORDER_STATES, matches, parse_since


@dataclass(frozen=True)
class WorkerView:
    """The table as this worker holds it: the partitions it owns, their statuses, and whether
    it can answer now (not while rebalancing or restoring)."""

    app: faust.App
    table: Any

    @property
    def canonical(self) -> str:
        return str(self.app.conf.canonical_url).rstrip("/")

    def local_partitions(self) -> set[int]:
        changelog = self.table.changelog_topic.get_topic_name()
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == changelog}

    def local_items(self) -> list[tuple[bytes, dict]]:
        # Only the partitions this worker owns: a memory:// store also holds standby replicas of
        # other workers' partitions (RocksDB iterates actives only; the filter is then a no-op).
        mine = self.local_partitions()
        return [(k, v) for k, v in self.table.items() if partition_of(k) in mine]

    def not_ready_reason(self) -> str | None:
        if self.app.rebalancing or self.app.in_recovery:
            return "rebalancing or restoring the table from its changelog"
        if not any(self.app.router.table_metadata(TABLE_NAME).values()):
            return "no partition assignment yet"
        return None


def add_pages(app: faust.App, view: WorkerView, metrics: Metrics) -> None:
    """Register the worker's pages on `app`."""

    async def routing_ready() -> None:
        # Faust's router hashes the key with the *producer's* metadata for the changelog topic,
        # which aiokafka fetches only once something was sent there: without this, a worker
        # restarted onto a recovered table answers every lookup with a TypeError (HTTP 500)
        # until the first new event arrives.
        # Only after an assignment, though: a metadata request for a topic that does not exist
        # yet makes a broker with auto-creation (Tansu; Kafka's default) create it with its
        # default partition count, and Faust then refuses the 6-partition changelog forever.
        reason = view.not_ready_reason()
        if reason is not None:
            raise ServiceUnavailable(f"order-status is starting: {reason}")
        try:
            producer = app.producer._ensure_producer()  # the aiokafka producer; private in Faust
            await asyncio.wait_for(producer.partitions_for(view.table.changelog_topic.get_topic_name()), 5.0)
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
    @app.table_route(table=view.table, match_info="order_id")
    async def get_status(web: Any, request: Any, order_id: str) -> Any:
        stored = view.table.get(order_id.encode())
        if stored is None:
            return web.json({"detail": "order not found"}, status=404)
        return web.json(stored)

    def local_listing(states: frozenset[str] | None, since: datetime | None, limit: int) -> dict:
        found = [v for _, v in view.local_items() if matches(v, states, since)]
        found.sort(key=_newest_first)
        return {"scope": "local", "worker": view.canonical, "partitions": sorted(view.local_partitions()),
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
        reason = view.not_ready_reason()
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
            _as_coroutine(local_listing(states, since, limit)) if url == view.canonical else ask_peer(url, params)
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
        reason = view.not_ready_reason()
        body = {"ready": reason is None, "reason": reason, "worker": view.canonical, "store": str(app.conf.store),
                "partitions": sorted(view.local_partitions()), "uptime_s": round(time.time() - metrics.started, 3)}
        if reason is None and request.query.get("count"):
            body["orders"] = len(view.local_items())
        return web.json(body, status=200 if reason is None else 503)

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        return web.text(metrics.prometheus(), content_type="text/plain")

    document = openapi_document()

    @app.page("/openapi.json")
    async def openapi(web: Any, request: Any) -> Any:
        return web.json(document)


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
