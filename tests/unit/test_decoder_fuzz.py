"""Fuzzing the decoder and the consumer's per-message path: no input may crash either.

`Codec.decode` must return or raise `DecodeError`, whatever the bytes: arbitrary bytes, bytes
behind a valid wire-format header, and valid messages with bit flips, truncations, appended
or inserted bytes and swapped schema ids. Then the same inputs go through
`ServiceConsumer.handle_batch` (SQLite, fake Kafka clients you can inspect): every message is
processed or dead-lettered as "not retryable", none is retried, none raises, and the batch's
offsets are stored, so the partition moves on.
"""

from __future__ import annotations

import struct
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select

from kafka_fakes import FakeConsumer, FakeMessage, FakeProducer
from services.runtime.codec import Codec, Decoded, DecodeError, EmbeddedRegistry
from services.runtime.consumer import ServiceConsumer
from services.runtime.db import make_engine
from services.runtime.envelope import EVENT_ID
from services.runtime.events import EVENT_TYPES
from services.runtime.failure_headers import H_REASON
from services.runtime.handler import Service
from services.runtime.topology import ConsumerGroup

REGISTRY = EmbeddedRegistry()
CODEC = Codec(REGISTRY)
KNOWN_IDS = [s.id for s in REGISTRY.all()]
AT = datetime(2026, 3, 14, 9, 26, 53, 589000, tzinfo=UTC)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- inputs -----------------------------------------------------------------------------------------

money = st.decimals(min_value=Decimal("-999999.99"), max_value=Decimal("999999.99"), places=2,
                    allow_nan=False, allow_infinity=False)
text = st.text(max_size=12)
moments = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1),
                       timezones=st.just(UTC)).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
order_lines = st.lists(st.fixed_dictionaries({"sku": text, "quantity": st.integers(-5, 1000), "unit_price": money}),
                       max_size=3)

RECORDS = {
    "OrderCreated": st.fixed_dictionaries({
        "order_id": text, "customer_id": text, "customer_email": text, "currency": text, "lines": order_lines,
        "total": money, "created_at": moments}, optional={"channel": st.none() | text}),
    "StockReserved": st.fixed_dictionaries({
        "order_id": text, "reserved_at": moments,
        "lines": st.lists(st.fixed_dictionaries({"sku": text, "quantity": st.integers(0, 100)}), max_size=3)}),
    "StockRejected": st.fixed_dictionaries({
        "order_id": text, "reason": text, "rejected_at": moments,
        "missing": st.lists(st.fixed_dictionaries({"sku": text, "requested": st.integers(0, 9),
                                                   "available": st.integers(0, 9)}), max_size=2)}),
    "InvoiceIssued": st.fixed_dictionaries({
        "order_id": text, "invoice_number": text, "total": money, "currency": text, "pdf_path": text,
        "issued_at": moments}),
}


@st.composite
def valid_messages(draw) -> bytes:
    event_type = draw(st.sampled_from(sorted(RECORDS)))
    versions = [s.version for s in REGISTRY.versions(event_type)]
    return CODEC.encode(event_type, draw(RECORDS[event_type]), version=draw(st.sampled_from(versions)))


def _flip(data: bytes, index: int, bit: int) -> bytes:
    if not data:
        return data
    i = index % len(data)
    return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:]


MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("schema_id"), st.sampled_from(KNOWN_IDS) | st.integers(0, 2**32 - 1)),
)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    for op, *args in ops:
        if op == "flip":
            data = _flip(data, *args)
        elif op == "truncate":
            data = data[: args[0] % (len(data) + 1)]
        elif op == "append":
            data = data + args[0]
        elif op == "insert":
            i = args[0] % (len(data) + 1)
            data = data[:i] + args[1] + data[i:]
        elif op == "schema_id" and len(data) >= 5:
            data = data[:1] + struct.pack(">I", args[0]) + data[5:]
    return data


mutated_messages = st.builds(mutate, valid_messages(), st.lists(MUTATIONS, min_size=1, max_size=4))
wire_garbage = st.builds(lambda schema_id, payload: b"\x00" + struct.pack(">I", schema_id) + payload,
                         st.sampled_from(KNOWN_IDS), st.binary(max_size=200))
any_input = st.one_of(st.binary(max_size=300), wire_garbage, mutated_messages, valid_messages())


def decode_or_decode_error(data: bytes | None, reader_version: int | None = None) -> Decoded | None:
    try:
        decoded = CODEC.decode(data, reader_version=reader_version)
    except DecodeError as exc:
        assert str(exc)  # the reason goes into the x-exception-message header
        return None
    assert decoded.event_type in {s.event_type for s in REGISTRY.all()}
    assert isinstance(decoded.record, dict)
    return decoded


# -- the decoder ------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300) | st.none())
def test_arbitrary_bytes_decode_or_raise_decode_error(data):
    decode_or_decode_error(data)


@FUZZ
@given(wire_garbage, st.sampled_from([None, 1]))
def test_garbage_behind_a_valid_header_decodes_or_raises_decode_error(data, reader_version):
    decode_or_decode_error(data, reader_version)


@FUZZ
@given(mutated_messages, st.sampled_from([None, 1]))
def test_mutated_messages_decode_or_raise_decode_error(data, reader_version):
    decode_or_decode_error(data, reader_version)


@FUZZ
@given(valid_messages())
def test_valid_messages_always_decode(data):
    assert decode_or_decode_error(data) is not None


def test_a_reader_version_the_writers_subject_lacks_is_a_decode_error():
    data = CODEC.encode("StockReserved", {"order_id": "o-1", "lines": [], "reserved_at": AT})
    with pytest.raises(DecodeError):
        CODEC.decode(data, reader_version=2)  # StockReserved has only v1


# -- the consumer -----------------------------------------------------------------------------------


GROUP = ConsumerGroup("fuzz", inputs=("fuzz.in",), retry_delays_s=(1.0,))


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    metadata = MetaData()
    effects = Table("effects", metadata, Column("id", Integer, primary_key=True, autoincrement=True),
                    Column("event_id", String(64), nullable=False))

    def record(event, uow):
        uow.conn.execute(effects.insert().values(event_id=uow.envelope.event_id))

    service = Service(GROUP, metadata, {cls: [record] for cls in EVENT_TYPES.values()})
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}")
    metadata.create_all(engine)
    yield service, engine, effects
    engine.dispose()


headers = st.one_of(
    st.builds(lambda: [(EVENT_ID, str(uuid.uuid4()).encode())]),
    st.just(None),  # no event id: a permanent error, not a crash
    st.lists(st.tuples(st.sampled_from([EVENT_ID, "traceparent", "causation_id", "junk"]),
                       st.binary(max_size=20)), max_size=3),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(any_input, headers), min_size=1, max_size=6))
def test_no_input_crashes_the_consumer_and_every_bad_one_is_dead_lettered(runtime, batch):
    service, engine, effects = runtime
    producer, kafka = FakeProducer(), FakeConsumer()
    consumer = ServiceConsumer(service, engine, kafka, producer, CODEC)
    offset = consumer.totals.processed  # any increasing offsets will do
    messages = [FakeMessage(GROUP.inputs[0], offset + i, value, hdrs) for i, (value, hdrs) in enumerate(batch)]
    with engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(effects)).scalar_one()

    result = consumer.handle_batch(messages)

    with engine.connect() as conn:
        after = conn.execute(select(func.count()).select_from(effects)).scalar_one()
    assert result.retried == 0 and result.deferred == 0
    assert result.processed + result.duplicates + result.dead_lettered == len(messages)
    assert after - before == result.processed
    assert len(producer.produced) == result.dead_lettered
    for copy in producer.produced:
        assert copy["topic"] == GROUP.dlt_topic(GROUP.inputs[0])
        assert copy["headers"][H_REASON] == b"not retryable"
        assert copy["headers"]["x-exception-message"]
    [stored] = kafka.stored  # the partition moves past the whole batch, bad messages included
    assert (stored.topic, stored.partition, stored.offset) == (GROUP.inputs[0], 0, messages[-1].offset() + 1)


@pytest.mark.parametrize("header", ["x-attempt", "x-due-at"])
def test_a_malformed_runtime_header_does_not_block_the_partition(runtime, header):
    service, engine, _ = runtime
    producer, kafka = FakeProducer(), FakeConsumer()
    consumer = ServiceConsumer(service, engine, kafka, producer, CODEC)
    bad = FakeMessage(GROUP.inputs[0], 0, b"not avro", [(EVENT_ID, b"e-1"), (header, b"\x00")])

    result = consumer.handle_batch([bad])

    assert result.dead_lettered == 1 and kafka.stored[0].offset == 1
