"""A service process SIGKILLed at each named crash point (services/runtime/crashpoints.py),
then started again: every effect exactly once, and the offsets never ahead of committed work.

The random kills of the crash test almost never land in the narrow gaps between a database
commit, a produce, its ack and the offset store; here each gap is hit on purpose. Inventory
runs one lane (one transaction per batch), e-mail eight (one transaction per message, the SMTP
send before the commit); both on SQLite and PostgreSQL, on the broker of the run. The points of
one service and database run side by side, each on its own consumer group and database.

What each case checks:
- right after the kill, every input message below the group's committed offset is done: its
  inbox row is committed, or (the undecodable one) its dead letter is in the topic;
- after the restart: each order's effect exactly once (stock reserved once, one outcome event
  per order in the outbox, one `sent_emails` row per order), every outbox row published, and the
  committed offsets at the end of the input;
- mails: one Message-ID per order; a resend (same Message-ID) only when the kill fell between
  an SMTP send and its commit, at most one per lane;
- the dead letter once, twice only when the kill fell after its produce and before the offsets
  past it were committed (it is read again and produced again, with the same headers): checked
  right after the kill, since with lanes and auto-commit that can be a later batch's kill point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import func, select, text

from conftest import settings_for, unique_name
from reading import read_all, wait_until
from services.email.smtp_sink import SmtpSink
from services.email.tables import sent_emails
from services.inventory.settings import InventorySettings
from services.inventory.tables import reservations, stock
from services.inventory.catalog import CATALOG
from services.runtime.admin import ensure_topics
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.crashpoints import POINTS
from services.runtime.db import make_engine
from services.runtime.envelope import EVENT_ID, Envelope, new_event_id
from services.runtime.events import OrderCreated, OrderLine
from services.runtime.kafka import make_producer
from services.runtime.topology import STOCK_RESERVED, TopicSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("crash_point_worker.py")
CODEC = Codec(EmbeddedRegistry())
ORDERS = 12
PARTITIONS = 3
EMAIL_LANES = 8
CONSUMER_POINTS = [p for p in POINTS if p.startswith("consumer.")]
RELAY_POINTS = [p for p in POINTS if p.startswith("relay.")]
HELD_POINTS = [p for p in POINTS if p.startswith("held.")]
# The e-mail handler sends before its first statement, which begins the message's transaction
# with the inbox claim: a kill at these points falls between an SMTP send and its commit, in
# each lane at most once.
BETWEEN_SEND_AND_COMMIT = {"consumer.after_inbox_claim", "consumer.after_handler"}
# A dead letter may reach the topic after a kill at these: on its way, not yet acked (a batch's
# copies are acked before the next batch; at a relay point the consumer loop of the same process
# is anywhere in its batch).
COPY_MAY_BE_IN_FLIGHT = {"consumer.after_copies_produced", *RELAY_POINTS}


@dataclass
class Case:
    point: str
    group: str
    database_url: str
    orders: dict[str, str]  # order id -> event id
    log: Path
    proc: subprocess.Popen | None = None
    # At the kill: the dead letter was produced and the offsets past the undecodable message were
    # not committed, so the restart reads it again and may dead-letter it once more.
    dead_letter_may_repeat: bool = False

    @property
    def input_topic(self) -> str:
        return f"{self.group}.in"

    @property
    def dlt_topic(self) -> str:
        return f"{self.input_topic}.{self.group}.dlt"


def _env(service: str, case: Case, bootstrap: str, smtp_port: int | None, crash_at: str | None,
         extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "KAFKA_BOOTSTRAP_SERVERS": bootstrap, f"ORDERPIPE_{service.upper()}_DATABASE_URL": case.database_url,
           "ORDERPIPE_HEALTH_PORT": "0", "ORDERPIPE_LOG_JSON": "false", "ORDERPIPE_FETCH_WAIT_MAX_MS": "100",
           "ORDERPIPE_SESSION_TIMEOUT_MS": "3000", "ORDERPIPE_MAX_POLL_INTERVAL_MS": "3000",
           # small batches: each well inside the 3 s poll interval on a loaded machine (the
           # e-mail service's batch of every order's mails outlasted it, left the group, and
           # after rejoining repeated a dead letter)
           "ORDERPIPE_CONSUMER_BATCH_SIZE": "10",
           "ORDERPIPE_RELAY_POLL_INTERVAL_S": "0.02"}
    if smtp_port:
        env.update(ORDERPIPE_SMTP_HOST="127.0.0.1", ORDERPIPE_SMTP_PORT=str(smtp_port))
    env.pop("ORDERPIPE_CRASH_AT", None)
    env.update(extra or {})
    if crash_at:
        env["ORDERPIPE_CRASH_AT"] = crash_at
    return env


def _start(service: str, case: Case, bootstrap: str, smtp_port: int | None, crash_at: str | None,
           extra_env: dict[str, str] | None = None) -> None:
    with case.log.open("ab") as log:
        case.proc = subprocess.Popen([sys.executable, str(WORKER), service, case.group, "0.2"], cwd=REPO,
                                     env=_env(service, case, bootstrap, smtp_port, crash_at, extra_env),
                                     stdout=log, stderr=subprocess.STDOUT)


def _place_orders(bootstrap: str, case: Case) -> None:
    """ORDERS orders over the input's partitions, and one undecodable message (a dead letter)."""
    stocked = [item.sku for item in CATALOG if item.stocked]
    producer = make_producer(settings_for(bootstrap))
    for i in range(ORDERS):
        order_id = str(uuid.uuid4())
        event = OrderCreated(order_id=order_id, customer_id=f"c{i}", customer_email=f"c{i}@example.com",
                             currency="EUR", lines=[OrderLine(sku=stocked[i % len(stocked)], quantity=1 + i % 3,
                                                              unit_price=Decimal("5"))],
                             total=Decimal("5"), created_at=datetime.now(UTC).replace(microsecond=0))
        envelope = Envelope(new_event_id(), "OrderCreated", OrderCreated.schema_version, order_id)
        producer.produce(case.input_topic, key=order_id.encode(), headers=envelope.to_headers(),
                         value=CODEC.encode("OrderCreated", event.model_dump(), OrderCreated.schema_version))
        case.orders[order_id] = envelope.event_id
        if i == ORDERS // 2:
            producer.produce(case.input_topic, key=b"undecodable", value=b"\x00not avro at all",
                             headers=[(EVENT_ID, new_event_id().encode())])
    assert producer.flush(15) == 0


def _committed(bootstrap: str, case: Case) -> dict[int, int]:
    client = Consumer({"bootstrap.servers": bootstrap, "group.id": case.group, "enable.auto.commit": False,
                       "log_level": 0})
    try:
        parts = client.committed([TopicPartition(case.input_topic, p) for p in range(PARTITIONS)], timeout=15)
        return {tp.partition: max(tp.offset, 0) for tp in parts}
    finally:
        client.close()


def _inbox_ids(engine, group: str) -> set[str]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT event_id FROM inbox WHERE group_name = :g"), {"g": group}).all()
    return {r.event_id for r in rows}


def _check_offsets_not_ahead(bootstrap: str, case: Case) -> None:
    """After the kill: below each committed offset, every message's work is committed, or the
    message is in the retry chain (its copy acked) or stored behind its key's retried head
    (ordered retries). Notes whether the dead letter may be produced again after the restart."""
    committed = _committed(bootstrap, case)
    engine = make_engine(case.database_url)
    try:
        done = _inbox_ids(engine, case.group) | _held_ids(engine, case.group) if _has_inbox(engine) else set()
    finally:
        engine.dispose()
    dead = {h.get(EVENT_ID) for *_, h in read_all(bootstrap, case.dlt_topic)}
    # a failed message whose retry copy the broker acked is done with here too (ordered retries)
    done |= {h.get(EVENT_ID) for *_, h in read_all(bootstrap, f"{case.input_topic}.{case.group}.retry.1")}
    for partition, offset, key, _value, headers in read_all(bootstrap, case.input_topic):
        if offset < committed.get(partition, 0):
            ok = headers.get(EVENT_ID) in (dead if key == "undecodable" else done)
            assert ok, f"{case.point}: offset {offset} of partition {partition} committed, its work is not"
        elif key == "undecodable":
            case.dead_letter_may_repeat = headers.get(EVENT_ID) in dead or case.point in COPY_MAY_BE_IN_FLIGHT


def _held_ids(engine, group: str) -> set[str]:
    from sqlalchemy import inspect

    if not inspect(engine).has_table("held_events"):
        return set()
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT event_id FROM held_events WHERE group_name = :g"), {"g": group}).all()
    return {r.event_id for r in rows}


def _has_inbox(engine) -> bool:
    from sqlalchemy import inspect

    return inspect(engine).has_table("inbox")


def _input_ends(bootstrap: str, case: Case) -> dict[int, int]:
    ends = Counter(p for p, *_ in read_all(bootstrap, case.input_topic))
    return {p: ends[p] for p in range(PARTITIONS)}


def _wait_finished(bootstrap: str, case: Case) -> None:
    engine = make_engine(case.database_url)
    ends = _input_ends(bootstrap, case)  # the input is complete before the restart
    try:
        def finished() -> bool:
            if not _has_inbox(engine) or _inbox_ids(engine, case.group) < set(case.orders.values()):
                return False
            with engine.connect() as conn:
                unpublished = conn.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar_one()
            # the offsets too: on a loaded machine a batch can outlast max.poll.interval.ms, and
            # the consumer commits only once it has rejoined the group
            return unpublished == 0 and bool(read_all(bootstrap, case.dlt_topic)) and _committed(bootstrap, case) == ends

        wait_until(finished, timeout=90, what=f"{case.point}: every order handled and published after the restart")
    finally:
        engine.dispose()


def _stop(case: Case) -> None:
    case.proc.send_signal(signal.SIGTERM)
    assert case.proc.wait(30) == 0, f"{case.point}: the restarted service did not stop cleanly; see {case.log}"


def _run_cases(service: str, points: list[str], bootstrap: str, new_database: Callable[[], str], tmp_path: Path,
               smtp_port: int | None = None) -> list[Case]:
    cases = []
    for point in points:
        case = Case(point, unique_name(f"cp-{service}"), new_database(), {}, tmp_path / f"{point}.log")
        group_topics = [case.input_topic, f"{case.input_topic}.{case.group}.retry.1", case.dlt_topic]
        ensure_topics({"bootstrap.servers": bootstrap}, [TopicSpec(t, partitions=PARTITIONS) for t in group_topics])
        _place_orders(bootstrap, case)
        cases.append(case)
    for case in cases:  # side by side: each its own group, topics and database
        _start(service, case, bootstrap, smtp_port, crash_at=case.point)
    for case in cases:
        try:
            code = case.proc.wait(90)
        except subprocess.TimeoutExpired:
            case.proc.kill()
            raise AssertionError(f"{case.point} was never reached; see {case.log}") from None
        assert code == -signal.SIGKILL, f"{case.point}: exited with {code}, not killed there; see {case.log}"
        _check_offsets_not_ahead(bootstrap, case)
    for case in cases:
        _start(service, case, bootstrap, smtp_port, crash_at=None)
    try:
        for case in cases:
            _wait_finished(bootstrap, case)
    finally:
        for case in cases:
            if case.proc.poll() is None:
                _stop(case)
    for case in cases:
        assert _committed(bootstrap, case) == _input_ends(bootstrap, case), f"{case.point}: input not consumed to its end"
        dead = read_all(bootstrap, case.dlt_topic)
        assert {key for _, _, key, _, _ in dead} == {"undecodable"}
        assert len(dead) == 1 or (case.dead_letter_may_repeat and len(dead) == 2), \
            f"{case.point}: {len(dead)} dead letters for one undecodable message"
    return cases


def _check_stock_once(case: Case, initial: int) -> None:
    engine = make_engine(case.database_url)
    try:
        with engine.connect() as conn:
            reserved = conn.execute(select(reservations.c.order_id, func.count()).group_by(reservations.c.order_id)).all()
            levels = conn.execute(select(stock.c.sku, stock.c.available, stock.c.reserved)).all()
            outcomes = conn.execute(text("SELECT aggregateid, count(*) FROM outbox GROUP BY aggregateid")).all()
    finally:
        engine.dispose()
    assert {order for order, _ in reserved} == set(case.orders), f"{case.point}: not every order reserved"
    assert all(n == 1 for _, n in reserved), f"{case.point}: an order reserved twice: {reserved}"
    expected = Counter()
    stocked = [item.sku for item in CATALOG if item.stocked]
    for i in range(ORDERS):
        expected[stocked[i % len(stocked)]] += 1 + i % 3
    for sku, available, held in levels:
        assert held == expected[sku] and available + held == (initial if sku in stocked else 0), \
            f"{case.point}: {sku} reserved {held}, expected {expected[sku]}"
    assert dict(outcomes) == dict.fromkeys(case.orders, 1), f"{case.point}: not one outcome event per order"


def test_inventory_killed_at_each_consumer_and_relay_point(kafka_bootstrap, database_factory, tmp_path):
    """One lane: one transaction per batch."""
    cases = _run_cases("inventory", CONSUMER_POINTS + RELAY_POINTS, kafka_bootstrap, database_factory, tmp_path)
    published = Counter((key, headers.get(EVENT_ID)) for _, _, key, _, headers in read_all(kafka_bootstrap, STOCK_RESERVED))
    for case in cases:
        _check_stock_once(case, InventorySettings().initial_stock)
        # every outbox row on the topic; twice at most (a kill between its produce and the row
        # marked published sends it again, with the same event id: the readers' inboxes absorb it)
        engine = make_engine(case.database_url)
        try:
            with engine.connect() as conn:
                rows = {(r.aggregateid, r.id) for r in conn.execute(text("SELECT aggregateid, id FROM outbox"))}
        finally:
            engine.dispose()
        mine = {row: n for row, n in published.items() if row[0] in case.orders}
        assert set(mine) == rows, f"{case.point}: the topic does not hold exactly the outbox's events"
        assert max(mine.values()) <= 2, f"{case.point}: an outbox event published {max(mine.values())} times"


def test_email_killed_at_each_consumer_point(kafka_bootstrap, database_factory, tmp_path):
    """Eight lanes: a transaction per message, the SMTP send before its commit."""
    with SmtpSink(tmp_path / "mail") as sink:
        cases = _run_cases("email", CONSUMER_POINTS, kafka_bootstrap, database_factory, tmp_path, smtp_port=sink.port)
        mails = sink.messages()
    from services.email.mailer import message_id_for

    sent = Counter(m["Message-ID"] for m in mails)
    for case in cases:
        expected = {message_id_for(event_id) for event_id in case.orders.values()}
        mine = {mid: n for mid, n in sent.items() if mid in expected}
        assert set(mine) == expected, f"{case.point}: not one mail per order"
        resends = sum(mine.values()) - len(mine)
        allowed = EMAIL_LANES if case.point in BETWEEN_SEND_AND_COMMIT else 0
        assert resends <= allowed, f"{case.point}: {resends} mails sent twice (at most {allowed})"
        engine = make_engine(case.database_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(select(sent_emails.c.order_id, func.count()).group_by(sent_emails.c.order_id)).all()
        finally:
            engine.dispose()
        assert dict(rows) == dict.fromkeys(case.orders, 1), f"{case.point}: not one sent_emails row per order"


# -- ordered retries per key: the held path --------------------------------------------------------

EMAIL_FAIL_RATE = 0.5
# Each order's two events (OrderCreated, then OrderCancelled, one key): the confirmation fails
# first (its key is held, the cancel is stored behind it), then the cancellation mail goes through
# at once, or fails too when it is released (it becomes the head). Message-IDs come from event
# ids, and the injected failures from the Message-IDs, so the ids are chosen for each pattern.
PATTERNS = [(True, False), (True, True), (False, False)]  # (confirmation fails, cancellation fails)


def _event_id_that(fails: bool) -> str:
    from services.email.faults import injected_failures
    from services.email.mailer import message_id_for

    while True:
        event_id = new_event_id()
        if injected_failures(message_id_for(event_id), EMAIL_FAIL_RATE) == (1 if fails else 0):
            return event_id  # one failure at most: the worker's retry chain has one tier


def _place_orders_and_cancels(bootstrap: str, case: Case) -> dict[str, str]:
    """ORDERS orders, each created and then cancelled, and one undecodable message. The creates'
    event ids go to `case.orders`; returns the cancels' (order id -> event id)."""
    from services.runtime.events import OrderCancelled

    producer = make_producer(settings_for(bootstrap))
    cancels = {}
    at = datetime.now(UTC).replace(microsecond=0)
    for i in range(ORDERS):
        order_id = str(uuid.uuid4())
        create_fails, cancel_fails = PATTERNS[i % len(PATTERNS)]
        created = OrderCreated(order_id=order_id, customer_id=f"c{i}", customer_email=f"c{i}@example.com",
                               currency="EUR", lines=[OrderLine(sku="SKU-001", quantity=1, unit_price=Decimal("5"))],
                               total=Decimal("5"), created_at=at)
        cancelled = OrderCancelled(order_id=order_id, customer_id=f"c{i}", customer_email=f"c{i}@example.com",
                                   cancelled_at=at)
        ids = []
        for event, fails in ((created, create_fails), (cancelled, cancel_fails)):
            envelope = Envelope(_event_id_that(fails), event.event_type(), event.schema_version, order_id)
            producer.produce(case.input_topic, key=order_id.encode(), headers=envelope.to_headers(),
                             value=CODEC.encode(event.event_type(), event.model_dump(), event.schema_version))
            ids.append(envelope.event_id)
        case.orders[order_id], cancels[order_id] = ids
        if i == ORDERS // 2:
            producer.produce(case.input_topic, key=b"undecodable", value=b"\x00not avro at all",
                             headers=[(EVENT_ID, new_event_id().encode())])
    assert producer.flush(15) == 0
    return cancels


def test_email_killed_at_each_held_key_point(kafka_bootstrap, database_factory, tmp_path):
    """Ordered retries' own gaps: an event stored behind its retried head, a released event
    committed, a released event failed (made the head) before and after its retry copy. After
    the restart every order has one confirmation and then one cancellation mail, in that order,
    and nothing is left held."""
    from services.email.mailer import message_id_for
    from services.email.tables import cancelled_orders

    faults = {"ORDERPIPE_EMAIL_FAIL_RATE": str(EMAIL_FAIL_RATE)}
    with SmtpSink(tmp_path / "mail") as sink:
        cases, cancels = [], {}
        for point in HELD_POINTS:
            case = Case(point, unique_name("cp-held"), database_factory(), {}, tmp_path / f"{point}.log")
            topics = [case.input_topic, f"{case.input_topic}.{case.group}.retry.1", case.dlt_topic]
            ensure_topics({"bootstrap.servers": kafka_bootstrap}, [TopicSpec(t, partitions=PARTITIONS) for t in topics])
            cancels[point] = _place_orders_and_cancels(kafka_bootstrap, case)
            cases.append(case)
        for case in cases:
            _start("email", case, kafka_bootstrap, sink.port, crash_at=case.point, extra_env=faults)
        for case in cases:
            try:
                code = case.proc.wait(90)
            except subprocess.TimeoutExpired:
                case.proc.kill()
                raise AssertionError(f"{case.point} was never reached; see {case.log}") from None
            assert code == -signal.SIGKILL, f"{case.point}: exited with {code}, not killed there; see {case.log}"
            _check_offsets_not_ahead(kafka_bootstrap, case)
        for case in cases:  # without the faults: a mail's injected failure would come again in a new process
            _start("email", case, kafka_bootstrap, sink.port, crash_at=None)
        try:
            for case in cases:
                engine = make_engine(case.database_url)
                try:
                    every_event = set(case.orders.values()) | set(cancels[case.point].values())
                    ends = _input_ends(kafka_bootstrap, case)

                    def finished() -> bool:
                        if _inbox_ids(engine, case.group) < every_event or _held_ids(engine, case.group):
                            return False
                        with engine.connect() as conn:
                            unpublished = conn.execute(
                                text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar_one()
                            held_keys = conn.execute(text("SELECT count(*) FROM held_keys")).scalar_one()
                        # offsets committed too (see _wait_finished)
                        return unpublished == 0 and held_keys == 0 and _committed(kafka_bootstrap, case) == ends

                    wait_until(finished, timeout=120, what=f"{case.point}: every order mailed and released")
                finally:
                    engine.dispose()
        finally:
            for case in cases:
                if case.proc.poll() is None:
                    _stop(case)
        mails = sink.messages()  # in arrival order

    for case in cases:
        assert _committed(kafka_bootstrap, case) == _input_ends(kafka_bootstrap, case), \
            f"{case.point}: input not consumed to its end"
        confirmation = {order: message_id_for(event_id) for order, event_id in case.orders.items()}
        cancellation = {order: message_id_for(event_id) for order, event_id in cancels[case.point].items()}
        arrivals = [m["Message-ID"] for m in mails]
        for order in case.orders:
            assert confirmation[order] in arrivals and cancellation[order] in arrivals, f"{case.point}: {order}"
            assert arrivals.index(confirmation[order]) < arrivals.index(cancellation[order]), \
                f"{case.point}: order {order} got its cancellation mail before its confirmation"
        mine = Counter(mid for mid in arrivals if mid in {*confirmation.values(), *cancellation.values()})
        resends = sum(mine.values()) - len(mine)
        # several lanes: other lanes may be between a send and its commit when one parks and is killed
        allowed = EMAIL_LANES if case.point == "held.after_park" else 0
        assert resends <= allowed, f"{case.point}: {resends} mails sent twice (at most {allowed})"
        engine = make_engine(case.database_url)
        try:
            with engine.connect() as conn:
                confirmed = dict(conn.execute(select(sent_emails.c.order_id, func.count())
                                              .group_by(sent_emails.c.order_id)).all())
                compensated = set(conn.execute(select(cancelled_orders.c.order_id)).scalars())
        finally:
            engine.dispose()
        assert confirmed == dict.fromkeys(case.orders, 1), f"{case.point}: not one confirmation per order"
        assert compensated == set(case.orders), f"{case.point}: not one cancellation per order"
        dead = read_all(kafka_bootstrap, case.dlt_topic)
        assert {key for _, _, key, _, _ in dead} == {"undecodable"}
