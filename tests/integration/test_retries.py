"""Failures and worker controls of the shared consumer loop, against the real broker, with
fault-injecting handlers: retries and their due times, classification, dead letters and their
headers, alerts, per-key order under concurrency, the rate limit and the circuit breaker.

Each test runs a small service (an `effects` table; the handler records when it ran and emits an
OrderRecorded) on its own consumer group and topics. Delays are short; assertions are on
outcomes (rows, topic contents, counts per time window) and on recorded times compared with each
other (a run with its due time), never on how long something took: the machine may be busy. Where
time itself is what is tested (due times, rate-limit windows, the breaker's cool-down) the loop
gets a clock the test moves (`ManualClock`), as the unit tests of those parts do.
"""

from __future__ import annotations

import json
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
from typer.testing import CliRunner

from conftest import settings_for
from reading import Received, read_topic, wait_until
from services.cli.main import app as cli
from services.runtime import metrics, topology
from services.runtime.alerts import BREAKER_CLOSED, BREAKER_OPENED, DEAD_LETTERED, RETRYING, Alerter
from services.runtime.circuit import CLOSED, BreakerConfig
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.consumer import ServiceConsumer
from services.runtime.controls import WorkerControls
from services.runtime.envelope import EVENT_ID, Envelope, new_event_id
from services.runtime.errors import PermanentError, RetryableError
from services.runtime.events import OrderCreated, OrderLine, OrderRecorded
from services.runtime.failure_notices import read_notice
from services.runtime.handler import Service, UnitOfWork
from services.runtime.kafka import make_consumer, make_producer
from services.runtime.ratelimit import RateLimit
from services.runtime.topology import ConsumerGroup, TopicSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CODEC = Codec(EmbeddedRegistry())
NO_BREAKER = WorkerControls(breaker=None)

Behaviour = Callable[[OrderCreated, int], None]  # (event, how many times this order was tried before)


class ManualClock:
    """A clock the test moves: it stands still until `advance`d, or `run_until` a moment, up to
    which it runs with real time and where it stops again."""

    def __init__(self, now: float = 1000.0):
        self._lock = threading.Lock()
        self._at, self._since, self._until = now, None, now

    def __call__(self) -> float:
        with self._lock:
            if self._since is None:
                return self._at
            return min(self._at + (time.monotonic() - self._since), self._until)

    def advance(self, seconds: float) -> None:
        now = self()
        with self._lock:
            self._at, self._since = now + seconds, None

    def run_until(self, moment: float) -> None:
        now = self()
        with self._lock:
            self._at, self._since, self._until = now, time.monotonic(), moment


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
    clock: Callable[[], float] = time.time  # the loop's (due times), also for the recorded run times
    limiter_clock: Callable[[], float] | None = None  # the rate limiter's; None: its own (monotonic)
    breaker_clock: Callable[[], float] | None = None  # the circuit breaker's; None: its own (monotonic)
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
            started = self.clock()
            with self.lock:
                tried = self.calls[event.order_id]
                self.calls[event.order_id] += 1
            self.behaviour(event, tried)  # may raise, may sleep like I/O (before any database statement)
            uow.conn.execute(self.effects.insert().values(
                event_id=uow.envelope.event_id, order_id=event.order_id, seq=event.customer_id,
                started_at=started, handled_at=self.clock()))
            return [OrderRecorded(order_id=event.order_id, units=1, revenue=event.total, currency=event.currency,
                                  recorded_at=uow.now)]

        self.service = Service(self.group, metadata, {OrderCreated: [handle]}, batch_size=100,
                               retryable=self.retryable, permanent=self.permanent, controls=self.controls)
        metadata.create_all(self.engine)
        settings = settings_for(self.bootstrap)
        self.consumer = ServiceConsumer(self.service, self.engine, make_consumer(settings, self.group.name),
                                        make_producer(settings), CODEC, clock=self.clock, alerter=self.alerter)
        if self.limiter_clock is not None:
            self.consumer.limiter.clock = self.limiter_clock
        if self.breaker_clock is not None:
            self.consumer.breaker.clock = self.breaker_clock
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
        assert self.producer.flush(30) == 0

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
    ran: dict[int, float] = {}  # attempt -> when its handler ran (after the loop measured its lateness)

    def flaky(event: OrderCreated, tried: int) -> None:
        ran[tried + 1] = time.time()
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
    # each retried run came at or after its due time; how late is measured, and not overstated:
    # the loop measures it just before the handler runs (compared with recorded times, not with
    # a bound on how long the runs took, which a busy machine stretches)
    late = [ran[2] - float(first.headers["x-due-at"]), ran[3] - float(second.headers["x-due-at"])]
    assert min(late) >= 0, f"a retry ran before its due time: {late}"
    count, total = sample(metrics.RETRY_LATENESS, r.group.name)
    assert count == 2 and 0 <= total <= sum(late) + 1e-6, f"lateness of the two retried runs is measured: {total}"
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


@pytest.mark.parametrize("concurrency", [1, 4], ids=["one-lane", "four-lanes"])
def test_every_routed_failure_of_an_order_has_its_notice_for_the_order_status_view(rig, monkeypatch, concurrency):
    """Beside each retry or dead-letter copy, the runtime writes a notice to orderpipe.failures
    (what the order-status view reads instead of every retry and dead-letter topic); only for
    topics keyed by order id."""
    def fails(event: OrderCreated, tried: int) -> None:
        if event.customer_id == "000001":
            raise PermanentError("card declined")
        if tried == 0:
            raise RetryableError("SMTP server busy")

    r = rig(fails, retry_delays_s=(0.3,), controls=WorkerControls(concurrency=concurrency, breaker=None))
    # First as a topic keyed by SKU (as stock.adjusted is): its dead letter gets no notice.
    monkeypatch.setattr(topology, "EVENT_TOPICS", [*topology.EVENT_TOPICS, TopicSpec(r.source, key="sku")])
    by_sku = r.produce_order(seq=1)
    r.flush()
    wait_until(lambda: r.read(r.dlt), what="the dead letter of the topic keyed by SKU")
    monkeypatch.setattr(topology, "EVENT_TOPICS", [*topology.EVENT_TOPICS[:-1], TopicSpec(r.source)])
    declined, retried = r.produce_order(seq=1), r.produce_order(seq=2)
    r.flush()
    wait_until(lambda: r.rows(retried.order_id), what="the retried order's effect")
    wait_until(lambda: len(r.read(r.dlt)) == 2, what="the declined order's dead letter")

    notices = {}
    for m in r.read(topology.FAILURES):
        if m.key in (by_sku.order_id, declined.order_id, retried.order_id):
            assert m.key not in notices, f"two notices for {m.key}"
            notices[m.key] = read_notice(m.value)
    assert set(notices) == {declined.order_id, retried.order_id}, "the order keyed by SKU has none"
    dead, retry = notices[declined.order_id], notices[retried.order_id]
    assert (dead.group, dead.source, dead.topic, dead.kind, dead.attempt, dead.event_id) == (
        r.group.name, r.source, r.dlt, "dlt", 1, declined.event_id)
    assert (dead.error_type, dead.error, dead.reason) == (
        "services.runtime.errors.PermanentError", "card declined", "not retryable")
    assert (retry.group, retry.source, retry.topic, retry.kind, retry.attempt, retry.event_id) == (
        r.group.name, r.source, r.retry_topic(1), "retry", 1, retried.event_id)
    assert (retry.error_type, retry.error, retry.reason) == (
        "services.runtime.errors.RetryableError", "SMTP server busy", None)
    [copy] = [m for m in r.read(r.retry_topic(1)) if m.key == retried.order_id]
    assert retry.at == copy.headers["x-last-failure-at"]
    # operators read them with `orderpipe tail`, as JSON
    shown = CliRunner().invoke(cli, ["tail", topology.FAILURES, "--from-beginning", "--json"],
                               env={"KAFKA_BOOTSTRAP_SERVERS": r.bootstrap})
    assert shown.exit_code == 0, shown.output
    [line] = [json.loads(text) for text in shown.stdout.splitlines() if f'"key": "{declined.order_id}"' in text]
    assert "error" not in line and line["value"] == json.loads(dead.to_bytes())


def test_no_retry_runs_before_its_due_time_and_other_orders_are_not_held_up(rig):
    flaky_id = str(uuid.uuid4())

    def flaky_once(event: OrderCreated, tried: int) -> None:
        if event.order_id == flaky_id and tried == 0:
            raise RetryableError("dependency down")

    # The loop's clock stands still until the other orders are through, so the retry cannot come
    # due however slowly they go; then it runs with real time up to the due time and stops there.
    clock = ManualClock(time.time())
    # longer than the test consumer's session timeout and max.poll.interval.ms (2 s each)
    r = rig(flaky_once, retry_delays_s=(3.0,), partitions=3, clock=clock)
    r.produce_order(flaky_id)
    others = [r.produce_order() for _ in range(12)]
    r.flush()

    wait_until(lambda: (len(r.rows()) == 12 and r.consumer.totals.deferred >= 1) or r.rows(flaky_id),
               what="the other orders, and the retry held back")
    assert r.rows(flaky_id) == [], "the retry ran before its due time"
    [retry] = r.read(r.retry_topic(1))
    due = float(retry.headers["x-due-at"])
    polls_before, assignments = r.consumer.polls, r.consumer.assignments
    waited_from = time.monotonic()
    clock.run_until(due)  # 3 s of real time from now
    [row] = wait_until(lambda: r.rows(flaky_id), what="the retried order")
    waited = time.monotonic() - waited_from
    r.stop()

    assert r.read(r.retry_topic(1)) == [retry]
    assert row.started_at >= due, f"ran {due - row.started_at:.3f} s before its due time"
    assert row.started_at == due, "and once the loop's clock reached it, without it having to go on"
    assert all(r.rows(o.order_id)[0].handled_at < due for o in others)
    # waiting is neither a busy loop nor a reason to leave the group
    assert r.consumer.polls - polls_before < 20 * waited + 20
    assert r.consumer.assignments == assignments
    count, total = sample(metrics.RETRY_LATENESS, r.group.name)
    assert count == 1 and total == 0.0, "lateness measured on the loop's clock"


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
    # The limiter's clock moves one window on when the test says so, so what runs in a window
    # does not depend on how fast the machine is.
    clock = ManualClock()
    r = rig(partitions=2, limiter_clock=clock,
            controls=WorkerControls(concurrency=2, rate_limit=RateLimit(limit, per_s), breaker=None))
    sent = [r.produce_order() for _ in range(n)]
    r.flush()

    def throttled_s() -> float:  # how long the loop has held messages back, by its own account
        return metrics.THROTTLED_SECONDS.labels(r.group.name)._value.get()

    wait_until(lambda: r.rows(), what="the first order")
    assignments = r.consumer.assignments
    per_window: list[int] = []
    while sum(per_window) < n:
        expected = min(n, sum(per_window) + limit)
        wait_until(lambda: len(r.rows()) >= expected, what=f"{expected} orders")  # not throttled too much
        if expected < n:
            # the window is full: the loop holds the rest back (instead of failing them) and says
            # so; the first time longer than max.poll.interval.ms (2 s here)
            held_from = throttled_s()
            wait_until(lambda: throttled_s() > held_from + (2.5 if not per_window else 0),
                       what="the loop to hold the other orders back")
        per_window.append(len(r.rows()) - sum(per_window))
        clock.advance(per_s)
    r.stop()
    # throttled for longer than max.poll.interval.ms, the loop kept its membership: paused
    # partitions are still polled, so no rebalance and nothing delivered twice
    assert r.consumer.assignments == assignments and r.consumer.totals.duplicates == 0

    # at most `limit` in any window, and as many as that while orders were waiting: 18 orders
    # took the 4 windows they need, no more and no fewer
    assert per_window == [5, 5, 5, 3], f"orders handled per {per_s} s window: {per_window}; limit {limit}"
    assert r.read(r.retry_topic(1)) == [] and r.read(r.dlt) == []
    assert {row.order_id for row in r.rows()} == {s.order_id for s in sent}
    assert throttled_s() > 0


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
    n, cooldown_s = 40, 1.0
    clock = ManualClock()  # the breaker's: its cool-down is over when the test moves it on
    r = rig(smtp, retry_delays_s=(0.2, 0.2), alerter=alerter, breaker_clock=clock,
            controls=WorkerControls(breaker=BreakerConfig(window=5, failure_ratio=1.0, cooldown_s=cooldown_s)))
    sent = [r.produce_order() for _ in range(n)]
    r.flush()

    def routed_when_idle() -> int:
        """Messages sent to a retry or dead-letter topic so far, once the loop has polled a few
        more times (the batch that was running, if any, is over)."""
        polls = r.consumer.polls
        wait_until(lambda: r.consumer.polls >= polls + 3, what="the loop to keep polling")
        return r.consumer.totals.retried + r.consumer.totals.dead_lettered

    wait_until(lambda: BREAKER_OPENED in alerts, what="the breaker to open")
    routed = [routed_when_idle()]
    # the outage goes on: three cool-downs, each ending in one probe, which fails
    for probe in (1, 2, 3):
        assert routed_when_idle() == routed[-1], "messages ran while the breaker was open"
        clock.advance(cooldown_s)
        wait_until(lambda: alerts.count(BREAKER_OPENED) > probe, what=f"probe {probe} to fail")
        routed.append(routed_when_idle())
    routed_during_outage = routed[-1]
    probes = alerts.count(BREAKER_OPENED) - 1
    down.clear()  # the dependency is back
    clock.advance(cooldown_s)

    wait_until(lambda: BREAKER_CLOSED in alerts, what="the breaker to close by itself")
    dead = r.read(r.dlt)
    wait_until(lambda: len(r.rows()) == n - len(dead), what="every other order")
    r.stop()

    assert routed_during_outage <= 5 + probes + 1, f"{routed_during_outage} messages routed during the outage"
    assert [b - a for a, b in zip(routed, routed[1:])] == [1, 1, 1], f"one message per probe: {routed}"
    assert len(dead) <= probes + 1, f"{len(dead)} dead letters: the breaker did not hold them back"
    assert {row.order_id for row in r.rows()} | {d.key for d in dead} == {s.order_id for s in sent}
    assert r.consumer.breaker.state == CLOSED
    assert metrics.BREAKER_STATE.labels(r.group.name)._value.get() == 0
    assert probes == 3, f"{probes} probes in three cool-downs"
