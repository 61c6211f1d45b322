"""Who may do what on Kafka: one principal per service, its rights derived from the same
declarations as the topics (services/registry.py), so a service can do exactly what its code
does and nothing else. `orderpipe deploy acls` writes them as Strimzi `KafkaUser` resources.

- a consumer service reads its inputs and its own retry tiers (group: its name), writes what
  it emits (its outbox relay), its retry tiers, its dead-letter topics and the failure notices
  (`orderpipe.failures`);
- `orders` (its relay) writes `orders.created`; the orders API never talks to Kafka;
- `order-status` (Faust) reads every event topic and the failure notices, writes
  `orders.status`, and owns the topics it creates itself (`order-status-*`: its changelog, its
  SLA timer);
- `operators` (`orderpipe dlt`, `lag`, `tail`) read every topic, write only where a replay
  goes (each group's first retry tier and parking topics) and the audit topic, see every
  group's offsets and commit only for their own group `orderpipe-dlt`. Creating topics is the
  platform's job (Strimzi's `KafkaTopic` resources, `orderpipe deploy topics`), not theirs.

Write on a topic includes the idempotent producer's rights (Kafka 3.0 and later, KIP-679).
"""

from __future__ import annotations

from dataclasses import dataclass

from services import registry
from services.ops.broker import OPS_GROUP
from services.runtime.topology import AUDIT, FAILURES, ORDER_STATUS_APP, ORDERS_STATUS, STATUS_INPUTS, TOPIC_FOR_EVENT

READ = ("Read", "Describe")
WRITE = ("Write", "Describe")


@dataclass(frozen=True)
class Grant:
    resource: str  # topic | group | cluster
    name: str
    operations: tuple[str, ...]
    pattern: str = "literal"  # or prefix


@dataclass(frozen=True)
class Principal:
    name: str  # the SCRAM user / KafkaUser
    doc: str
    grants: tuple[Grant, ...]

    def allows(self, resource: str, name: str, operation: str) -> bool:
        """As Kafka's authorizer decides: "All" covers every operation, "*" every name."""
        return any(g.resource == resource and (operation in g.operations or "All" in g.operations)
                   and (name.startswith(g.name) if g.pattern == "prefix" else g.name in ("*", name))
                   for g in self.grants)


def user_name(service: str) -> str:
    return f"orderpipe-{service}"


def _topics(names, operations) -> list[Grant]:
    return [Grant("topic", name, operations) for name in dict.fromkeys(names)]


def _service(declaration) -> Principal | None:
    g = declaration.group
    writes = [TOPIC_FOR_EVENT[e.event_type()] for e in declaration.emits]
    if g is None:
        if not writes:
            return None
        return Principal(user_name(declaration.name), f"{declaration.name}: its outbox relay", tuple(_topics(writes, WRITE)))
    retries = [t for source in g.inputs for t in g.retry_topics(source)]
    dead = [g.dlt_topic(source) for source in g.inputs]
    return Principal(user_name(declaration.name), f"{declaration.name}: consumer group {g.name} and its outbox relay", (
        *_topics([*g.inputs, *retries], READ),
        *_topics([*writes, *retries, *dead, FAILURES], WRITE),
        Grant("group", g.name, ("Read", "Describe")),
    ))


def _order_status() -> Principal:
    return Principal(user_name(ORDER_STATUS_APP), "the order-status worker (Faust)", (
        *_topics([*STATUS_INPUTS, FAILURES], READ),
        *_topics([ORDERS_STATUS], WRITE),
        Grant("topic", f"{ORDER_STATUS_APP}-", ("All",), "prefix"),
        Grant("group", ORDER_STATUS_APP, ("Read", "Describe")),
    ))


def _operators() -> Principal:
    every_topic = [t.name for t in registry.all_topics()]
    destinations = [t for g in registry.GROUPS for source in g.inputs
                    for t in (g.retry_topic(source, 1), g.parking_topic(source))]
    return Principal(user_name("operators"), "orderpipe dlt, lag and tail", (
        *_topics(every_topic, ("Read", "Describe", "DescribeConfigs")),
        *_topics([*destinations, AUDIT], ("Write",)),
        Grant("group", OPS_GROUP, ("Read", "Describe")),
        Grant("group", "*", ("Describe",)),  # every group's committed offsets and members (lag), read only
    ))


def principals() -> list[Principal]:
    services = [p for s in registry.SERVICES if (p := _service(s)) is not None]
    return [*services, _order_status(), _operators()]


def user_of(process: str) -> str:
    """The Kafka user a process connects as: its service's (order-status: its own)."""
    return user_name(ORDER_STATUS_APP if process == ORDER_STATUS_APP else registry.service_of(process).name)


def acl_bindings(principal: Principal) -> list:
    """The principal's grants as Kafka ACLs (confluent-kafka AclBinding, for AdminClient.create_acls):
    for a cluster without Strimzi, and the test that runs the pipeline under the authorizer."""
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    wanted = dict.fromkeys((g.resource, g.name, g.pattern, op) for g in principal.grants for op in g.operations)
    return [AclBinding(ResourceType[resource.upper()], name,
                       ResourcePatternType.PREFIXED if pattern == "prefix" else ResourcePatternType.LITERAL,
                       f"User:{principal.name}", "*", AclOperation[_OPERATION[op]], AclPermissionType.ALLOW)
            for resource, name, pattern, op in wanted]  # once each: a topic read and written is described once


_OPERATION = {"Read": "READ", "Write": "WRITE", "Describe": "DESCRIBE", "DescribeConfigs": "DESCRIBE_CONFIGS",
              "Create": "CREATE", "All": "ALL"}
