"""Failures and worker controls of the shared consumer loop, against the real broker, with
fault-injecting handlers: retries and their due times, classification, dead letters and their
headers, alerts, per-key order under concurrency, the rate limit and the circuit breaker.

Each test runs a small service (an `effects` table; the handler records when it ran and emits an
OrderRecorded) on its own consumer group and topics. Delays are short; assertions are on
outcomes (rows, topic contents, counts per time window), with tolerances where time is involved.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, select
from sqlalchemy.engine import Engine

from conftest import settings_for
from reading import Received, read_topic, wait_until
from services.runtime import metrics
from services.runtime.alerts import BREAKER_CLOSED, BREAKER_OPENED, DEAD_LETTERED, RETRYING, Alerter
from services.runtime.circuit import CLOSED, BreakerConfig
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.consumer import Service, ServiceConsumer, UnitOfWork
from services.runtime.controls import WorkerControls
from services.runtime.envelope import EVENT_ID, Envelope, new_event_id
from services.runtime.errors import PermanentError, RetryableError
from services.runtime.events import OrderCreated, OrderLine, OrderRecorded
from services.runtime.kafka import make_consumer, make_producer
from services.runtime.ratelimit import RateLimit
from services.runtime.topology import ConsumerGroup

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CODEC = Codec(EmbeddedRegistry())
NO_BREAKER = WorkerControls(breaker=None)

Behaviour = Callable[[OrderCreated, int], None]  # (event, how many times this order was tried before)


# -- the rig --------------------------------------------------------------------------------------


@dataclass
class Rig:
    bootstrap: str
    group: ConsumerGroup
    engine: Engine
    behaviour: Behaviour
    controls: WorkerControls = NO_BREAKER
    retryable: tuple = ()
    permanent: tuple = ()
    alerter: Alerter | None = None
    calls: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop_event: threading.Event = field(default_factory=threading.Event)
    errors: list = field(default_factory=list)

    def __post_init__(self):
        metadata = MetaData()
        self.effects = Table(
            "effects", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("event_id", String(64), nullable=False),
            Column("order_id", String(64), nullable=False),
            Column("seq", String(32), nullable=False),
            Column("started_at", Float, nullable=False),
            Column("handled_at", Float, nullable=False),
        )

        def handle(event: OrderCreated, uow: UnitOfWork) -> list[OrderRecorded]:
            started = time.time()
            with self.lock:
                tried = self.calls[event.order_id]
                self.calls[event.order_id] += 1
            self.behaviour(event, tried)  # may raise, may sleep like I/O (before any database statement)
            uow.conn.execute(self.effects.insert().values(
                event_id=uow.envelope.event_id, order_id=event.order_id, seq=event.customer_id,
                started_at=started, handled_at=time.time()))
            return [OrderRecorded(order_id=event.order_id, units=1, revenue=event.total, currency=event.currency,
                                  recorded_at=uow.now)]

        self.service = Service(self.group, metadata, {OrderCreated: [handle]}, batch_size=100,
                               retryable=self.retryable, permanent=self.permanent, controls=self.controls)
        metadata.create_all(self.engine)
        settings = settings_for(self.bootstrap)
        self.consumer = ServiceConsumer(self.service, self.engine, make_consumer(settings, self.group.name),
                                        make_producer(settings), CODEC, alerter=self.alerter)
        self.producer = make_producer(settings)
        self.thread = threading.Thread(target=self._run, name=f"consumer-{self.group.name}", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.consumer.run(self.stop_event, poll_timeout=0.1)
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.stop_event.set()
            self.thread.join(20)
            assert not self.thread.is_alive(), "consumer thread did not stop"
        assert not self.errors, self.errors

    @property
    def source(self) -> str:
        return self.group.inputs[0]

    @property
    def dlt(self) -> str:
        return self.group.dlt_topic(self.source)

    def retry_topic(self, n: int) -> str:
        return self.group.retry_topic(self.source, n)

    def produce_order(self, order_id: str | None = None, seq: int = 0,
                      extra_headers: list[tuple[str, bytes]] | None = None) -> Sent:
        event = OrderCreated(order_id=order_id or str(uuid.uuid4()), customer_id=f"{seq:06d}",
                             customer_email="ada@example.com", currency="EUR",
                             lines=[OrderLine(sku="SKU-1", quantity=1, unit_price=Decimal("9.90"))],
                             total=Decimal("9.90"), created_at=datetime.now(UTC).replace(microsecond=0))
        envelope = Envelope(new_event_id(), "OrderCreated", OrderCreated.schema_version, event.order_id)
        value = CODEC.encode("OrderCreated", event.model_dump(), OrderCreated.schema_version)
        self.producer.produce(self.source, key=event.order_id.encode(), value=value,
                              headers=envelope.to_headers() + (extra_headers or []))
        return Sent(event.order_id, envelope.event_id, value)

    def flush(self) -> None:
        assert self.producer.flush(10) == 0

    def rows(self, order_id: str | None = None) -> list:
        query = select(self.effects).order_by(self.effects.c.id)
        if order_id is not None:
            query = query.where(self.effects.c.order_id == order_id)
        with self.engine.connect() as conn:
            return conn.execute(query).all()

    def read(self, topic: str) -> list[Received]:
        return read_topic(self.bootstrap, topic)


@dataclass(frozen=True)
class Sent:
    order_id: str
    event_id: str
    value: bytes


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'retries.db'}"


@pytest.fixture
def rig(kafka_bootstrap, private_group, test_engine, sqlite_url) -> Iterator[Callable[..., Rig]]:
    """Factory: a running test service. `database_url=` picks another database than SQLite."""
    made: list[Rig] = []

    def make(behaviour: Behaviour = lambda event, tried: None, *, retry_delays_s=(0.3,), partitions=1,
             database_url: str | None = None, **kwargs) -> Rig:
        group = private_group(retry_delays_s=retry_delays_s, partitions=partitions, prefix="retries")
        made.append(Rig(kafka_bootstrap, group, test_engine(database_url or sqlite_url), behaviour, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.stop_event.set()
    for r in made:
        r.stop()


def sample(histogram, group: str) -> tuple[float, float]:
    """(count, sum) of a labelled histogram."""
    values = {s.name: s.value for s in histogram.collect()[0].samples if s.labels.get("group") == group}
    return values.get(histogram._name + "_count", 0.0), values.get(histogram._name + "_sum", 0.0)


# -- retries, classification, dead letters --------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4], ids=["one-lane", "four-lanes"])
def test_a_transient_failure_succeeds_on_attempt_k(rig, concurrency):
    k = 3

    def flaky(event: OrderCreated, tried: int) -> None:
        if tried < k - 1:
            raise RetryableError(f"attempt {tried + 1}: SMTP server busy")

    r = rig(flaky, retry_delays_s=(0.3, 0.3, 0.3), controls=WorkerControls(concurrency=concurrency, breaker=None))
    sent = r.produce_order()
    r.flush()

    [row] = wait_until(lambda: r.rows(sent.order_id), what="the effect on attempt 3")
    r.stop()

    assert r.calls[sent.order_id] == k and row.event_id == sent.event_id
    [first], [second] = r.read(r.retry_topic(1)), r.read(r.retry_topic(2))
    assert (first.headers["x-attempt"], second.headers["x-attempt"]) == ("1", "2")
    assert r.read(r.retry_topic(3)) == [] and r.read(r.dlt) == []
    assert (r.consumer.totals.retried, r.consumer.totals.processed) == (2, 1)
    count, total = sample(metrics.RETRY_LATENESS, r.group.name)
    assert count == 2 and 0 <= total < 2.0, "lateness of the two retried runs is measured"
    assert metrics.RETRIED.labels(r.group.name)._value.get() == 2


def test_classification_is_typed_and_configurable_per_service(rig):
    class OutOfStock(Exception):
        pass

    kinds = {}

    def fail_by_kind(event: OrderCreated, tried: int) -> None:
        kind = kinds[event.order_id]
        if kind == "declared permanent" or (kind == "default permanent" and tried == 0):
            raise {"declared permanent": OutOfStock, "default permanent": KeyError}[kind](event.order_id)
        if kind == "PermanentError":
            raise PermanentError("bad data")
        if kind == "connection reset":
            raise ConnectionResetError("peer reset")  # an OSError: retryable by default, permanent here
        if kind == "timeout" and tried == 0:
            raise TimeoutError("slow dependency")

    # this service says KeyError is worth retrying and ConnectionResetError is not
    r = rig(fail_by_kind, retryable=(KeyError,), permanent=(OutOfStock, ConnectionResetError))
    sent = {}
    for kind in ("declared permanent", "default permanent", "PermanentError", "connection reset", "timeout"):
        order_id = str(uuid.uuid4())
        kinds[order_id] = kind
        sent[kind] = r.produce_order(order_id)
    r.flush()

    wait_until(lambda: len(r.rows()) == 2, what="the two retried orders to succeed")
    dead = wait_until(lambda: (lambda d: d if len(d) == 3 else None)(r.read(r.dlt)), what="three dead letters")
    r.stop()

    assert {d.key: d.headers["x-exception-type"].rsplit(".", 1)[-1] for d in dead} == {
        sent["declared permanent"].order_id: "OutOfStock", sent["PermanentError"].order_id: "PermanentError",
        sent["connection reset"].order_id: "ConnectionResetError"}
    assert all(d.headers["x-attempt"] == "1" and d.headers["x-reason"] == "not retryable" for d in dead)
    retried = {m.key for m in r.read(r.retry_topic(1))}
    assert retried == {sent["default permanent"].order_id, sent["timeout"].order_id}
    assert {row.order_id for row in r.rows()} == retried


def test_exhausted_retries_are_dead_lettered_with_headers_replaced_on_each_hop_and_alerts(rig, webhook):
    url, posted = webhook
    long_message = "connection refused by smtp.example.com " * 200  # ~8 kB: truncated in the header

    def always(event: OrderCreated, tried: int) -> None:
        raise RetryableError(long_message)

    r = rig(always, retry_delays_s=(0.2, 0.2), controls=WorkerControls(alert_after_attempts=2, breaker=None),
            alerter=None)
    r.consumer.alerter = Alerter(r.group.name, url)
    # a header someone else set (e.g. `orderpipe dlt replay`) travels along, once
    sent = r.produce_order(extra_headers=[("x-replay-count", b"1")])
    r.flush()

    [dead] = wait_until(lambda: r.read(r.dlt), what="the dead letter")
    wait_until(lambda: len(posted) >= 2, what="two webhook alerts")
    r.stop()

    [hop1], [hop2] = r.read(r.retry_topic(1)), r.read(r.retry_topic(2))
    for msg in (hop1, hop2, dead):
        keys = [k for k, _ in msg.raw_headers]
        assert len(keys) == len(set(keys)), f"duplicated headers: {sorted(keys)}"
        assert (msg.key, msg.value, msg.headers[EVENT_ID]) == (sent.order_id, sent.value, sent.event_id)
        assert msg.headers["x-replay-count"] == "1"
        h = msg.headers
        assert (h["x-original-topic"], h["x-original-partition"], h["x-original-offset"], h["x-group"]) == (
            r.source, "0", "0", r.group.name)
        assert int(h["x-original-timestamp"]) > 0
        assert h["x-exception-type"] == "services.runtime.errors.RetryableError"
        assert len(h["x-exception-message"]) == 1000 and h["x-exception-message"] == long_message[:1000]
        tb = h["x-exception-traceback"]
        assert len(tb) <= 4000 and ", in always\n" in tb and "RetryableError: connection refused" in tb
        assert h["x-first-failure-at"] == hop1.headers["x-first-failure-at"]
    assert [m.headers["x-attempt"] for m in (hop1, hop2, dead)] == ["1", "2", "3"]
    assert hop1.headers["x-last-failure-at"] < hop2.headers["x-last-failure-at"] < dead.headers["x-last-failure-at"]
    assert "x-due-at" not in dead.headers and "x-reason" not in hop2.headers
    assert dead.headers["x-reason"] == "retries exhausted after 3 attempts"
    assert r.rows() == []

    kinds = [(a["alert"], a["attempt"]) for a in posted]
    assert kinds == [(RETRYING, 2), (DEAD_LETTERED, 3)]
    assert posted[1]["order_id"] == sent.order_id and posted[1]["topic"] == r.dlt
    assert metrics.ALERTS.labels(r.group.name, DEAD_LETTERED)._value.get() == 1
    assert metrics.DEAD_LETTERED.labels(r.group.name)._value.get() == 1


def test_no_retry_runs_before_its_due_time_and_other_orders_are_not_held_up(rig):
    flaky_id = str(uuid.uuid4())

    def flaky_once(event: OrderCreated, tried: int) -> None:
        if event.order_id == flaky_id and tried == 0:
            raise RetryableError("dependency down")

    # longer than the test consumer's session timeout and max.poll.interval.ms (2 s each)
    r = rig(flaky_once, retry_delays_s=(3.0,), partitions=3)
    r.produce_order(flaky_id)
    others = [r.produce_order() for _ in range(12)]
    r.flush()

    wait_until(lambda: len(r.rows()) == 12, what="the other orders")
    polls_before, assignments = r.consumer.polls, r.consumer.assignments
    waited_from = time.monotonic()
    [row] = wait_until(lambda: r.rows(flaky_id), what="the retried order")
    waited = time.monotonic() - waited_from
    r.stop()

    [retry] = r.read(r.retry_topic(1))
    due = float(retry.headers["x-due-at"])
    assert row.started_at >= due, f"ran {due - row.started_at:.3f} s before its due time"
    assert row.started_at - due < 1.0, "and not much after it"
    assert all(r.rows(o.order_id)[0].handled_at < due for o in others)
    # waiting is neither a busy loop nor a reason to leave the group
    assert r.consumer.polls - polls_before < 20 * waited + 20
    assert r.consumer.assignments == assignments
    count, total = sample(metrics.RETRY_LATENESS, r.group.name)
    assert count == 1 and 0 <= total < 1.0


# -- concurrency ------------------------------------------------------------------------------------


def test_per_key_order_holds_while_different_keys_run_in_parallel(rig, database_url):
    keys, per_key = 8, 10
    in_flight: Counter = Counter()
    order_seen: dict[str, list[int]] = {}
    overlap = {"max_total": 0, "same_key": 0}
    lock = threading.Lock()

    def slow_io(event: OrderCreated, tried: int) -> None:
        with lock:
            in_flight[event.order_id] += 1
            overlap["same_key"] = max(overlap["same_key"], in_flight[event.order_id])
            overlap["max_total"] = max(overlap["max_total"], sum(in_flight.values()))
            order_seen.setdefault(event.order_id, []).append(int(event.customer_id))
        time.sleep(0.02)  # an SMTP send: I/O before the first database statement
        with lock:
            in_flight[event.order_id] -= 1

    r = rig(slow_io, partitions=3, database_url=database_url, controls=WorkerControls(concurrency=4, breaker=None))
    order_ids = [str(uuid.uuid4()) for _ in range(keys)]
    for seq in range(per_key):
        for order_id in order_ids:
            r.produce_order(order_id, seq=seq)
    r.flush()

    wait_until(lambda: len(r.rows()) == keys * per_key, what="every event")
    r.stop()

    assert overlap["same_key"] == 1, "two events of one order ran at the same time"
    assert overlap["max_total"] > 1, "different orders never ran in parallel"
    for order_id in order_ids:
        assert order_seen[order_id] == list(range(per_key))
        assert [int(row.seq) for row in r.rows(order_id)] == list(range(per_key))  # committed in order too
    assert r.consumer.totals.processed == keys * per_key


# -- rate limit ---------------------------------------------------------------------------------------


def test_the_rate_limit_holds_in_every_window_and_slows_instead_of_failing(rig):
    limit, per_s, n = 5, 1.0, 18
    r = rig(partitions=2, controls=WorkerControls(concurrency=2, rate_limit=RateLimit(limit, per_s), breaker=None))
    sent = [r.produce_order() for _ in range(n)]
    r.flush()

    wait_until(lambda: r.rows(), what="the first order")
    assignments = r.consumer.assignments
    wait_until(lambda: len(r.rows()) == n, what="every order")
    r.stop()
    # throttled for longer than max.poll.interval.ms (2 s here), the loop kept its membership:
    # paused partitions are still polled, so no rebalance and nothing delivered twice
    assert r.consumer.assignments == assignments and r.consumer.totals.duplicates == 0

    started = sorted(row.started_at for row in r.rows())
    busiest = max(sum(1 for u in started if t <= u < t + per_s * 0.98) for t in started)
    assert busiest <= limit, f"{busiest} handled within one {per_s} s window; limit {limit}"
    span = started[-1] - started[0]
    assert span >= (n / limit - 1) * per_s * 0.9, f"{n} orders in {span:.2f} s: not limited"
    assert span < (n / limit + 2) * per_s * 2, f"{n} orders took {span:.2f} s: throttled too much"
    assert r.read(r.retry_topic(1)) == [] and r.read(r.dlt) == []
    assert {row.order_id for row in r.rows()} == {s.order_id for s in sent}
    assert metrics.THROTTLED_SECONDS.labels(r.group.name)._value.get() > 0


# -- circuit breaker ------------------------------------------------------------------------------------


def test_the_circuit_breaker_trips_without_flooding_the_dead_letter_topic_and_recovers(rig):
    down = threading.Event()
    down.set()

    def smtp(event: OrderCreated, tried: int) -> None:
        if down.is_set():
            raise RetryableError("SMTP server unreachable")

    alerts: list[str] = []
    alerter = Alerter("breaker-test")
    alerter.alert = lambda kind, message, **details: alerts.append(kind)  # type: ignore[method-assign]
    n = 40
    r = rig(smtp, retry_delays_s=(0.2, 0.2), alerter=alerter,
            controls=WorkerControls(breaker=BreakerConfig(window=5, failure_ratio=1.0, cooldown_s=1.0)))
    sent = [r.produce_order() for _ in range(n)]
    r.flush()

    wait_until(lambda: BREAKER_OPENED in alerts, what="the breaker to open")
    time.sleep(3.0)  # the outage goes on: about three probes, one message each
    routed_during_outage = r.consumer.totals.retried + r.consumer.totals.dead_lettered
    probes = alerts.count(BREAKER_OPENED) - 1
    down.clear()  # the dependency is back

    wait_until(lambda: BREAKER_CLOSED in alerts, what="the breaker to close by itself")
    dead = r.read(r.dlt)
    wait_until(lambda: len(r.rows()) == n - len(dead), what="every other order")
    r.stop()

    assert routed_during_outage <= 5 + probes + 1, f"{routed_during_outage} messages routed during the outage"
    assert len(dead) <= probes + 1, f"{len(dead)} dead letters: the breaker did not hold them back"
    assert {row.order_id for row in r.rows()} | {d.key for d in dead} == {s.order_id for s in sent}
    assert r.consumer.breaker.state == CLOSED
    assert metrics.BREAKER_STATE.labels(r.group.name)._value.get() == 0
    assert probes <= 5, f"{probes} probes in about 3 s with a 1 s cool-down"
