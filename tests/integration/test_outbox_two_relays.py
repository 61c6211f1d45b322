"""Two outbox relays on one PostgreSQL outbox, while writers insert rows concurrently.

What a second relay instance (a rolling deploy, a hot standby) must not break: every row is
published exactly once, each order's events keep their order on the topic, and a transaction
that took its `seq` early but commits late is still published. Midway the leading relay is
stopped and the standby takes over.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, defaultdict

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from sqlalchemy import func, select

from conftest import settings_for, unique_name
from services import registry
from services.orders.tables import outbox
from services.runtime.admin import ensure_topics
from services.runtime.kafka import make_producer
from services.runtime.migrate import upgrade_database
from services.runtime.outbox import OutboxRelay
from services.runtime.topology import TopicSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PARTITIONS = 3
WRITERS = 4
ORDERS_PER_WRITER = 25
EVENTS_PER_ORDER = 5
LATE_ORDERS = 3


class WatchedRelay(OutboxRelay):
    """Counts what it publishes and notes whether another relay was publishing at the same time."""

    active = 0
    overlaps = 0
    lock = threading.Lock()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.published = 0
        self.calls = 0

    def publish_batch(self) -> int:
        self.calls += 1
        with WatchedRelay.lock:
            WatchedRelay.active += 1
            WatchedRelay.overlaps += WatchedRelay.active > 1
        try:
            n = super().publish_batch()
        finally:
            with WatchedRelay.lock:
                WatchedRelay.active -= 1
        self.published += n
        return n


def insert(conn, topic: str, order_id: str, n: int) -> str:
    event_id = str(uuid.uuid4())
    conn.execute(outbox.insert().values(
        id=event_id, aggregatetype="order", aggregateid=order_id, type="TestEvent", topic=topic,
        payload=f"{order_id}:{n}".encode(), headers=[["event_id", event_id], ["n", str(n)]]))
    return event_id


@pytest.mark.parametrize("database_factory", ["postgresql"], indirect=True)
def test_two_relays_publish_every_row_once_in_order(kafka_bootstrap, database_url, test_engine):
    WatchedRelay.active = WatchedRelay.overlaps = 0
    topic = unique_name("relays")
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, [TopicSpec(topic, partitions=PARTITIONS)])
    engine = test_engine(database_url)
    upgrade_database(engine, registry.service("orders"))
    settings = settings_for(kafka_bootstrap)
    relays = [WatchedRelay(engine, outbox, make_producer(settings, **{"client.id": f"relay-{i}"}), batch_size=40)
              for i in range(2)]
    stops = [threading.Event() for _ in relays]
    relay_threads = [threading.Thread(target=r.run, args=(s, 0.01), daemon=True) for r, s in zip(relays, stops)]
    for t in relay_threads:
        t.start()

    expected: dict[str, list[str]] = {}  # order id -> its event ids in the order they were committed
    errors: list[BaseException] = []

    def late_writer():
        """Takes its seqs first, then commits only after the relays published higher ones."""
        try:
            with engine.begin() as conn:
                ids = {f"late-{k}": [insert(conn, topic, f"late-{k}", n) for n in range(EVENTS_PER_ORDER)]
                       for k in range(LATE_ORDERS)}
                deadline = time.monotonic() + 30
                while sum(r.published for r in relays) < 100 and time.monotonic() < deadline:
                    time.sleep(0.02)
            expected.update(ids)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def writer(w: int):
        try:
            orders = [f"w{w}-{k}" for k in range(ORDERS_PER_WRITER)]
            for n in range(EVENTS_PER_ORDER):
                for order_id in orders:  # one transaction per event, orders interleaved
                    with engine.begin() as conn:
                        expected.setdefault(order_id, []).append(insert(conn, topic, order_id, n))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    late = threading.Thread(target=late_writer)
    late.start()
    time.sleep(0.2)  # the late transaction holds the lowest seqs
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for t in writers:
        t.start()

    # Once writing is under way, stop whichever relay leads: the standby must take over.
    total = WRITERS * ORDERS_PER_WRITER * EVENTS_PER_ORDER + LATE_ORDERS * EVENTS_PER_ORDER
    _wait(lambda: sum(r.published for r in relays) >= total // 3, "a third of the rows published")
    leader = max(range(2), key=lambda i: relays[i].published)
    stops[leader].set()
    relay_threads[leader].join(30)

    for t in [late, *writers]:
        t.join(60)
    assert errors == []
    with engine.connect() as conn:
        late_seqs = conn.execute(select(func.max(outbox.c.seq)).where(outbox.c.aggregateid.like("late-%"))).scalar()
        assert conn.execute(select(func.count()).where(outbox.c.seq > late_seqs)).scalar() > 100, \
            "the late transaction must hold seqs below rows published before it committed"
    _wait(lambda: relays[1 - leader].backlog() == 0, "the standby to publish the rest")
    stops[1 - leader].set()
    relay_threads[1 - leader].join(30)

    received = _read(kafka_bootstrap, topic, total)
    by_event = Counter(event_id for _, event_id, _ in received)
    assert len(by_event) == total, "every row is published (none skipped)"
    assert [e for e, c in by_event.items() if c > 1] == [], "no row is published twice"
    seen: dict[str, list[str]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for order_id, event_id, partition in received:
        seen[order_id].append(event_id)
        partitions[order_id].add(partition)
    assert dict(seen) == expected, "each order's events arrive in the order they were committed"
    assert all(len(p) == 1 for p in partitions.values())
    assert relays[leader].published > 0 and relays[1 - leader].published > 0, "both relays led in turn"
    assert WatchedRelay.overlaps == 0, "two relays were publishing at the same time"


def _wait(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _read(bootstrap: str, topic: str, expected: int, idle_s: float = 2.0) -> list[tuple[str, str, int]]:
    """(order id, event id, partition) of every message, in partition order. Reads until `expected`
    messages arrived and then `idle_s` more with nothing new, so duplicates would show up too
    (end offsets are not used: the embedded broker's ListOffsets is unreliable)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("reader"),
                         "enable.auto.commit": False, "isolation.level": "read_committed", "log_level": 0})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    out: dict[int, list[tuple[int, str, str]]] = defaultdict(list)
    count, last_new, deadline = 0, time.monotonic(), time.monotonic() + 60
    try:
        while time.monotonic() < deadline and (count < expected or time.monotonic() - last_new < idle_s):
            for m in consumer.consume(500, 0.2):
                if m.error():
                    continue
                headers = dict(m.headers() or ())
                out[m.partition()].append((m.offset(), m.key().decode(), headers["event_id"].decode()))
                count += 1
                last_new = time.monotonic()
    finally:
        consumer.close()
    return [(key, event_id, p) for p in sorted(out) for _, key, event_id in sorted(out[p])]


@pytest.mark.parametrize("database_factory", ["postgresql"], indirect=True)
def test_relay_that_loses_its_session_stops_and_starts_over(kafka_bootstrap, database_url, test_engine):
    """The database cuts the leader's connections (a restart, a failover) and its advisory lock
    goes with the session, so the standby takes the lead. The old leader must notice and stop
    publishing (else both publish the same rows), and keep running as a standby instead of dying
    (a consumer service's events would wait forever).

    For the old leader the cut is a crash: a batch it had in flight may be acked by the broker
    and then fail to be marked, so the new leader sends it again (at-least-once; the inboxes
    absorb it). That batch, and one that passed the lock check just before the cut, are all the
    duplicates allowed."""
    from sqlalchemy import text

    WatchedRelay.active = WatchedRelay.overlaps = 0
    topic = unique_name("relay-session")
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, [TopicSpec(topic, partitions=PARTITIONS)])
    engine = test_engine(database_url)
    upgrade_database(engine, registry.service("orders"))
    settings = settings_for(kafka_bootstrap)
    relays = [WatchedRelay(engine, outbox, make_producer(settings), batch_size=10) for _ in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=r.run, args=(stop, 0.01), daemon=True) for r in relays]
    threads[0].start()
    ids = []
    try:
        for round_ in range(6):
            with engine.begin() as conn:
                ids += [insert(conn, topic, "order-1", n) for n in range(round_ * 20, round_ * 20 + 20)]
            if round_ == 1:
                with engine.connect() as conn:  # end every session of the first relay on this database
                    conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                      "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
                    conn.commit()
                calls_at_cut = relays[0].calls
                threads[1].start()  # the standby: it gets the lock the first relay lost
            time.sleep(0.3)
        _wait(lambda: relays[0].backlog() == 0, "every row to be published")
        assert all(t.is_alive() for t in threads)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    received = [event_id for _, event_id, _ in _read(kafka_bootstrap, topic, len(ids))]
    assert list(dict.fromkeys(received)) == ids, "every row published, first copies in order"
    assert len(received) - len(ids) <= 2 * relays[0].batch_size, "only the batches in flight at the cut again"
    assert relays[0].calls <= calls_at_cut + 1, "the old leader kept publishing after losing its lock"
