"""The dead-letter tools' pure parts: REFs, times, filters, the handled state (the rule that a
purge or replay never marks an unselected message), replay headers and parking decisions, and
the runtime carrying replay headers along the retry chain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import MetaData

from kafka_fakes import FakeConsumer, FakeMessage, FakeProducer
from services import registry
from services.ops.reprocess import parse_rate
from services.ops.audit import Run, runs
from services.ops.deadletters import (H_REPLAY_COUNT, H_REPLAY_OF, DeadLetter, DltTopic, Filter, Ref, parse_time,
                                      resolve_groups)
from services.ops.errors import OpsError
from services.ops.handled import HandledState, from_ranges, to_ranges
from services.ops.reprocess import Item, Selection, Snapshot, copy_headers, plan_replay
from services.runtime import failure_headers as fh
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.consumer import ServiceConsumer
from services.runtime.db import make_engine
from services.runtime.envelope import EVENT_ID, EVENT_TYPE
from services.runtime.errors import RetryableError
from services.runtime.events import OrderCreated
from services.runtime.handler import Service
from services.runtime.topology import ConsumerGroup

GROUP = ConsumerGroup("email", inputs=("orders.created",))
DLT = DltTopic(GROUP, "orders.created")
AT = datetime(2026, 3, 14, 9, 0, tzinfo=UTC)


def dead_letter(offset: int = 5, *, key: bytes | None = b"order-1", exc: str = "services.email.mailer.MailRejected",
                at: datetime = AT, replays: int | None = None, partition: int = 0) -> DeadLetter:
    headers = [(EVENT_ID, b"ev-1"), (EVENT_TYPE, b"OrderCreated"), (fh.H_ORIGINAL_TOPIC, b"orders.created"),
               (fh.H_ATTEMPT, b"4"), (fh.H_REASON, b"retries exhausted after 4 attempts"), (fh.H_EXC_TYPE, exc.encode()),
               (fh.H_EXC_MESSAGE, b"550 relaying denied"), (fh.H_EXC_TRACEBACK, b"Traceback ...")]
    if replays is not None:
        headers += [(H_REPLAY_COUNT, str(replays).encode()), (H_REPLAY_OF, b"x:0:1")]
    return DeadLetter(Ref(DLT.name, partition, offset), DLT, key, b"\x00value", tuple(headers),
                      int(at.timestamp() * 1000))


def test_refs_round_trip_and_bad_ones_say_what_is_expected():
    ref = Ref.parse("orders.created.email.dlt:3:17")
    assert (ref.topic, ref.partition, ref.offset) == ("orders.created.email.dlt", 3, 17)
    assert str(ref) == "orders.created.email.dlt:3:17"
    for bad in ("orders.created.email.dlt", "t:x:1", "t:1:-1", ":1:2", "t:1"):
        with pytest.raises(OpsError, match="bad REF .*TOPIC:PARTITION:OFFSET"):
            Ref.parse(bad)


def test_times_are_iso_8601_or_a_duration_ago():
    now = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
    assert parse_time("2026-03-14", now) == datetime(2026, 3, 14, tzinfo=UTC)  # no zone: UTC
    assert parse_time("2026-03-14T09:30+01:00", now) == datetime(2026, 3, 14, 8, 30, tzinfo=UTC)
    assert parse_time("2026-03-14T09:30:00Z", now) == datetime(2026, 3, 14, 9, 30, tzinfo=UTC)
    assert parse_time("30m", now) == now - timedelta(minutes=30)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("7d", now) == now - timedelta(days=7)
    with pytest.raises(OpsError, match="bad time 'yesterday'"):
        parse_time("yesterday", now)
    with pytest.raises(OpsError, match="is after --until"):
        Filter(since=now, until=now - timedelta(hours=1))


def test_filters_match_on_time_exception_key_and_event_type():
    dl = dead_letter()
    assert Filter().matches(dl) and Filter().empty
    assert Filter(exception_type="MailRejected").matches(dl)
    assert Filter(exception_type="mailer.MailRejected").matches(dl)
    assert Filter(exception_type="services.email.mailer.MailRejected").matches(dl)
    assert not Filter(exception_type="Rejected").matches(dl)  # whole name parts only
    assert Filter(key="order-1").matches(dl) and not Filter(key="order-2").matches(dl)
    assert Filter(event_type="OrderCreated").matches(dl) and not Filter(event_type="StockReserved").matches(dl)
    assert Filter(since=AT - timedelta(minutes=1), until=AT + timedelta(minutes=1)).matches(dl)
    assert not Filter(since=AT + timedelta(seconds=1)).matches(dl)
    assert not Filter(until=AT - timedelta(seconds=1)).matches(dl)
    assert Filter(key="order-1", exception_type="MailRejected").describe() == {
        "key": "order-1", "exception_type": "MailRejected"}


def test_unknown_group_names_the_known_ones():
    assert resolve_groups(registry.GROUPS, "email")[0].name == "email"
    with pytest.raises(OpsError, match="unknown group 'mail'; known groups: inventory, email, invoice, analytics"):
        resolve_groups(registry.GROUPS, "mail")


def test_ranges():
    assert to_ranges([7, 3, 4, 5, 9, 4]) == [[3, 5], [7, 7], [9, 9]]
    assert list(from_ranges([[3, 5], [9, 9]])) == [3, 4, 5, 9]


def test_handled_offsets_never_move_past_an_unselected_message():
    key = ("d", 0)
    state = HandledState()
    state.mark(key, [0, 1, 3, 4])  # offset 2 was not selected
    assert state.offset(key) == 2
    assert [o for o in range(6) if state.is_handled(key, o)] == [0, 1, 3, 4]
    state.mark(key, [2])  # once it is handled too, the offset moves over the whole prefix
    assert state.offset(key) == 5 and state.above[key] == set()


def test_handled_state_loads_from_group_offsets_and_audit_records():
    key = ("d", 0)
    records = [
        Run("purge", {}, 2).record("running", handled={key: [3, 4]}, committed={key: 2}),
        Run("replay", {}, 1).record("running", handled={("d", 1): [0]}, committed={("d", 1): 1}),
    ]
    # the group offsets expired (Kafka drops those of memberless groups after 7 days): audit wins
    state = HandledState.load({key: None, ("d", 1): None}, records)
    assert state.offset(key) == 2 and state.is_handled(key, 3) and not state.is_handled(key, 2)
    assert state.offset(("d", 1)) == 1
    assert state.handled_between(key, 0, 6) == 4  # 0, 1, 3, 4
    state = HandledState.load({key: 10}, records)  # a later commit covers everything
    assert state.offset(key) == 10 and state.above[key] == set()
    state.raise_floor(("d", 1), 5)  # retention deleted offsets below 5
    assert state.offset(("d", 1)) == 5


def test_audit_runs_show_the_last_record_and_flag_runs_without_a_final_one():
    run = Run("replay", {"topics": ["d"]}, 3, user="ada", host="ops-1")
    run.add(Ref("d", 0, 7))
    run.add(Ref("d", 0, 9), parked=True)
    records = [run.record("started"), run.record("running", handled={("d", 0): [7, 9]}, committed={("d", 0): 0})]
    [line] = runs(records)
    assert line["outcome"] == "incomplete (last seen running)"
    final = run.record("completed")
    assert (final["count"], final["parked"], final["first"], final["last"]) == (2, 1, "d:0:7", "d:0:9")
    assert final["offsets"] == {"d": {"0": [7, 9]}} and (final["user"], final["host"]) == ("ada", "ops-1")
    assert runs([*records, final])[0]["outcome"] == "completed"


def test_replay_to_the_retry_chain_is_due_now_and_keeps_key_value_and_envelope():
    dl = dead_letter(replays=1)
    headers = copy_headers(Item(dl, "replay", DLT.retry_topic), "run-1", 1000.0)
    names = [k for k, _ in headers]
    as_dict = dict(headers)
    assert as_dict[EVENT_ID] == b"ev-1" and as_dict[fh.H_ORIGINAL_TOPIC] == b"orders.created"
    assert as_dict[fh.H_ATTEMPT] == b"1" and as_dict[fh.H_DUE_AT] == b"1000.000"
    assert fh.H_REASON not in as_dict
    assert as_dict[H_REPLAY_OF] == b"orders.created.email.dlt:0:5" and as_dict[H_REPLAY_COUNT] == b"2"
    assert len(names) == len(set(names)), "no header twice"


def test_replay_to_the_original_topic_drops_the_runtime_headers():
    headers = dict(copy_headers(Item(dead_letter(), "replay", "orders.created"), "run-1", 1000.0))
    assert {k for k in headers if k.startswith("x-")} == {"x-replay-of", "x-replay-count", "x-replay-run"}
    assert headers[EVENT_ID] == b"ev-1" and headers[H_REPLAY_COUNT] == b"1"


def test_messages_replayed_too_often_are_parked():
    letters = [(dead_letter(1), False), (dead_letter(2, replays=2), False), (dead_letter(3, replays=3), False)]
    snap = Snapshot(letters, HandledState(), {}, {})
    plan = plan_replay(snap, Selection([DLT]), max_replays=3)
    assert [(i.action, i.destination) for i in plan.items] == [
        ("replay", "orders.created.email.retry.1"), ("replay", "orders.created.email.retry.1"),
        ("park", "orders.created.email.parking")]
    plan = plan_replay(snap, Selection([DLT]), to="original", max_replays=0)
    assert {i.action for i in plan.items} == {"park"}
    with pytest.raises(OpsError, match="--to must be one of"):
        plan_replay(snap, Selection([DLT]), to="elsewhere")


def test_rates():
    assert parse_rate("50/s") == 50 and parse_rate("50") == 50 and parse_rate("120/min") == 2
    assert parse_rate(None) is None
    for bad in ("fast", "0/s", "-1/s", "5/h"):
        with pytest.raises(OpsError, match="bad rate"):
            parse_rate(bad)


def test_the_runtime_keeps_replay_headers_when_a_replayed_message_fails_again(tmp_path):
    group = ConsumerGroup("g", inputs=("in",), retry_delays_s=(1.0,))

    def fail(event, uow):
        raise RetryableError("smtp down")

    service = Service(group, MetaData(), {OrderCreated: [fail]})
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    service.metadata.create_all(engine)
    codec = Codec(EmbeddedRegistry())
    value = codec.encode("OrderCreated", {
        "order_id": "o-1", "customer_id": "c", "customer_email": "a@example.com", "currency": "EUR",
        "lines": [{"sku": "S", "quantity": 1, "unit_price": b"\x01"}], "total": b"\x01", "created_at": AT}, version=1)
    replayed = [(EVENT_ID, b"e-1"), (fh.H_ORIGINAL_TOPIC, b"in"), (fh.H_ATTEMPT, b"1"), (fh.H_DUE_AT, b"0"),
                (H_REPLAY_OF, b"in.g.dlt:0:3"), (H_REPLAY_COUNT, b"2")]
    producer = FakeProducer()
    ServiceConsumer(service, engine, FakeConsumer(), producer, codec).handle_batch(
        [FakeMessage("in.g.retry.1", 0, value, replayed)])
    engine.dispose()
    [copy] = producer.produced
    assert copy["topic"] == "in.g.dlt"
    assert copy["headers"][H_REPLAY_COUNT] == b"2" and copy["headers"][H_REPLAY_OF] == b"in.g.dlt:0:3"
