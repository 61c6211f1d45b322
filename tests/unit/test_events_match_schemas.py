"""The .avsc files are the contract; the pydantic models in events.py must not drift from them.

Also: the embedded registry manifest lists every schema file once with a permanent unique id,
and the codec round-trips every event and turns every kind of garbage into a DecodeError.
"""

from __future__ import annotations

import json
import re
import struct
import types
import typing
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import BaseModel

from services.runtime.codec import SCHEMAS_DIR, Codec, DecodeError, EmbeddedRegistry, subject_for
from services.runtime.errors import is_retryable
from services.runtime.events import (
    EVENT_TYPES,
    ConfirmationEmailSent,
    Event,
    InvoiceIssued,
    MissingStock,
    OrderCancelled,
    OrderCreated,
    OrderLine,
    OrderRecorded,
    ReservedLine,
    StepCompensated,
    StockAdjusted,
    StockRejected,
    StockReserved,
)

REGISTRY = EmbeddedRegistry()
MANIFEST = json.loads((SCHEMAS_DIR / "registry.json").read_text())


# -- models vs schemas ------------------------------------------------------------------------


def _avro_type(schema_type) -> str | dict:
    """Normalise an Avro type to something comparable: 'string', 'int', ('decimal', p, s), ..."""
    if isinstance(schema_type, list):
        return ("union", frozenset(_avro_type(t) for t in schema_type))
    if isinstance(schema_type, str):
        return schema_type
    logical = schema_type.get("logicalType")
    if logical == "decimal":
        return ("decimal", schema_type["type"])
    if logical:
        return (logical, schema_type["type"])
    if schema_type["type"] == "array":
        return ("array", _avro_type(schema_type["items"]))
    if schema_type["type"] == "record":
        return ("record", schema_type["name"], tuple((f["name"], _avro_type(f["type"])) for f in schema_type["fields"]))
    return schema_type["type"]


def _python_type(annotation) -> str | tuple:
    """The Avro type a pydantic field annotation must correspond to."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return ("union", frozenset(("null" if a is type(None) else _python_type(a)) for a in args))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return ("array", _python_type(item))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ("record", annotation.__name__,
                tuple((name, _python_type(f.annotation)) for name, f in annotation.model_fields.items()))
    simple = {str: "string", int: "int", bool: "boolean", float: "double", bytes: "bytes",
              Decimal: ("decimal", "bytes"), datetime: ("timestamp-millis", "long")}
    if annotation in simple:
        return simple[annotation]
    raise AssertionError(f"no Avro mapping for {annotation!r}: extend the test when adding a type")


@pytest.mark.parametrize("cls", list(EVENT_TYPES.values()), ids=list(EVENT_TYPES))
def test_model_matches_its_latest_schema(cls: type[Event]):
    latest = REGISTRY.latest(cls.event_type())
    schema = latest.schema

    assert cls.schema_version == latest.version, f"{cls.__name__} writes v{cls.schema_version}, latest is v{latest.version}"
    assert (schema["namespace"], schema["name"]) == ("orderpipe.events", cls.__name__)
    assert [f["name"] for f in schema["fields"]] == list(cls.model_fields)
    for field in schema["fields"]:
        model_field = cls.model_fields[field["name"]]
        where = f"{cls.__name__}.{field['name']}"
        assert _python_type(model_field.annotation) == _avro_type(field["type"]), where
        # A field added in a later version needs a default in both, or old messages stop decoding.
        assert ("default" in field) == (not model_field.is_required()), where
        if "default" in field:
            assert field["default"] == model_field.default, where
            if field["default"] is None:  # Avro: a union's default must match its first branch
                assert field["type"][0] == "null", where


def test_every_decimal_in_the_schemas_has_scale_2():
    """Money: the codec writes Decimals at scale 2; a different scale would round or refuse amounts."""
    def decimals(t):
        if isinstance(t, dict):
            if t.get("logicalType") == "decimal":
                yield t
            for v in t.values():
                yield from decimals(v)
        elif isinstance(t, list):
            for v in t:
                yield from decimals(v)

    for event_type in EVENT_TYPES:
        for d in decimals(REGISTRY.latest(event_type).schema):
            assert (d["type"], d["scale"]) == ("bytes", 2), event_type


def test_the_type_mapping_catches_drift():
    class Drifted(Event):
        customer_id: int  # the schema says string

    assert _python_type(Drifted.model_fields["customer_id"].annotation) != _avro_type("string")
    assert _python_type(list[ReservedLine]) != _avro_type(
        {"type": "array", "items": {"type": "record", "name": "ReservedLine",
                                    "fields": [{"name": "sku", "type": "string"}]}})


# -- the registry manifest --------------------------------------------------------------------


def test_registry_lists_every_schema_file_exactly_once_with_unique_ids():
    entries = MANIFEST["schemas"]
    files = sorted(p.name for p in SCHEMAS_DIR.glob("*.avsc"))

    assert sorted(e["file"] for e in entries) == files
    ids = [e["id"] for e in entries]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) and i > 0 for i in ids)
    assert len({(e["subject"], e["version"]) for e in entries}) == len(entries)


@pytest.mark.parametrize("entry", MANIFEST["schemas"], ids=[e["file"] for e in MANIFEST["schemas"]])
def test_registry_entry_matches_its_file(entry: dict):
    schema = json.loads((SCHEMAS_DIR / entry["file"]).read_text())
    name, version = re.fullmatch(r"(\w+)\.v(\d+)\.avsc", entry["file"]).groups()

    assert (schema["name"], int(version)) == (name, entry["version"])
    assert entry["subject"] == f"{schema['namespace']}.{schema['name']}" == subject_for(name)


def test_every_event_type_has_a_schema():
    assert set(EVENT_TYPES) <= {Path(e["file"]).name.split(".")[0] for e in MANIFEST["schemas"]}


# -- codec ------------------------------------------------------------------------------------

AT = datetime(2026, 3, 14, 9, 26, 53, 589000, tzinfo=UTC)  # millisecond precision: timestamp-millis

SAMPLES: list[Event] = [
    OrderCreated(order_id="o-1", customer_id="c-1", customer_email="ada@example.com", currency="EUR",
                 lines=[OrderLine(sku="SKU-1", quantity=2, unit_price=Decimal("24.90")),
                        OrderLine(sku="SKU-2", quantity=1, unit_price=Decimal("3.5"))],
                 total=Decimal("53.30"), created_at=AT),
    StockReserved(order_id="o-1", lines=[ReservedLine(sku="SKU-1", quantity=2)], reserved_at=AT),
    StockRejected(order_id="o-1", reason="out of stock: SKU-2", rejected_at=AT,
                  missing=[MissingStock(sku="SKU-2", requested=3, available=1)]),
    ConfirmationEmailSent(order_id="o-1", message_id="<e-1@orderpipe.local>", recipient="ada@example.com", sent_at=AT),
    InvoiceIssued(order_id="o-1", invoice_number="INV-000001", total=Decimal("53.30"), currency="EUR",
                  pdf_path="INV-000001.pdf", issued_at=AT),
    OrderRecorded(order_id="o-1", units=3, revenue=Decimal("-0.01"), currency="EUR", recorded_at=AT),
    OrderCancelled(order_id="o-1", customer_id="c-1", customer_email="ada@example.com", reason="ordered twice",
                   cancelled_at=AT),
    StepCompensated(order_id="o-1", step="invoice", action="credit note CN-000001 for invoice INV-000001",
                    document="CN-000001", compensated_at=AT),
    StockAdjusted(sku="SKU-1", delta=500, available_after=1_000_500, reason="delivery 4711", operator="ops-alice",
                  adjusted_at=AT),
]


@pytest.fixture
def codec() -> Codec:
    return Codec(REGISTRY)


def test_samples_cover_every_event_type():
    assert {type(e) for e in SAMPLES} == set(EVENT_TYPES.values())


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.event_type())
def test_codec_round_trips_every_event(codec: Codec, event: Event):
    written = REGISTRY.version(event.event_type(), event.schema_version)  # what add_event writes
    data = codec.encode(event.event_type(), event.model_dump(), event.schema_version)
    decoded = codec.decode(data)

    assert data[0] == 0 and struct.unpack(">I", data[1:5])[0] == written.id
    assert (decoded.event_type, decoded.schema_id) == (event.event_type(), written.id)
    assert type(event).model_validate(decoded.record) == event
    assert codec.decode(data, reader_version=event.schema_version).record == decoded.record


def test_codec_keeps_amounts_exact(codec: Codec):
    record = SAMPLES[0].model_dump()
    data = codec.encode("OrderCreated", record, OrderCreated.schema_version)
    decoded = OrderCreated.model_validate(codec.decode(data).record)

    assert decoded.lines[1].unit_price == Decimal("3.50") and decoded.total == Decimal("53.30")
    assert decoded.created_at == AT and decoded.created_at.utcoffset().total_seconds() == 0


@pytest.fixture
def valid(codec: Codec) -> bytes:
    return codec.encode("OrderCreated", SAMPLES[0].model_dump(), version=1)  # schema id 1


@pytest.mark.parametrize("mutate, reason", [
    (lambda b: None, "0 bytes"),
    (lambda b: b"", "0 bytes"),
    (lambda b: b[:4], "4 bytes"),
    (lambda b: b"\x01" + b[1:], "magic byte 1"),
    (lambda b: b"{\"order_id\": \"o-1\"}", "magic byte 123"),
    (lambda b: b[:1] + struct.pack(">I", 999) + b[5:], "unknown schema id 999"),
    (lambda b: b[:-3], "does not decode with schema id 1"),
    (lambda b: b[:5], "does not decode with schema id 1"),
    (lambda b: b + b"\x00\x01", "2 trailing bytes"),
], ids=["none", "empty", "short", "bad-magic", "json", "unknown-schema-id", "truncated", "header-only", "trailing"])
def test_codec_rejects_garbage_with_a_decode_error(codec: Codec, valid: bytes, mutate, reason: str):
    with pytest.raises(DecodeError, match=re.escape(reason)) as caught:
        codec.decode(mutate(valid))

    assert not is_retryable(caught.value)  # the runtime dead-letters these at once


def test_codec_refuses_to_encode_a_record_that_does_not_fit_the_schema(codec: Codec):
    record = SAMPLES[1].model_dump()
    del record["reserved_at"]
    with pytest.raises(ValueError, match="no value and no default for reserved_at"):
        codec.encode("StockReserved", record, StockReserved.schema_version)
