"""A service's own event type (services/runtime/contracts.py): registered, it is published,
encoded and read like a built-in one; a name, topic or schema id that is taken is refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.schemas_cmd import app as schemas_app
from services.runtime import contracts, events, topology
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.events import Event, OrderRecorded
from services.runtime.topology import TopicSpec

LOYALTY_SCHEMAS = Path(__file__).resolve().parents[1] / "extra_service" / "loyalty" / "schemas"


class PointsAwarded(Event):  # the same shape as the loyalty service's, defined here on its own
    customer_id: str
    points: int
    awarded_at: datetime


CONTRACT = contracts.EventContract(PointsAwarded, TopicSpec("loyalty.points", event_types=("PointsAwarded",)),
                                   LOYALTY_SCHEMAS)


@pytest.fixture
def registered():
    contracts.register(CONTRACT)
    yield CONTRACT
    contracts.unregister(CONTRACT)


def test_a_registered_event_has_a_topic_a_model_a_reader_version_and_a_schema(registered):
    assert topology.TOPIC_FOR_EVENT["PointsAwarded"] == "loyalty.points"
    assert "loyalty.points" in topology.STATUS_INPUTS and registered.topic in topology.EVENT_TOPICS
    assert events.EVENT_TYPES["PointsAwarded"] is PointsAwarded and events.READER_VERSIONS["PointsAwarded"] == 1
    codec = Codec(EmbeddedRegistry())
    record = {"order_id": "o-1", "customer_id": "c-1", "points": 3, "awarded_at": datetime(2026, 1, 1, tzinfo=UTC)}
    decoded = codec.decode(codec.encode("PointsAwarded", record))
    assert (decoded.event_type, decoded.schema_id, decoded.record["points"]) == ("PointsAwarded", 1001, 3)
    contracts.register(CONTRACT)  # again: a no-op
    assert topology.STATUS_INPUTS.count("loyalty.points") == 1


def test_unregistering_leaves_the_built_in_contracts_as_they_were():
    before = (dict(events.EVENT_TYPES), list(topology.EVENT_TOPICS), list(topology.STATUS_INPUTS),
              dict(topology.TOPIC_FOR_EVENT), dict(events.READER_VERSIONS))
    contracts.register(CONTRACT)
    contracts.unregister(CONTRACT)
    assert (events.EVENT_TYPES, topology.EVENT_TOPICS, topology.STATUS_INPUTS, topology.TOPIC_FOR_EVENT,
            events.READER_VERSIONS) == before
    with pytest.raises(KeyError):
        EmbeddedRegistry().latest("PointsAwarded")


def test_a_taken_event_type_or_topic_is_refused():
    taken_type = contracts.EventContract(OrderRecorded, TopicSpec("x.recorded", event_types=("OrderRecorded",)),
                                         LOYALTY_SCHEMAS)
    with pytest.raises(contracts.ContractConflict, match="event type OrderRecorded is defined already"):
        contracts.register(taken_type)
    taken_topic = contracts.EventContract(PointsAwarded, TopicSpec("orders.created", event_types=("PointsAwarded",)),
                                          LOYALTY_SCHEMAS)
    with pytest.raises(contracts.ContractConflict, match="topic orders.created is declared already"):
        contracts.register(taken_topic)
    assert "PointsAwarded" not in events.EVENT_TYPES


def test_a_schema_id_that_is_taken_is_refused_naming_both(tmp_path):
    (tmp_path / "PointsAwarded.v1.avsc").write_text((LOYALTY_SCHEMAS / "PointsAwarded.v1.avsc").read_text())
    (tmp_path / "registry.json").write_text(json.dumps({"schemas": [
        {"id": 6, "subject": "orderpipe.events.PointsAwarded", "version": 1, "file": "PointsAwarded.v1.avsc"}]}))
    clash = contracts.EventContract(PointsAwarded, CONTRACT.topic, tmp_path)
    contracts.register(clash)
    try:
        with pytest.raises(ValueError, match="schema id 6 of .*PointsAwarded.v1.avsc is taken by "
                                             "orderpipe.events.OrderRecorded v1"):
            EmbeddedRegistry()
    finally:
        contracts.unregister(clash)


def test_a_services_own_schemas_pass_the_schema_check():
    result = CliRunner().invoke(schemas_app, ["check", "--schemas-dir", str(LOYALTY_SCHEMAS)])
    assert result.exit_code == 0, result.output
    assert "OK   orderpipe.events.PointsAwarded (v1: backward transitive)" in result.output
