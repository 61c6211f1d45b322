"""Event types a service brings along: registered next to the built-in ones, so they are
published, decoded and read like any other.

The built-in events (services/runtime/events.py, schemas/, topology.EVENT_TOPICS) are the
contracts every service shares. A service that publishes an event only it defines (a plugin
added with ORDERPIPE_EXTRA_SERVICES, say) declares an `EventContract` in its own package: the
model, the topic it goes to and the folder with its `.avsc` files and their `registry.json`
entries (ids of its own, never one of schemas/registry.json's). Its declaration registers it
(`consumer_service(..., events=...)`), so every process that loads the registry knows it: the
outbox relay finds its topic, the codec its schema, consumers its model, the order-status view
reads its topic and `orderpipe topics create` creates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.runtime import codec, events, topology


@dataclass(frozen=True)
class EventContract:
    model: type[events.Event]
    topic: topology.TopicSpec  # its `event_types` name the model
    schemas: Path  # a folder with the model's .avsc files and a registry.json listing them


class ContractConflict(ValueError):
    """An event type or topic already means something else."""


def register(*contracts: EventContract) -> None:
    """Make the event types known to this process; registering the same contract again is a no-op."""
    for contract in contracts:
        name = contract.model.event_type()
        if name not in contract.topic.event_types:
            raise ContractConflict(f"topic {contract.topic.name} does not list event type {name}")
        known = events.EVENT_TYPES.get(name)
        if known is contract.model and topology.TOPIC_FOR_EVENT.get(name) == contract.topic.name:
            continue
        if known is not None:
            raise ContractConflict(f"event type {name} is defined already ({known.__module__})")
        if any(t.name == contract.topic.name for t in topology.EVENT_TOPICS):
            raise ContractConflict(f"topic {contract.topic.name} is declared already")
        events.EVENT_TYPES[name] = contract.model
        events.READER_VERSIONS[name] = contract.model.schema_version
        topology.EVENT_TOPICS.append(contract.topic)
        topology.STATUS_INPUTS.append(contract.topic.name)
        topology.TOPIC_FOR_EVENT[name] = contract.topic.name
        codec.add_schemas_dir(contract.schemas)


def unregister(*contracts: EventContract) -> None:
    """Forget them again (a test that adds a service for its own duration)."""
    for contract in contracts:
        name = contract.model.event_type()
        if events.EVENT_TYPES.get(name) is not contract.model:
            continue
        del events.EVENT_TYPES[name], events.READER_VERSIONS[name], topology.TOPIC_FOR_EVENT[name]
        topology.EVENT_TOPICS.remove(contract.topic)
        topology.STATUS_INPUTS.remove(contract.topic.name)
        codec.remove_schemas_dir(contract.schemas)
