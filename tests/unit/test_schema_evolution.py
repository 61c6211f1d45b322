"""Schema evolution: OrderCreated v2 adds an optional `channel`, and the checks that guard it.

Proves, on the repository's own schemas: a v1 consumer reads v2 events (the field is dropped),
a v2 consumer reads v1 events (the field is null), and the BACKWARD_TRANSITIVE check passes.
Then, on temporary copies of schemas/: a breaking v3 fails with a message naming the field, and
every manifest rule is enforced.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import avro.schema
import pytest
import typer
from sqlalchemy import MetaData
from typer.testing import CliRunner

from kafka_fakes import FakeConsumer, FakeMessage, FakeProducer
from services.cli.schemas_cmd import app as schemas_app
from services.runtime.codec import SCHEMAS_DIR, Codec, EmbeddedRegistry
from services.tools.compatibility import (
    Entry, Problem, check_against_baseline, check_all, check_compatibility, check_manifest, load_entries, parse_avro,
)
from services.runtime.consumer import ServiceConsumer
from services.runtime.db import make_engine
from services.runtime.envelope import Envelope
from services.runtime.events import OrderCreated
from services.runtime.handler import Service
from services.runtime.topology import ConsumerGroup

REGISTRY = EmbeddedRegistry()
CODEC = Codec(REGISTRY)
AT = datetime(2026, 3, 14, 9, 26, 53, 589000, tzinfo=UTC)


def order_record(**extra) -> dict:
    return {"order_id": "o-1", "customer_id": "c-1", "customer_email": "ada@example.com", "currency": "EUR",
            "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": Decimal("24.90")}],
            "total": Decimal("49.80"), "created_at": AT, **extra}


def cli(*args: str):
    app = typer.Typer()
    app.add_typer(schemas_app, name="schemas")  # as services/cli/main.py registers it

    @app.command()
    def _other() -> None:  # a second command keeps `schemas` a sub-command, as in main.py
        pass

    return CliRunner().invoke(app, ["schemas", *args])


# -- OrderCreated v2 ----------------------------------------------------------------------------


def test_v2_is_v1_plus_an_optional_channel():
    v1, v2 = (REGISTRY.version("OrderCreated", v).schema for v in (1, 2))

    assert v2["fields"][:-1] == v1["fields"]
    assert v2["fields"][-1] == {"name": "channel", "type": ["null", "string"], "default": None,
                                "doc": "where the order was placed, e.g. web, app"}
    assert REGISTRY.latest("OrderCreated").version == 2


def test_a_v1_consumer_reads_v2_events_without_the_new_field():
    data = CODEC.encode("OrderCreated", order_record(channel="web"))  # latest = v2
    assert data[1:5] == REGISTRY.version("OrderCreated", 2).id.to_bytes(4, "big")

    as_v1 = CODEC.decode(data, reader_version=1)

    assert "channel" not in as_v1.record
    assert as_v1.record == order_record()
    assert as_v1.schema_id == REGISTRY.version("OrderCreated", 2).id  # the writer's id, for the record
    OrderCreated.model_validate({k: v for k, v in as_v1.record.items() if k in OrderCreated.model_fields})


def test_a_v2_consumer_reads_v1_events_with_channel_null():
    data = CODEC.encode("OrderCreated", order_record(), version=1)

    as_v2 = CODEC.decode(data, reader_version=2)

    assert as_v2.record == order_record(channel=None)
    assert CODEC.decode(data).record == order_record()  # writer schema alone: v1 as written


def test_a_v2_consumer_reads_v2_events():
    assert CODEC.decode(CODEC.encode("OrderCreated", order_record(channel="app")), reader_version=2).record == \
        order_record(channel="app")


def test_reader_versions_per_event_type_in_any_mapping():
    """Consumers pass one version per event type; the codec caches its plan per mapping, and a
    new mapping with other versions (or a read-only one) is read as asked, not from the cache."""
    from types import MappingProxyType

    v2_data = CODEC.encode("OrderCreated", order_record(channel="app"))
    v1_data = CODEC.encode("OrderCreated", order_record(), version=1)
    as_v1 = {"OrderCreated": 1}
    for _ in range(2):  # the second time from the cache
        assert CODEC.decode(v2_data, reader_version=as_v1).record == order_record()
        assert CODEC.decode(v1_data, reader_version=MappingProxyType({"OrderCreated": 2})).record == \
            order_record(channel=None)
    assert CODEC.decode(v2_data, reader_version={"OrderCreated": 2}).record == order_record(channel="app")
    assert CODEC.decode(v2_data, reader_version={"StockReserved": 1}).record == order_record(channel="app")


def test_writing_v2_from_a_record_without_channel_fills_the_default():
    """Producers built on the v1 model write the latest schema: the missing optional field is
    written as its default (fastavro does this), so nothing breaks when v2 is added."""
    model = OrderCreated.model_validate(order_record())
    data = CODEC.encode("OrderCreated", model.model_dump(exclude={"channel"}))

    assert data[1:5] == REGISTRY.version("OrderCreated", 2).id.to_bytes(4, "big")
    assert CODEC.decode(data).record == order_record(channel=None)


def test_the_consumer_runtime_handles_v1_and_v2_events_alike(tmp_path: Path):
    """What a service sees: the same typed OrderCreated whichever version the producer wrote."""
    seen: list[OrderCreated] = []
    group = ConsumerGroup("evolution", inputs=("evolution.in",))
    service = Service(group, MetaData(), {OrderCreated: [lambda event, uow: seen.append(event)]})
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    service.metadata.create_all(engine)
    producer = FakeProducer()
    consumer = ServiceConsumer(service, engine, FakeConsumer(), producer, CODEC)
    values = [CODEC.encode("OrderCreated", order_record(), version=1),
              CODEC.encode("OrderCreated", order_record(channel="web"), version=2),
              CODEC.encode("OrderCreated", order_record(), version=2)]
    messages = [FakeMessage(group.inputs[0], offset, value,
                            Envelope(f"e-{offset}", "OrderCreated", 1, "o-1").to_headers())
                for offset, value in enumerate(values)]

    result = consumer.handle_batch(messages)

    assert [p["headers"].get("x-exception-message") for p in producer.produced] == []
    assert result.processed == 3
    assert [e.model_dump(exclude={"channel"}) for e in seen] == [
        OrderCreated.model_validate(order_record()).model_dump(exclude={"channel"})] * 3


def test_the_avro_package_reads_our_logical_types():
    """The checker runs on the `avro` package's parse: decimals and timestamps must not be
    silently downgraded to plain bytes/long (avro only warns when it ignores a logical type)."""
    schema = parse_avro((SCHEMAS_DIR / "OrderCreated.v2.avsc").read_text())
    fields = {f.name: f.type for f in schema.fields}

    assert isinstance(fields["total"], avro.schema.BytesDecimalSchema)
    assert (fields["total"].get_prop("precision"), fields["total"].get_prop("scale")) == (18, 2)
    assert isinstance(fields["created_at"], avro.schema.TimestampMillisSchema)
    assert isinstance(fields["lines"].items.fields_dict["unit_price"].type, avro.schema.BytesDecimalSchema)
    with pytest.raises(Exception, match="scale"):
        parse_avro(json.dumps({"type": "bytes", "logicalType": "decimal", "precision": 2, "scale": 5}))


# -- the repository passes --------------------------------------------------------------------------


def test_the_repository_schemas_pass_every_check():
    assert check_all() == []


def test_no_published_id_changed_since_the_last_commit():
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=SCHEMAS_DIR, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    assert check_all(against="HEAD") == []


def test_schemas_check_cli_says_ok_per_subject():
    result = cli("check")

    assert result.exit_code == 0, result.output
    assert "OK   orderpipe.events.OrderCreated (v1, v2: backward transitive)" in result.output
    assert sum(line.startswith("OK ") for line in result.output.splitlines()) == len(
        {e.subject for e in load_entries()})


def test_schemas_list_cli_shows_subjects_versions_and_ids():
    result = cli("list")

    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()[1:]]
    assert ["orderpipe.events.OrderCreated", "2", str(REGISTRY.version("OrderCreated", 2).id),
            "OrderCreated.v2.avsc"] in rows
    assert len(rows) == len(load_entries())


# -- breaking changes fail, naming the field --------------------------------------------------------


@pytest.fixture
def schemas(tmp_path: Path) -> Path:
    """A private copy of schemas/ to break."""
    return Path(shutil.copytree(SCHEMAS_DIR, tmp_path / "schemas"))


def add_version(schemas: Path, event_type: str, change) -> int:
    """Write the next version of `event_type` as `change(copy of latest)`; register it with the next id."""
    manifest = json.loads((schemas / "registry.json").read_text())
    latest = max((e for e in manifest["schemas"] if e["subject"].endswith("." + event_type)),
                 key=lambda e: e["version"])
    schema = json.loads((schemas / latest["file"]).read_text())
    change(schema)
    version = latest["version"] + 1
    file = f"{event_type}.v{version}.avsc"
    (schemas / file).write_text(json.dumps(schema, indent=2))
    manifest["schemas"].append({"id": max(e["id"] for e in manifest["schemas"]) + 1, "subject": latest["subject"],
                                "version": version, "file": file})
    (schemas / "registry.json").write_text(json.dumps(manifest, indent=2))
    return version


def field_of(schema: dict, name: str) -> dict:
    return next(f for f in schema["fields"] if f["name"] == name)


def test_a_new_required_field_fails_against_every_older_version(schemas: Path):
    add_version(schemas, "OrderCreated", lambda s: s["fields"].append({"name": "coupon", "type": "string"}))

    problems = check_compatibility(schemas)

    assert {(p.subject, p.reader_version, p.writer_version, p.field) for p in problems} == {
        ("orderpipe.events.OrderCreated", 3, 1, "coupon"), ("orderpipe.events.OrderCreated", 3, 2, "coupon")}
    assert all("no default" in p.message for p in problems)
    assert check_manifest(schemas) == []  # the manifest itself is fine


def test_a_changed_type_fails_naming_the_nested_field(schemas: Path):
    def quantity_as_string(s):
        field_of(s, "lines")["type"]["items"]["fields"][1]["type"] = "string"

    add_version(schemas, "OrderCreated", quantity_as_string)

    [problem, *_] = problems = check_compatibility(schemas)
    assert {p.field for p in problems} == {"lines[].quantity"}
    assert "int cannot be read as string" in problem.message
    assert str(problem).startswith(
        "orderpipe.events.OrderCreated v3 (reader) vs v1 (writer): field 'lines[].quantity':")


def test_making_an_optional_field_required_fails(schemas: Path):
    def channel_required(s):
        field_of(s, "channel").update(type="string")
        del field_of(s, "channel")["default"]

    add_version(schemas, "OrderCreated", channel_required)

    problems = {(p.reader_version, p.writer_version, p.field): p.message for p in check_compatibility(schemas)}
    assert "no default" in problems[(3, 1, "channel")]  # v1 events have no channel at all
    assert "null cannot be read as string" in problems[(3, 2, "channel")]  # v2 events may carry null


def test_a_changed_decimal_scale_fails_although_the_avro_checker_allows_it(schemas: Path):
    add_version(schemas, "OrderCreated", lambda s: field_of(s, "total")["type"].update(scale=3, precision=19))

    assert [(p.field, p.message) for p in check_compatibility(schemas)] == [
        ("total", "decimal scale changed from 2 to 3: old amounts would be misread")] * 2


def _without_stalled(schema: dict, keep_default: bool) -> None:
    state = field_of(schema, "state")["type"]
    state["symbols"].remove("STALLED")
    if not keep_default:
        del state["default"]


def test_a_removed_enum_symbol_fails(schemas: Path):
    add_version(schemas, "OrderStatus", lambda s: _without_stalled(s, keep_default=False))

    problems = check_compatibility(schemas)
    assert {(p.field, p.reader_version, p.writer_version) for p in problems} == {("state", 3, 1), ("state", 3, 2)}
    assert all("STALLED" in p.message for p in problems)


def test_a_removed_enum_symbol_is_read_as_the_enums_default(schemas: Path):
    add_version(schemas, "OrderStatus", lambda s: _without_stalled(s, keep_default=True))

    assert check_compatibility(schemas) == []  # v3 reads a STALLED written by v1 or v2 as PENDING


def test_removing_a_field_or_adding_an_optional_one_is_backward_compatible(schemas: Path):
    def evolve(s):
        s["fields"] = [f for f in s["fields"] if f["name"] != "customer_email"]
        s["fields"].append({"name": "note", "type": ["null", "string"], "default": None})

    add_version(schemas, "OrderCreated", evolve)

    assert check_all(schemas) == []


def test_schemas_check_cli_prints_one_line_per_problem_and_exits_1(schemas: Path):
    add_version(schemas, "OrderCreated", lambda s: s["fields"].append({"name": "coupon", "type": "string"}))

    result = cli("check", "--schemas-dir", str(schemas))

    assert result.exit_code == 1
    fails = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2 and all("field 'coupon'" in line and "v3 (reader)" in line for line in fails)


# -- the manifest ----------------------------------------------------------------------------------


def rewrite_manifest(schemas: Path, change) -> None:
    manifest = json.loads((schemas / "registry.json").read_text())
    change(manifest["schemas"])
    (schemas / "registry.json").write_text(json.dumps(manifest, indent=2))


def entry(entries: list[dict], file: str) -> dict:
    return next(e for e in entries if e["file"] == file)


def messages(problems: list[Problem]) -> str:
    return "\n".join(map(str, problems))


def test_a_schema_file_missing_from_the_manifest_is_reported(schemas: Path):
    (schemas / "OrderShipped.v1.avsc").write_text(json.dumps(
        {"type": "record", "name": "OrderShipped", "namespace": "orderpipe.events",
         "fields": [{"name": "order_id", "type": "string"}]}))

    assert messages(check_manifest(schemas)) == \
        "OrderShipped.v1.avsc: not listed in registry.json: add it with the next free id"


def test_a_file_listed_twice_or_missing_is_reported(schemas: Path):
    def change(entries):
        entries.append({**entry(entries, "StockReserved.v1.avsc"), "id": 100, "version": 2})
        entries.append({"id": 101, "subject": "orderpipe.events.Gone", "version": 1, "file": "Gone.v1.avsc"})

    rewrite_manifest(schemas, change)

    text = messages(check_manifest(schemas))
    assert "StockReserved.v1.avsc: listed 2 times in registry.json" in text
    assert "Gone.v1.avsc: listed in registry.json but the file does not exist" in text
    assert "file StockReserved.v1.avsc should be named StockReserved.v2.avsc" in text


def test_a_reused_id_is_reported(schemas: Path):
    rewrite_manifest(schemas, lambda es: entry(es, "OrderCreated.v2.avsc").update(id=1))

    assert "id 1 is used 2 times (OrderCreated.v1.avsc, OrderCreated.v2.avsc)" in messages(check_manifest(schemas))


def test_a_version_gap_is_reported(schemas: Path):
    shutil.move(schemas / "OrderCreated.v2.avsc", schemas / "OrderCreated.v3.avsc")
    rewrite_manifest(schemas, lambda es: entry(es, "OrderCreated.v2.avsc").update(
        version=3, file="OrderCreated.v3.avsc"))

    assert messages(check_manifest(schemas)) == \
        "orderpipe.events.OrderCreated: versions must be 1..2 without gaps or repeats, found [1, 3]"


def test_a_record_name_that_is_not_the_subject_is_reported(schemas: Path):
    schema = json.loads((schemas / "StockReserved.v1.avsc").read_text())
    schema["namespace"] = "orderpipe.other"
    (schemas / "StockReserved.v1.avsc").write_text(json.dumps(schema))

    assert "StockReserved.v1.avsc defines 'orderpipe.other.StockReserved', expected a record named " \
           "'orderpipe.events.StockReserved'" in messages(check_manifest(schemas))


def test_an_invalid_logical_type_is_reported(schemas: Path):
    add_version(schemas, "InvoiceIssued", lambda s: field_of(s, "total")["type"].update(precision=1))

    text = messages(check_manifest(schemas))
    assert "InvoiceIssued.v2.avsc is not a valid Avro schema" in text and "scale" in text


def test_published_ids_never_change_meaning(schemas: Path):
    baseline = load_entries(schemas)
    published = {e.file: json.loads((schemas / e.file).read_text()) for e in baseline}

    def renumber_and_drop(entries):
        entry(entries, "StockRejected.v1.avsc")["id"] = 50
        entries.remove(entry(entries, "OrderRecorded.v1.avsc"))

    rewrite_manifest(schemas, renumber_and_drop)
    edited = json.loads((schemas / "StockReserved.v1.avsc").read_text())
    edited["fields"][0]["doc"] = "docs may change"
    (schemas / "StockReserved.v1.avsc").write_text(json.dumps(edited))
    assert check_against_baseline(schemas, baseline, published) == [
        Problem("orderpipe.events.StockRejected", "id 3 (StockRejected.v1.avsc) was removed from registry.json; "
                "messages written with it could no longer be decoded"),
        Problem("orderpipe.events.OrderRecorded", "id 6 (OrderRecorded.v1.avsc) was removed from registry.json; "
                "messages written with it could no longer be decoded"),
    ]

    edited["fields"][0]["type"] = ["null", "string"]
    (schemas / "StockReserved.v1.avsc").write_text(json.dumps(edited))
    assert "StockReserved.v1.avsc (id 2) was edited after it was published" in messages(
        check_against_baseline(schemas, baseline, published))


def test_a_renumbered_id_is_reported(schemas: Path):
    baseline = [Entry(1, "orderpipe.events.OrderCreated", 1, "OrderCreated.v1.avsc"),
                Entry(2, "orderpipe.events.OrderCreated", 2, "OrderCreated.v2.avsc")]

    [problem] = check_against_baseline(schemas, baseline, {})
    assert problem.message.startswith("id 2 was orderpipe.events.OrderCreated v2 (OrderCreated.v2.avsc), "
                                      "now orderpipe.events.StockReserved v1")


def test_a_broken_manifest_is_one_clear_problem(schemas: Path):
    (schemas / "registry.json").write_text("{not json")

    [problem] = check_all(schemas)
    assert problem.subject == "registry.json" and "not valid JSON" in problem.message
