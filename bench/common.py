"""Shared pieces of the bench: sizes, timing, sample events, scratch databases."""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal

from services.runtime.catalog import CATALOG
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.events import OrderCreated, OrderLine

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CODEC = Codec(EmbeddedRegistry())


@dataclass(frozen=True)
class Sizes:
    """How much each section does. Three profiles; the command line can override any field."""

    raw_messages: int          # (a) produced, then consumed
    relay_rows: int            # (b) outbox rows published, per database
    consumer_messages: int     # (c) events per idempotent-consumer case
    naive_messages: int        # (e) events for the one-transaction-per-message baseline
    e2e_rate: float            # (d) offered load in orders/s for the latency phase
    e2e_seconds: float         # (d) length of the latency phase at e2e_rate
    e2e_capacity_orders: int   # (d) orders posted as fast as the API takes them
    e2e_sustainable_seconds: float = 60  # (d) at half the capacity (the soak length with --soak)
    e2e_concurrency: int = 32  # (d) requests in flight during the capacity phase
    recovery_orders: int = 100_000

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Sizes] = {
    # Seconds, not minutes: proves every section runs and writes numbers (tests, CI).
    "smoke": Sizes(raw_messages=2_000, relay_rows=300, consumer_messages=1_500, naive_messages=60,
                   e2e_rate=20, e2e_seconds=3, e2e_capacity_orders=60, e2e_concurrency=8,
                   e2e_sustainable_seconds=3, recovery_orders=300),
    "quick": Sizes(raw_messages=50_000, relay_rows=10_000, consumer_messages=5_000, naive_messages=500,
                   e2e_rate=250, e2e_seconds=10, e2e_capacity_orders=1_500, e2e_sustainable_seconds=20,
                   recovery_orders=10_000),
    "full": Sizes(raw_messages=300_000, relay_rows=30_000, consumer_messages=20_000, naive_messages=2_000,
                  e2e_rate=250, e2e_seconds=20, e2e_capacity_orders=5_000, e2e_sustainable_seconds=60),
}


def sizes_for(profile: str, **overrides) -> Sizes:
    return replace(PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None})


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def figure(count: int, seconds: float, cpu_s: float | None = None, **extra) -> dict:
    """A throughput measurement as stored in the JSON. `cpu_s` is the CPU time the measuring
    process used meanwhile (all its threads, librdkafka's included): `per_cpu_s` is what one
    dedicated core would do, which stays meaningful on a shared machine."""
    out = {"count": count, "seconds": round(seconds, 4), "per_s": round(rate(count, seconds), 1)}
    if cpu_s is not None:
        out.update(cpu_s=round(cpu_s, 4), per_cpu_s=round(rate(count, cpu_s), 1))
    return {**out, **extra}


def sample_order(rng: random.Random, order_id: str | None = None, now: datetime | None = None) -> OrderCreated:
    stocked = [item for item in CATALOG if item.stocked]
    items = rng.sample(stocked, rng.randint(1, 3))
    lines = [OrderLine(sku=it.sku, quantity=rng.randint(1, 4), unit_price=it.unit_price) for it in items]
    return OrderCreated(
        order_id=order_id or str(uuid.uuid4()), customer_id=f"customer-{rng.randint(1, 500):04d}",
        customer_email=f"c{rng.randint(1, 10**6)}@example.com", currency="EUR",
        lines=lines, total=sum((l.quantity * l.unit_price for l in lines), Decimal("0.00")),
        created_at=now or datetime.now(UTC), channel="web")


def sample_http_order(rng: random.Random) -> dict:
    """A POST /orders body with stocked SKUs only: every bench order is expected COMPLETED."""
    stocked = [item for item in CATALOG if item.stocked]
    items = rng.sample(stocked, rng.randint(1, 3))
    return {"customer_id": f"customer-{rng.randint(1, 500):04d}",
            "customer_email": f"c{rng.randint(1, 10**6)}@example.com", "currency": "EUR",
            "lines": [{"sku": it.sku, "quantity": rng.randint(1, 4), "unit_price": str(it.unit_price)}
                      for it in items]}


def encoded_order_created(rng: random.Random) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, Avro wire-format value, envelope headers) of one OrderCreated, as the relay sends it."""
    event = sample_order(rng)
    envelope = Envelope(event_id=new_event_id(), event_type="OrderCreated",
                        schema_version=OrderCreated.schema_version, correlation_id=event.order_id)
    value = CODEC.encode("OrderCreated", event.model_dump(), envelope.schema_version)
    return event.order_id.encode(), value, envelope.to_headers()


@contextmanager
def timer() -> Iterator[list[float]]:
    """with timer() as t: ...; t[0] is the elapsed time in seconds."""
    box = [0.0]
    start = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - start


def postgres_reachable(url: str) -> str | None:
    """None when PostgreSQL answers at `url`, else the reason it does not."""
    try:
        import psycopg

        psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1), connect_timeout=3).close()
        return None
    except Exception as exc:  # any failure means "skip PostgreSQL, say why"
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


@contextmanager
def scratch_postgres(base_url: str, label: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for one section, dropped afterwards."""
    from sqlalchemy import text

    from services.runtime.db import make_engine

    name = f"orderpipe_bench_{label}_{uuid.uuid4().hex[:8]}"
    admin = make_engine(base_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield f"{base_url.rsplit('/', 1)[0]}/{name}"
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def machine_info() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "load_avg": [round(x, 2) for x in os.getloadavg()]}
