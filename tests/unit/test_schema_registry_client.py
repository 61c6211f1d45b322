"""The Confluent Schema Registry path of the codec, through confluent-kafka's own client.

`mock://` is the client's in-process registry: it proves we register on produce, fetch by id
on consume and cache both; it does NOT enforce compatibility (the `avro` checker in
services/tools/compatibility.py and `orderpipe schemas check` do that).
"""

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.runtime.codec import Codec, ConfluentRegistry, DecodeError, EmbeddedRegistry

AT = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def registry_url() -> str:
    return f"mock://orderpipe-{uuid.uuid4().hex}"


def test_producer_registers_and_a_separate_consumer_fetches_by_id():
    url = registry_url()
    producer_registry = ConfluentRegistry(url)
    producer = Codec(producer_registry)
    data = producer.encode("StockReserved", {"order_id": "o-1", "lines": [{"sku": "A", "quantity": 2}],
                                             "reserved_at": AT})
    # another process on the same registry server: empty caches, so it must fetch the id
    # (a mock:// client keeps its store per instance, hence the shared client object)
    consumer = Codec(ConfluentRegistry(url, client=producer_registry._client))
    decoded = consumer.decode(data)
    assert decoded.event_type == "StockReserved"
    assert decoded.record["lines"] == [{"sku": "A", "quantity": 2}]
    assert decoded.schema_id == int.from_bytes(data[1:5], "big")


def test_ids_come_from_the_registry_and_are_cached():
    registry = ConfluentRegistry(registry_url())
    first = registry.latest("OrderRecorded")
    assert registry.latest("OrderRecorded") is first  # cached: no second registration
    assert registry.by_id(first.id).schema == EmbeddedRegistry().latest("OrderRecorded").schema


def test_a_v1_reader_reads_what_a_v2_writer_registered():
    codec = Codec(ConfluentRegistry(registry_url()))
    data = codec.encode("OrderCreated", {"order_id": "o-2", "customer_id": "c", "customer_email": "a@b.c",
                                         "currency": "EUR", "lines": [], "total": Decimal("0.00"), "created_at": AT,
                                         "channel": "app"})
    assert "channel" not in codec.decode(data, reader_version=1).record
    assert codec.decode(data).record["channel"] == "app"


def test_an_id_the_registry_does_not_know_is_a_decode_error():
    codec = Codec(ConfluentRegistry(registry_url()))
    with pytest.raises(DecodeError, match="unknown schema id 4242"):
        codec.decode(b"\x00" + (4242).to_bytes(4, "big") + b"\x02")
