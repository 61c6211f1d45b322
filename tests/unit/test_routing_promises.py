"""README promises of the consumer loop's routing (services/runtime/consumer.py), one per test.

Each test drives `ServiceConsumer.handle_batch` with the fake Kafka clients of `kafka_fakes`
(what was produced and which offsets were stored can be inspected) on a real SQLite database in
`tmp_path`, with a fake clock, and checks one promise of README.md:

- "Nothing is dropped silently": an event type without a handler in the group goes to the
  group's dead-letter topic with the reason, and the consumer keeps running;
- "Retries beyond the declared tiers reuse the last tier's topic", and after the last attempt
  the message is a dead letter with `x-reason: retries exhausted after N attempts`;
- exponential backoff: retry n waits `initial * multiplier^(n-1)`, spread by +-jitter;
- "Classification": retryable are `RetryableError`, `TimeoutError`, `ConnectionError`, `OSError`
  and anything unknown; permanent (dead letter at once, `x-attempt: 1`, `x-reason: not
  retryable`) are `PermanentError`, `ValueError`, `KeyError`, `TypeError`;
- `orderpipe_messages_duplicate_total{group}` counts the redeliveries found in the inbox.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.engine import Engine

from kafka_fakes import FakeConsumer, FakeMessage, FakeProducer
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.consumer import BatchResult, ServiceConsumer
from services.runtime.controls import WorkerControls
from services.runtime.db import make_engine
from services.runtime.envelope import EVENT_ID, Envelope
from services.runtime.errors import PermanentError, RetryableError, is_retryable
from services.runtime.events import Event, OrderCreated, OrderLine, ReservedLine, StockReserved
from services.runtime.handler import Service, UnitOfWork
from services.runtime.retry_policy import RetryPolicy
from services.runtime.topology import ConsumerGroup

CODEC = Codec(EmbeddedRegistry())
NOW = 1_800_000_000.0  # the fake clock's epoch seconds
CREATED_AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


# -- the rig ------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


Behaviour = Callable[[Event], None]  # may raise; runs before the handler's database statement


@dataclass
class Rig:
    group: ConsumerGroup
    consumer: ServiceConsumer
    producer: FakeProducer
    kafka: FakeConsumer
    engine: Engine
    effects: Table
    clock: FakeClock

    @property
    def source(self) -> str:
        return self.group.inputs[0]

    def run(self, *messages: FakeMessage) -> BatchResult:
        return self.consumer.handle_batch(list(messages))

    def copies(self) -> list[dict]:
        """Retry and dead-letter copies produced so far, in order (a snapshot)."""
        return list(self.producer.produced)

    def stored(self) -> list[tuple[str, int, int]]:
        return [(tp.topic, tp.partition, tp.offset) for tp in self.kafka.stored]

    def effect_count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(self.effects)).scalar_one()


@pytest.fixture
def make_rig(tmp_path) -> Iterator[Callable[..., Rig]]:
    """`make_rig(group_name, behaviour, handled=(OrderCreated,), controls=...)`: a service on its
    own SQLite file whose handler for each `handled` type runs `behaviour` (which may raise),
    then records an effect row."""
    built: list[tuple[ServiceConsumer, Engine]] = []

    def make(group_name: str, behaviour: Behaviour = lambda event: None, *,
             handled: tuple[type[Event], ...] = (OrderCreated,), retry_delays_s: tuple[float, ...] = (1, 10, 60),
             controls: WorkerControls | None = None) -> Rig:
        group = ConsumerGroup(group_name, inputs=(f"{group_name}.in",), retry_delays_s=retry_delays_s)
        metadata = MetaData()
        effects = Table("effects", metadata, Column("id", Integer, primary_key=True, autoincrement=True),
                        Column("event_id", String(64), nullable=False))

        def handle(event: Event, uow: UnitOfWork) -> None:
            behaviour(event)
            uow.conn.execute(effects.insert().values(event_id=uow.envelope.event_id))

        service = Service(group, metadata, {cls: [handle] for cls in handled},
                          controls=controls or WorkerControls())
        engine = make_engine(f"sqlite:///{tmp_path / group_name}.db")
        metadata.create_all(engine)
        clock = FakeClock()
        producer, kafka = FakeProducer(), FakeConsumer()
        consumer = ServiceConsumer(service, engine, kafka, producer, CODEC, clock=clock)
        built.append((consumer, engine))
        return Rig(group, consumer, producer, kafka, engine, effects, clock)

    yield make
    for consumer, engine in built:
        if consumer.pool:
            consumer.pool.shutdown(wait=True)
        engine.dispose()


def order_created(order_id: str) -> OrderCreated:
    return OrderCreated(order_id=order_id, customer_id="c-1", customer_email="ada@example.com", currency="EUR",
                        lines=[OrderLine(sku="SKU-1", quantity=1, unit_price=Decimal("9.90"))],
                        total=Decimal("9.90"), created_at=CREATED_AT)


def stock_reserved(order_id: str) -> StockReserved:
    return StockReserved(order_id=order_id, lines=[ReservedLine(sku="SKU-1", quantity=1)], reserved_at=CREATED_AT)


def message(topic: str, offset: int, event: Event, headers: dict[str, str] | None = None) -> FakeMessage:
    """An encoded event with its envelope headers (a fresh event id), keyed by its order id."""
    envelope = Envelope(str(uuid.uuid4()), event.event_type(), event.schema_version, event.order_id)
    value = CODEC.encode(event.event_type(), event.model_dump(), event.schema_version)
    extra = [(name, text.encode()) for name, text in (headers or {}).items()]
    return FakeMessage(topic, offset, value, envelope.to_headers() + extra, key=event.order_id.encode())


def consumed_copy(copy: dict, offset: int) -> FakeMessage:
    """A produced retry copy as the consumer reads it back from its retry topic."""
    return FakeMessage(copy["topic"], offset, copy["value"], list(copy["headers"].items()), key=copy["key"])


def header(copy: dict, name: str) -> str | None:
    value = copy["headers"].get(name)
    return None if value is None else value.decode()


def duplicates_metric(group: str) -> float:
    """The exported sample, as Prometheus scrapes it from `/metrics`."""
    return REGISTRY.get_sample_value("orderpipe_messages_duplicate_total", {"group": group})


# -- 1. no handler in the group: a dead letter, and the consumer goes on -------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
def test_an_event_type_without_a_handler_is_dead_lettered_as_not_retryable_and_the_partition_moves_on(
        make_rig, concurrency):
    """README, "Nothing is dropped silently": a message that has no handler in the group goes to
    the group's dead-letter topic with the reason; the consumer keeps running."""
    rig = make_rig(f"promise-nohandler-{concurrency}", handled=(OrderCreated,),
                   controls=WorkerControls(concurrency=concurrency))
    unhandled = message(rig.source, 10, stock_reserved("o-1"))
    handled = message(rig.source, 11, order_created("o-2"))

    result = rig.run(unhandled, handled)

    assert (result.dead_lettered, result.retried, result.processed) == (1, 0, 1)
    [copy] = rig.copies()
    assert copy["topic"] == rig.group.dlt_topic(rig.source) == f"{rig.source}.{rig.group.name}.dlt"
    assert header(copy, "x-exception-type") == "services.runtime.errors.MissingHandler"
    assert header(copy, "x-reason") == "not retryable"
    assert header(copy, "x-attempt") == "1"
    assert "StockReserved" in header(copy, "x-exception-message")
    assert copy["value"] == unhandled.value() and copy["key"] == b"o-1"
    assert header(copy, EVENT_ID) == dict(unhandled.headers())[EVENT_ID].decode()
    # the consumer went on: the next message ran, and the offset is stored past both
    assert rig.effect_count() == 1
    assert rig.stored() == [(rig.source, 0, 12)]


# -- 2. retries beyond the declared tiers reuse the last tier's topic ---------------------------------


def test_retries_beyond_the_declared_tiers_reuse_the_last_tier_topic_until_the_attempts_run_out(make_rig):
    """README, retry policy: "Retries beyond the declared tiers reuse the last tier's topic (the
    due time, not the topic, says when a message may run)"; after `RETRY_MAX_ATTEMPTS` attempts
    the message goes to `<topic>.<group>.dlt` with `x-reason: retries exhausted after N attempts`."""

    def always_fails(event: Event) -> None:
        raise RetryableError("smtp down")

    policy = RetryPolicy.fixed(1.0, max_attempts=4)  # one declared tier, four attempts
    rig = make_rig("promise-lasttier", always_fails, retry_delays_s=(1.0,),
                   controls=WorkerControls(retry=policy, breaker=None))
    tier_1 = f"{rig.source}.{rig.group.name}.retry.1"
    assert rig.consumer.topics() == [rig.source, tier_1]  # there is no retry.2 to read from
    second_retry = message(tier_1, 5, order_created("o-1"), headers={
        "x-original-topic": rig.source, "x-attempt": "2", "x-due-at": f"{NOW - 1:.3f}"})

    result = rig.run(second_retry)  # attempt 3 fails

    assert (result.retried, result.dead_lettered) == (1, 0)
    [third] = rig.copies()
    assert third["topic"] == tier_1  # not retry.3 (or retry.2): those are neither declared nor read
    assert header(third, "x-attempt") == "3"
    assert header(third, "x-original-topic") == rig.source
    assert float(header(third, "x-due-at")) == pytest.approx(NOW + 1.0, abs=0.001)
    assert header(third, "x-reason") is None
    assert rig.stored() == [(tier_1, 0, 6)]

    rig.clock.now = float(header(third, "x-due-at"))  # due now: it runs
    result = rig.run(consumed_copy(third, 6))  # attempt 4, the last one, fails

    assert (result.retried, result.dead_lettered) == (0, 1)
    last = rig.copies()[-1]
    assert last["topic"] == f"{rig.source}.{rig.group.name}.dlt"
    assert header(last, "x-reason") == "retries exhausted after 4 attempts"
    assert header(last, "x-attempt") == "4"
    assert header(last, "x-due-at") is None
    assert header(last, "x-exception-type") == "services.runtime.errors.RetryableError"
    assert rig.stored()[-1] == (tier_1, 0, 7)


# -- 3. exponential backoff with jitter, inside the loop ----------------------------------------------


@pytest.fixture
def seeded_random() -> Iterator[None]:
    """`RetryPolicy.delay_s` draws from the module-level `random`: seed it for a repeatable run,
    and give the other tests their random state back afterwards."""
    state = random.getstate()
    random.seed(20260101)
    yield
    random.setstate(state)


def test_exponential_backoff_due_times_are_jittered_within_bounds_and_differ_between_messages(
        make_rig, seeded_random):
    """README, retry policy: "Exponential: retry n waits `initial * multiplier^(n-1)`, spread by
    +-jitter (a fraction) so a burst of failures does not come back as a burst"."""

    def always_fails(event: Event) -> None:
        raise RetryableError("down")

    policy = RetryPolicy.exponential(initial_delay_s=10, multiplier=2, max_delay_s=60, jitter=0.2, max_attempts=4)
    rig = make_rig("promise-backoff", always_fails, controls=WorkerControls(retry=policy, breaker=None))
    burst = [message(rig.source, offset, order_created(f"o-{offset}")) for offset in range(12)]

    result = rig.run(*burst)  # a burst of first attempts fails

    assert result.retried == len(burst)
    first = rig.copies()
    assert {c["topic"] for c in first} == {rig.group.retry_topic(rig.source, 1)}
    delays = [float(header(c, "x-due-at")) - NOW for c in first]
    assert all(10 * 0.8 - 0.001 <= d <= 10 * 1.2 + 0.001 for d in delays), delays
    assert len({round(d, 3) for d in delays}) == len(delays), "every message got the same due time"
    assert min(delays) < 10 < max(delays), "jitter spreads to both sides of the base delay"

    rig.clock.now = NOW + 100  # every first retry is due; they fail again
    result = rig.run(*[consumed_copy(c, offset) for offset, c in enumerate(first)])

    assert result.retried == len(burst)
    second = rig.copies()[len(first):]
    assert {c["topic"] for c in second} == {rig.group.retry_topic(rig.source, 2)}
    assert {header(c, "x-attempt") for c in second} == {"2"}
    delays = [float(header(c, "x-due-at")) - (NOW + 100) for c in second]
    assert all(20 * 0.8 - 0.001 <= d <= 20 * 1.2 + 0.001 for d in delays), delays  # 10 * 2^1
    assert len({round(d, 3) for d in delays}) == len(delays)


# -- 4. the default classification, without service lists ---------------------------------------------


class SomethingUnheardOf(Exception):
    """An exception type the runtime knows nothing about."""


CLASSIFICATION = [
    pytest.param(RetryableError("dependency down"), True, id="RetryableError"),
    pytest.param(RuntimeError("boom"), True, id="RuntimeError"),
    pytest.param(OSError(5, "I/O error"), True, id="OSError"),
    pytest.param(ConnectionError("connection reset"), True, id="ConnectionError"),
    pytest.param(TimeoutError("timed out"), True, id="TimeoutError"),
    pytest.param(SomethingUnheardOf("?"), True, id="unknown-custom-Exception"),
    pytest.param(ValueError("bad amount"), False, id="ValueError"),
    pytest.param(KeyError("sku"), False, id="KeyError"),
    pytest.param(TypeError("not a number"), False, id="TypeError"),
    pytest.param(PermanentError("business rule"), False, id="PermanentError"),
]


@pytest.mark.parametrize(("exc", "retryable"), CLASSIFICATION)
def test_is_retryable_by_default_retries_transient_and_unknown_errors_but_not_bad_data(exc, retryable):
    """README, "Classification": retryable are RetryableError, TimeoutError, ConnectionError,
    OSError and anything unknown; permanent are PermanentError, ValueError, KeyError, TypeError."""
    assert is_retryable(exc) is retryable


@pytest.mark.parametrize(("exc", "retryable"), CLASSIFICATION)
def test_the_loop_retries_or_dead_letters_at_once_by_the_default_classification(make_rig, exc, retryable):
    """README, "Classification": without service lists, a retryable failure goes to the first
    retry tier; a permanent one goes straight to the dead-letter topic with `x-attempt: 1` and
    `x-reason: not retryable`."""

    def fails(event: Event) -> None:
        raise exc

    rig = make_rig(f"promise-classify-{type(exc).__name__}", fails)
    assert rig.consumer.service.retryable == () and rig.consumer.service.permanent == ()

    result = rig.run(message(rig.source, 0, order_created("o-1")))

    [copy] = rig.copies()
    assert header(copy, "x-attempt") == "1"
    assert header(copy, "x-exception-type") == f"{type(exc).__module__}.{type(exc).__qualname__}"
    if retryable:
        assert (result.retried, result.dead_lettered) == (1, 0)
        assert copy["topic"] == f"{rig.source}.{rig.group.name}.retry.1"
        assert float(header(copy, "x-due-at")) == pytest.approx(NOW + 1, abs=0.001)
        assert header(copy, "x-reason") is None
    else:
        assert (result.retried, result.dead_lettered) == (0, 1)
        assert copy["topic"] == f"{rig.source}.{rig.group.name}.dlt"
        assert header(copy, "x-reason") == "not retryable"
        assert header(copy, "x-due-at") is None
    assert rig.effect_count() == 0
    assert rig.stored() == [(rig.source, 0, 1)]


# -- 5. the duplicate counter --------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
def test_duplicate_counter_rises_by_exactly_the_redeliveries_whose_inbox_row_exists(make_rig, concurrency):
    """README, metrics: `orderpipe_messages_duplicate_total{group}` counts "Redeliveries found in
    the inbox". A redelivered message whose first delivery failed has no inbox row: it runs, and
    is not a duplicate."""
    failed_once: set[str] = set()

    def flaky_for_o3(event: Event) -> None:
        if event.order_id == "o-3" and event.order_id not in failed_once:
            failed_once.add(event.order_id)
            raise RetryableError("once")

    group = f"promise-duplicates-{concurrency}"
    rig = make_rig(group, flaky_for_o3, controls=WorkerControls(concurrency=concurrency))
    a, b, c = (message(rig.source, n, order_created(f"o-{n}")) for n in (1, 2, 3))
    d = message(rig.source, 4, order_created("o-4"))
    start = duplicates_metric(group)

    first = rig.run(a, b, c)  # a and b commit; c fails (retried, no inbox row)

    assert (first.processed, first.retried, first.duplicates) == (2, 1, 0)
    assert duplicates_metric(group) == start

    second = rig.run(a, b, c, d)  # the batch is redelivered (a rebalance), with d behind it

    assert (second.processed, second.duplicates) == (2, 2)  # c and d run; a and b are no-ops
    assert duplicates_metric(group) == start + 2
    assert rig.effect_count() == 4  # one effect per event


@pytest.mark.parametrize("concurrency", [1, 4])
def test_the_same_event_twice_in_one_batch_runs_once_and_counts_one_duplicate(make_rig, concurrency):
    """README, metrics and inbox: a second copy of an event (same event id) is a no-op and is
    counted in `orderpipe_messages_duplicate_total{group}`, also when both copies arrive together."""
    group = f"promise-duplicates-in-batch-{concurrency}"
    rig = make_rig(group, controls=WorkerControls(concurrency=concurrency))
    original = message(rig.source, 0, order_created("o-1"))
    copy = FakeMessage(rig.source, 1, original.value(), original.headers(), key=original.key())
    start = duplicates_metric(group)

    result = rig.run(original, copy)

    assert (result.processed, result.duplicates) == (1, 1)
    assert duplicates_metric(group) == start + 1
    assert rig.effect_count() == 1
    assert rig.stored() == [(rig.source, 0, 2)]
