"""`orderpipe dlt ...`, `orderpipe lag` and `orderpipe topics describe` on a real broker.

Each test gets its own consumer group (known to the CLI by patching `registry.GROUPS`) with its
own input, retry, dead-letter and parking topics, and a dead-letter topic filled the way the
consumer runtime fills it (key, value, envelope and `x-` headers). The dead letters are
produced in one flush, so each partition's last batch holds several records: the case where
the embedded broker's ListOffsets answer falls short of the end offset.

Dead letters (partition: letter = exception, dead-lettered at T0 + hours):
    0: A MailDeliveryError +0, B MailRejected +0, C MailDeliveryError +1, D DecodeError +1 (no envelope)
    1: E MailRejected +2, F MailDeliveryError +3
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from aiokafka.partitioner import murmur2
from confluent_kafka import Consumer, TopicPartition
from typer.testing import CliRunner

from conftest import settings_for, unique_name
from reading import delivered, read_all
from services.cli.main import app
from services.ops.audit import AuditLog
from services.ops.broker import OPS_GROUP, OpsKafka
from services.ops.deadletters import H_REPLAY_COUNT, H_REPLAY_OF, DltTopic
from services.ops.reprocess import Reprocessor, Selection, collect, plan_replay
from services.runtime import failure_headers as fh
from services import registry
from services.runtime import topology
from services.runtime.admin import ensure_topics
from services.tools.brokers import free_port
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.envelope import EVENT_ID, Envelope, new_event_id
from services.runtime.kafka import make_producer
from services.runtime.topology import ConsumerGroup, TopicSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CODEC = Codec(EmbeddedRegistry())
T0 = (datetime.now(UTC) - timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
DELIVERY = "services.email.mailer.MailDeliveryError"
REJECTED = "services.email.mailer.MailRejected"
DECODE = "services.runtime.codec.DecodeError"
LAYOUT = [  # (name, partition, exception type, hours after T0)
    ("A", 0, DELIVERY, 0), ("B", 0, REJECTED, 0), ("C", 0, DELIVERY, 1), ("D", 0, DECODE, 1),
    ("E", 1, REJECTED, 2), ("F", 1, DELIVERY, 3),
]


@dataclass
class Letter:
    name: str
    order_id: str
    event_id: str
    value: bytes
    partition: int
    offset: int = -1


@dataclass
class Scenario:
    bootstrap: str
    group: ConsumerGroup
    letters: dict[str, Letter] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.group.inputs[0]

    @property
    def dlt(self) -> str:
        return self.group.dlt_topic(self.source)

    @property
    def retry(self) -> str:
        return self.group.retry_topic(self.source, 1)

    @property
    def parking(self) -> str:
        return self.group.parking_topic(self.source)

    def ref(self, name: str) -> str:
        letter = self.letters[name]
        return f"{self.dlt}:{letter.partition}:{letter.offset}"

    def cli(self, *args: str, env: dict | None = None):
        return CliRunner().invoke(app, list(args), env={"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                                                        "ORDERPIPE_OPERATOR": "tester", "COLUMNS": "200", **(env or {})})

    def ok(self, *args: str) -> str:
        result = self.cli(*args)
        assert result.exit_code == 0, (args, result.output)
        return result.stdout

    def json(self, *args: str) -> list[dict]:
        return [json.loads(line) for line in self.ok(*args, "--json").splitlines() if line.strip()]


def order_id_on(partition: int, partitions: int = 2) -> str:
    """An order id whose key lands on `partition`, as every producer of the pipeline hashes it
    (murmur2), like the runtime's dead-letter copies do."""
    while (murmur2((order_id := unique_name("order")).encode()) & 0x7FFFFFFF) % partitions != partition:
        pass
    return order_id


def order_value(order_id: str) -> bytes:
    return CODEC.encode("OrderCreated", {
        "order_id": order_id, "customer_id": "c-1", "customer_email": "ada@example.com", "currency": "EUR",
        "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": Decimal("24.90")}], "total": Decimal("49.80"),
        "created_at": T0}, version=1)


def dead_letter_headers(s: Scenario, letter: Letter, exc_type: str, replays: int | None) -> list[tuple[str, bytes]]:
    envelope = [] if exc_type == DECODE else Envelope(letter.event_id, "OrderCreated", 1, letter.order_id).to_headers()
    runtime = {
        fh.H_ORIGINAL_TOPIC: s.source, fh.H_ORIGINAL_PARTITION: str(letter.partition), fh.H_ORIGINAL_OFFSET: "0",
        fh.H_GROUP: s.group.name, fh.H_ATTEMPT: "1" if exc_type != DELIVERY else "2",
        fh.H_EXC_TYPE: exc_type, fh.H_EXC_MESSAGE: f"{exc_type.rsplit('.', 1)[-1]} for {letter.order_id}",
        fh.H_EXC_TRACEBACK: f"Traceback (most recent call last):\n  File \"handlers.py\", line 1\n{exc_type}: boom",
        fh.H_REASON: "not retryable" if exc_type != DELIVERY else "retries exhausted after 2 attempts",
    }
    if replays is not None:
        runtime[H_REPLAY_COUNT] = str(replays)
    if exc_type == DECODE:
        envelope = [(EVENT_ID, letter.event_id.encode())]
    return envelope + [(k, v.encode()) for k, v in runtime.items()]


@pytest.fixture
def scenario(kafka_bootstrap: str, monkeypatch) -> Scenario:
    return make_scenario(kafka_bootstrap, monkeypatch)


def make_scenario(bootstrap: str, monkeypatch, replays: dict[str, int] | None = None) -> Scenario:
    name = unique_name("dlt")
    group = ConsumerGroup(name, inputs=(f"{name}.in",), retry_delays_s=(1.0,))
    s = Scenario(bootstrap, group)
    ensure_topics({"bootstrap.servers": bootstrap},
                  [TopicSpec(t, partitions=2) for t in (s.source, s.retry, s.dlt, s.parking)])
    monkeypatch.setattr(registry, "GROUPS", (group,))
    monkeypatch.setattr(topology, "EVENT_TOPICS", (*topology.EVENT_TOPICS, TopicSpec(s.source, partitions=2)))
    producer = make_producer(settings_for(bootstrap), **{"linger.ms": 100})
    acked = {}
    for letter_name, partition, exc_type, hours in LAYOUT:
        order_id = order_id_on(partition)
        letter = Letter(letter_name, order_id, new_event_id(),
                        b"{not avro" if exc_type == DECODE else order_value(order_id), partition)
        s.letters[letter_name] = letter
        producer.produce(s.dlt, key=order_id.encode(), value=letter.value, partition=partition,
                         timestamp=int((T0 + timedelta(hours=hours)).timestamp() * 1000),
                         headers=dead_letter_headers(s, letter, exc_type, (replays or {}).get(letter_name)),
                         on_delivery=lambda err, msg, n=letter_name: acked.__setitem__(n, (err, msg)))
    delivered(producer)  # one flush: several records per batch
    for letter_name, (err, msg) in acked.items():
        assert err is None, err
        s.letters[letter_name].offset = msg.offset()
    return s


def replayed_names(s: Scenario, topic: str) -> list[str]:
    by_ref = {s.ref(n): n for n in s.letters}
    return sorted(by_ref[h[H_REPLAY_OF]] for *_, h in read_all(s.bootstrap, topic))


def committed(s: Scenario, group: str = OPS_GROUP) -> dict[int, int]:
    client = Consumer({"bootstrap.servers": s.bootstrap, "group.id": group, "log_level": 0})
    try:
        got = client.committed([TopicPartition(s.dlt, p) for p in (0, 1)], timeout=10)
        return {tp.partition: tp.offset for tp in got}
    finally:
        client.close()


def audit_runs(s: Scenario, *extra: str) -> list[dict]:
    return [r for r in s.json("dlt", "audit", *extra) if s.dlt in r["selection"]["topics"]]


# -- list and show ------------------------------------------------------------------------------


def test_list_without_filters_counts_per_group_and_exception_type(scenario: Scenario):
    counts = {r["exception_type"]: r["count"] for r in scenario.json("dlt", "list")}
    assert counts == {DELIVERY: 3, REJECTED: 2, DECODE: 1}

    table = scenario.ok("dlt", "list")
    assert "MailDeliveryError" in table and "6 in total" in table


def test_list_filters_by_exception_key_event_type_and_time(scenario: Scenario):
    s = scenario

    def names(*args: str) -> list[str]:
        by_ref = {s.ref(n): n for n in s.letters}
        return sorted(by_ref[r["ref"]] for r in s.json("dlt", "list", "--group", s.group.name, *args))

    assert names() == ["A", "B", "C", "D", "E", "F"]
    assert names("--exception", "MailRejected") == ["B", "E"]
    assert names("--exception", REJECTED) == ["B", "E"]
    assert names("--order-id", s.letters["C"].order_id) == ["C"]
    assert names("--key", s.letters["F"].order_id) == ["F"]
    assert names("--event-type", "OrderCreated") == ["A", "B", "C", "E", "F"]  # D has no envelope
    assert names("--since", (T0 + timedelta(hours=1)).isoformat()) == ["C", "D", "E", "F"]
    assert names("--since", (T0 + timedelta(minutes=30)).isoformat(), "--until",
                 (T0 + timedelta(hours=2, minutes=30)).isoformat(), "--exception", "MailRejected") == ["E"]

    [row] = s.json("dlt", "list", "--group", s.group.name, "--key", s.letters["B"].order_id)
    assert (row["group"], row["source"], row["event_id"], row["reason"]) == (
        s.group.name, s.source, s.letters["B"].event_id, "not retryable")
    assert datetime.fromisoformat(row["dead_lettered_at"]) == T0

    table = s.ok("dlt", "list", "--group", s.group.name, "--exception", "MailRejected")
    assert s.ref("B") in table and s.ref("E") in table and "2 dead letter(s)" in table


def test_show_decodes_the_value_and_prints_every_header_and_the_traceback(scenario: Scenario):
    s = scenario
    out = s.ok("dlt", "show", s.ref("B"))
    assert s.ref("B") in out and "not handled" in out
    assert '"total": "49.80"' in out and f'"order_id": "{s.letters["B"].order_id}"' in out
    assert f"event_id: {s.letters['B'].event_id}" in out and "x-reason: not retryable" in out
    assert "Traceback (most recent call last)" in out and f"{REJECTED}: boom" in out

    [record] = s.json("dlt", "show", s.ref("D"))
    assert record["value"] is None and "not in the Confluent wire format" in record["value_error"]
    assert record["headers"][fh.H_EXC_TYPE] == DECODE and record["handled"] is False


# -- replay ---------------------------------------------------------------------------------------


def test_replay_dry_run_moves_nothing(scenario: Scenario):
    s = scenario
    out = s.ok("dlt", "replay", "--group", s.group.name, "--exception", "MailDeliveryError", "--dry-run")
    assert "3 dead letter(s) selected" in out and "dry run: nothing was sent" in out
    assert s.ref("A") in out and s.ref("F") in out and s.ref("B") not in out
    assert read_all(s.bootstrap, s.retry) == [] and read_all(s.bootstrap, s.source) == []
    assert committed(s) == {0: -1001, 1: -1001}
    assert audit_runs(s) == []  # dry runs change nothing and record nothing
    assert len(s.json("dlt", "list", "--group", s.group.name)) == 6


def test_a_real_replay_needs_confirmation(scenario: Scenario):
    result = scenario.cli("dlt", "replay", "--group", scenario.group.name)
    assert result.exit_code == 1
    assert "not confirmed: stdin is not a terminal; pass --yes" in result.stderr
    assert read_all(scenario.bootstrap, scenario.retry) == []


def test_replay_goes_to_the_groups_retry_chain_and_resumes_without_duplicates(scenario: Scenario):
    s = scenario
    # Only the retryable failures, two at a time: the first run stops at its limit.
    out = s.ok("dlt", "replay", "--group", s.group.name, "--exception", "MailDeliveryError", "--limit", "2", "--yes")
    assert "replayed 2 of 2" in out
    out = s.ok("dlt", "replay", "--group", s.group.name, "--exception", "MailDeliveryError", "--yes")
    assert "replayed 1 of 1" in out
    out = s.ok("dlt", "replay", "--group", s.group.name, "--exception", "MailDeliveryError", "--yes")
    assert "nothing to replay" in out

    copies = read_all(s.bootstrap, s.retry)
    assert replayed_names(s, s.retry) == ["A", "C", "F"]  # each once
    assert read_all(s.bootstrap, s.source) == []  # no other group sees them
    now = time.time()
    for partition, _, key, value, headers in copies:
        letter = next(l for l in s.letters.values() if l.order_id == key)
        assert (value, partition, headers[EVENT_ID]) == (letter.value, letter.partition, letter.event_id)
        assert headers[H_REPLAY_COUNT] == "1" and headers[fh.H_ATTEMPT] == "1"
        assert float(headers[fh.H_DUE_AT]) <= now and fh.H_REASON not in headers
        assert headers[fh.H_ORIGINAL_TOPIC] == s.source

    # The unselected B and E come before C and F: the offsets cannot move past them.
    assert committed(s) == {0: s.letters["B"].offset, 1: s.letters["E"].offset}
    remaining = {r["ref"] for r in s.json("dlt", "list", "--group", s.group.name)}
    assert remaining == {s.ref("B"), s.ref("D"), s.ref("E")}
    everything = s.json("dlt", "list", "--group", s.group.name, "--include-handled")
    assert {r["ref"] for r in everything if r["handled"]} == {s.ref("A"), s.ref("C"), s.ref("F")}


def test_an_interrupted_replay_resumes_where_it_stopped(scenario: Scenario):
    s = scenario
    with OpsKafka(settings_for(s.bootstrap)) as kafka:
        audit = AuditLog(kafka)
        selection = Selection([DltTopic(s.group, s.source)])
        plan = plan_replay(collect(kafka, audit, selection), selection)
        batches = []
        outcome = Reprocessor(kafka, audit, batch_size=2).execute(
            plan, stop=lambda: len(batches) >= 1, on_batch=lambda run: batches.append(run.count))
        assert (outcome.outcome, outcome.run.count) == ("interrupted", 2)

        plan = plan_replay(collect(kafka, audit, selection), selection)
        assert len(plan.items) == 4
        assert Reprocessor(kafka, audit).execute(plan).outcome == "completed"
    assert replayed_names(s, s.retry) == sorted(s.letters)  # every one exactly once
    [first, second] = audit_runs(s)
    assert (first["outcome"], first["count"], second["outcome"], second["count"]) == (
        "interrupted", 2, "completed", 4)


def test_messages_replayed_too_often_go_to_the_parking_topic(kafka_bootstrap: str, monkeypatch):
    s = make_scenario(kafka_bootstrap, monkeypatch, replays={"A": 2, "E": 1})
    out = s.ok("dlt", "replay", "--group", s.group.name, "--max-replays", "2", "--yes")
    assert "replayed 5, parked 1 of 6" in out
    assert replayed_names(s, s.retry) == ["B", "C", "D", "E", "F"]
    [(_, _, key, value, headers)] = read_all(s.bootstrap, s.parking)
    assert (key, value, headers[H_REPLAY_COUNT]) == (s.letters["A"].order_id, s.letters["A"].value, "2")
    e = next(h for *_, h in read_all(s.bootstrap, s.retry) if h[H_REPLAY_OF] == s.ref("E"))
    assert e[H_REPLAY_COUNT] == "2"
    assert s.json("dlt", "list", "--group", s.group.name) == []


def test_replay_to_the_original_topic_warns_that_every_group_sees_it(scenario: Scenario):
    s = scenario
    result = s.cli("dlt", "replay", "--group", s.group.name, "--key", s.letters["E"].order_id, "--to", "original",
                   "--yes", "--rate", "20/s")
    assert result.exit_code == 0, result.output
    assert "warning: --to original" in result.stderr and "every group reading it" in result.stderr
    [(partition, _, key, _, headers)] = read_all(s.bootstrap, s.source)
    assert (partition, key, headers[EVENT_ID]) == (1, s.letters["E"].order_id, s.letters["E"].event_id)
    assert not any(k.startswith("x-") and not k.startswith("x-replay-") for k in headers)
    assert read_all(s.bootstrap, s.retry) == []


# -- purge and audit ------------------------------------------------------------------------------


def test_purge_marks_only_the_selected_messages_handled(scenario: Scenario):
    s = scenario
    assert "3 dead letter(s) selected" in s.ok("dlt", "purge", "--group", s.group.name, "--exception",
                                               "MailDeliveryError", "--dry-run")
    assert len(s.json("dlt", "list", "--group", s.group.name)) == 6

    out = s.ok("dlt", "purge", "--group", s.group.name, "--exception", "MailDeliveryError", "--yes")
    assert "purged 3 of 3" in out
    remaining = {r["ref"] for r in s.json("dlt", "list", "--group", s.group.name)}
    assert remaining == {s.ref("B"), s.ref("D"), s.ref("E")}
    assert committed(s) == {0: s.letters["B"].offset, 1: s.letters["E"].offset}

    # A replay now takes exactly the unpurged ones; purged ones are never replayed.
    s.ok("dlt", "replay", "--group", s.group.name, "--yes")
    assert replayed_names(s, s.retry) == ["B", "D", "E"]
    assert committed(s) == {0: s.letters["D"].offset + 1, 1: s.letters["F"].offset + 1}
    assert s.json("dlt", "list") == []


def test_every_replay_and_purge_has_an_audit_record(scenario: Scenario):
    s = scenario
    s.ok("dlt", "purge", "--group", s.group.name, "--key", s.letters["B"].order_id, "--yes")
    s.ok("dlt", "replay", "--group", s.group.name, "--exception", "MailDeliveryError", "--yes")
    purge, replay = audit_runs(s)
    for record in (purge, replay):
        assert record["user"] == "tester" and record["host"] and record["outcome"] == "completed"
        datetime.fromisoformat(record["started_at"])
    assert (purge["action"], purge["count"], purge["first"], purge["last"]) == ("purge", 1, s.ref("B"), s.ref("B"))
    assert purge["selection"]["filter"] == {"key": s.letters["B"].order_id}
    assert (replay["action"], replay["count"], replay["first"], replay["last"]) == (
        "replay", 3, s.ref("A"), s.ref("F"))
    assert replay["selection"]["filter"] == {"exception_type": "MailDeliveryError"}
    assert replay["offsets"] == {s.dlt: {"0": [s.letters["A"].offset, s.letters["C"].offset],
                                         "1": [s.letters["F"].offset, s.letters["F"].offset]}}
    steps = [r["outcome"] for r in audit_runs(s, "--all") if r["run_id"] == replay["run_id"]]
    assert steps[0] == "started" and steps[-1] == "completed" and "running" in steps
    assert replay["run_id"] in s.ok("dlt", "audit", "--limit", "2")


# -- lag and topics -------------------------------------------------------------------------------


def test_lag_and_topic_counts_see_the_true_end_offsets(scenario: Scenario):
    s = scenario
    producer = make_producer(settings_for(s.bootstrap), **{"linger.ms": 100})
    for i in range(5):
        producer.produce(s.source, key=f"k{i}".encode(), value=b"x", partition=0)
    delivered(producer)
    client = Consumer({"bootstrap.servers": s.bootstrap, "group.id": s.group.name, "log_level": 0})
    client.commit(offsets=[TopicPartition(s.source, 0, 2)], asynchronous=False)
    client.close()

    rows = {(r["topic"], r["partition"]): r for r in s.json("lag", "--group", s.group.name, "--all")}
    assert (rows[(s.source, 0)]["committed"], rows[(s.source, 0)]["end"], rows[(s.source, 0)]["lag"]) == (2, 5, 3)
    assert rows[(s.source, 1)]["lag"] == 0 and rows[(s.retry, 0)]["lag"] == 0
    assert (rows[(s.dlt, 0)]["end"], rows[(s.dlt, 0)]["lag"], rows[(s.dlt, 0)]["group"]) == (4, 4, OPS_GROUP)
    assert (rows[(s.dlt, 1)]["end"], rows[(s.dlt, 1)]["lag"]) == (2, 2)

    s.ok("dlt", "purge", "--group", s.group.name, "--exception", "MailRejected", "--yes")
    rows = {(r["topic"], r["partition"]): r for r in s.json("lag", "--group", s.group.name)}
    assert (rows[(s.dlt, 0)]["committed"], rows[(s.dlt, 0)]["lag"]) == (s.letters["A"].offset, 3)  # A is not handled
    assert rows[(s.dlt, 1)]["lag"] == 1
    assert f"{s.group.name}: lag 3 on input, 0 in retry topics, 4 unhandled dead letters" in s.ok("lag")

    counts = {r["topic"]: r for r in s.json("topics", "describe")}
    assert (counts[s.dlt]["partitions"], counts[s.dlt]["messages"]) == (2, 6)
    assert counts[s.source]["messages"] == 5 and counts[topology.AUDIT]["partitions"] == 1


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["dlt", "list", "--group", "nope"], "error: unknown group 'nope'; known groups: "),
    (["dlt", "list", "--since", "yesterday"], "error: bad time 'yesterday'"),
    (["dlt", "show", "orders.created.email.dlt"], "error: bad REF 'orders.created.email.dlt'"),
    (["dlt", "replay", "--group", "{group}", "--rate", "fast", "--yes"], "error: bad rate 'fast'"),
    (["lag", "--group", "nope"], "error: unknown group 'nope'"),
])
def test_user_mistakes_are_one_clear_line(scenario: Scenario, args, message):
    result = scenario.cli(*[a.format(group=scenario.group.name) for a in args])
    assert result.exit_code == 1
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_ref_with_no_message_is_one_clear_line(scenario: Scenario):
    result = scenario.cli("dlt", "show", f"{scenario.dlt}:0:999")
    assert result.exit_code == 1 and result.stderr.startswith(f"error: no message at {scenario.dlt}:0:999")
    result = scenario.cli("dlt", "show", f"{unique_name('nope')}:0:1")
    assert result.exit_code == 1 and "does not exist" in result.stderr


@pytest.mark.parametrize("args", [["dlt", "list"], ["dlt", "audit"], ["lag"], ["topics", "describe"]])
def test_an_unreachable_broker_is_one_clear_line(args):
    result = CliRunner().invoke(app, [*args, "--timeout", "1"],
                                env={"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: cannot reach Kafka at 127.0.0.1:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


# -- keys held behind a dead letter (ordered retries) ------------------------------------------------


def test_a_purge_releases_the_key_held_behind_it_and_a_replay_says_it_will(scenario: Scenario, tmp_path):
    """The group's database holds keys whose head is a dead letter (services/runtime/held.py):
    purging A releases A's key; replaying C leaves C's key held until the replay succeeds, and
    says so."""
    from sqlalchemy import MetaData

    from services.runtime.db import make_engine, utcnow
    from services.runtime.held import DEAD_LETTERED, HeldKeys, RELEASING

    s = scenario
    engine = make_engine(f"sqlite:///{tmp_path / f'{s.group.name}.db'}")
    held = HeldKeys.of_group(s.group.name)
    MetaData().create_all(engine, tables=[held.keys, held.events])
    with engine.begin() as conn:
        for name in ("A", "C"):
            letter = s.letters[name]
            conn.execute(held.keys.insert().values(
                group_name=s.group.name, key=letter.order_id, head_event_id=letter.event_id, state=DEAD_LETTERED,
                reason="MailDeliveryError: boom", topic=s.source, partition=letter.partition, since=utcnow(),
                updated_at=utcnow()))
            for n in range(2):
                conn.execute(held.events.insert().values(
                    group_name=s.group.name, key=letter.order_id, event_id=f"{name}-later-{n}", topic=s.source,
                    partition=letter.partition, offset=10 + n, timestamp_ms=0, value=b"x", headers=[],
                    held_at=utcnow()))
    env = {"ORDERPIPE_DATA_DIR": str(tmp_path)}

    purged = s.cli("dlt", "purge", "--group", s.group.name, "--key", s.letters["A"].order_id, "--yes", env=env)
    assert purged.exit_code == 0, purged.output
    assert f"{s.group.name}: key {s.letters['A'].order_id} released (its head was purged): its 2 waiting " \
           "event(s) run next" in purged.stdout
    replayed = s.cli("dlt", "replay", "--group", s.group.name, "--key", s.letters["C"].order_id, "--yes", env=env)
    assert replayed.exit_code == 0, replayed.output
    assert f"key {s.letters['C'].order_id} is held behind a replayed dead letter: its 2 waiting event(s) run " \
           "once the replay succeeds" in replayed.stdout
    states = {r["key"]: r["state"] for r in held.summary(engine)}
    assert states == {s.letters["A"].order_id: RELEASING, s.letters["C"].order_id: DEAD_LETTERED}
    engine.dispose()
