"""Consumer lag per group and partition, and message counts per topic.

End offsets come from `broker.watermarks`, which is right on the embedded broker too (its
ListOffsets answer can fall short of the end). For a group's input and retry topics the
committed offset is the group's own; for its dead-letter topic it is the handled offset of
`orderpipe-dlt` (handled.py), so the lag there is the number of dead letters nobody has
replayed, parked or purged yet.

The order-status worker (Faust, `streams/order_status`) is a consumer group too: group id = its
app id, `order-status`. It commits offsets for everything it folds: the event topics
(`STATUS_INPUTS`), the failure notices every group writes (`orderpipe.failures`) and its own
SLA topic. Its changelog has no row: the worker reads it by assignment to restore its table and
commits no offset there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.ops.audit import AuditLog
from services.ops.broker import OPS_GROUP, OpsKafka, TopicPart, watermarks
from services.ops.errors import OpsError
from services.ops.handled import HandledState
from services import registry
from services.runtime import topology
from services.runtime.topology import ConsumerGroup, TopicSpec


@dataclass(frozen=True)
class LagRow:
    group: str  # the consumer group whose position this is
    owner: str  # the service group the topic belongs to
    topic: str
    kind: str  # "input" | "retry" | "dead letters"
    partition: int
    committed: int | None  # None: nothing committed yet
    low: int
    end: int
    lag: int

    def as_dict(self) -> dict:
        return {"group": self.group, "owner": self.owner, "topic": self.topic, "kind": self.kind,
                "partition": self.partition, "committed": self.committed, "low": self.low, "end": self.end,
                "lag": self.lag}


@dataclass(frozen=True)
class StreamGroup:
    """A consumer group outside `registry.GROUPS` (the order-status worker): every topic it reads
    is an input; `internal` ones are created by the worker itself and skipped until they exist."""

    name: str
    inputs: tuple[str, ...]
    internal: tuple[str, ...] = ()


def order_status_group(app_id: str = topology.ORDER_STATUS_APP) -> StreamGroup:
    """What the order-status worker subscribes to (streams/order_status/app.py, `create_app`)."""
    return StreamGroup(app_id, (*topology.STATUS_INPUTS, topology.FAILURES), internal=(topology.sla_topic_name(app_id),))


def lag_groups(name: str | None = None) -> list[ConsumerGroup | StreamGroup]:
    """Every consumer group `orderpipe lag` knows (the services' and the order-status worker's), or one."""
    known: list[ConsumerGroup | StreamGroup] = [*registry.GROUPS, order_status_group()]
    if name is None:
        return known
    for g in known:
        if g.name == name:
            return [g]
    raise OpsError(f"unknown group {name!r}; known groups: {', '.join(g.name for g in known)}")


def _topics_of(g: ConsumerGroup | StreamGroup, metadata: dict) -> list[tuple[str, str]]:
    if isinstance(g, StreamGroup):
        return [(t, "input") for t in g.inputs] + [(t, "input") for t in g.internal if t in metadata]
    out = []
    for source in g.inputs:
        out.append((source, "input"))
        out += [(t, "retry") for t in g.retry_topics(source)]
        out.append((g.dlt_topic(source), "dead letters"))
    return out


def consumer_lag(kafka: OpsKafka, audit: AuditLog, groups: Iterable[ConsumerGroup | StreamGroup]) -> list[LagRow]:
    groups = list(groups)
    metadata = kafka.topics()
    layout = {g.name: [(t, kind, p) for t, kind in _topics_of(g, metadata) for p in kafka.partitions(t, metadata)]
              for g in groups}
    marks = watermarks(kafka.consumer(), [(t, p) for rows in layout.values() for t, _, p in rows], kafka.timeout)
    dlt_parts = [(t, p) for rows in layout.values() for t, kind, p in rows if kind == "dead letters"]
    records = audit.read(metadata) if audit.topic in metadata else []
    handled = HandledState.load(kafka.committed(OPS_GROUP, dlt_parts), records)
    out = []
    for g in groups:
        committed = kafka.committed(g.name, [(t, p) for t, kind, p in layout[g.name] if kind != "dead letters"])
        for topic, kind, p in layout[g.name]:
            key: TopicPart = (topic, p)
            low, end = marks[key]
            if kind == "dead letters":
                handled.raise_floor(key, low)
                position = handled.offset(key) if key in handled.committed else None
                lag = end - low - handled.handled_between(key, low, end)
                out.append(LagRow(OPS_GROUP, g.name, topic, kind, p, position, low, end, lag))
            else:
                position = committed.get(key)
                lag = end - max(low, position if position is not None else low)
                out.append(LagRow(g.name, g.name, topic, kind, p, position, low, end, max(0, lag)))
    return out


@dataclass(frozen=True)
class TopicCount:
    spec: TopicSpec
    partitions: int | None  # on the broker; None: the topic does not exist there
    messages: int | None  # retained offsets (end - low), summed over partitions

    @property
    def exists(self) -> bool:
        return self.partitions is not None


def topic_counts(kafka: OpsKafka, specs: Iterable[TopicSpec]) -> list[TopicCount]:
    specs = list(specs)
    metadata = kafka.topics()
    present = {s.name: sorted(metadata[s.name].partitions) for s in specs
               if s.name in metadata and metadata[s.name].error is None}
    marks = watermarks(kafka.consumer(), [(t, p) for t, parts in present.items() for p in parts], kafka.timeout)
    out = []
    for s in specs:
        if s.name not in present:
            out.append(TopicCount(s, None, None))
            continue
        parts = present[s.name]
        out.append(TopicCount(s, len(parts), sum(marks[(s.name, p)][1] - marks[(s.name, p)][0] for p in parts)))
    return out


@dataclass(frozen=True)
class GroupMember:
    member_id: str
    client_id: str
    host: str
    assigned: tuple[TopicPart, ...]


@dataclass(frozen=True)
class GroupInfo:
    group: str
    state: str  # e.g. STABLE, EMPTY, DEAD (no such group); "?" when the broker did not say
    members: tuple[GroupMember, ...] = ()
    problem: str | None = None  # why it could not be described


def describe_groups(kafka: OpsKafka, names: Iterable[str]) -> dict[str, GroupInfo]:
    """Each group's state and members with their assigned partitions (DescribeGroups)."""
    from confluent_kafka.admin import AdminClient

    names = list(names)
    if not names:
        return {}
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap, **kafka.settings.extra_client_config,
                         "log_level": 0, "client.id": "orderpipe-ops"})
    out = {}
    for name, future in admin.describe_consumer_groups(names, request_timeout=kafka.timeout).items():
        try:
            d = future.result(timeout=kafka.timeout)
        except Exception as exc:  # noqa: BLE001 - one group's answer is shown, not raised
            err = exc.args[0] if exc.args else None
            out[name] = GroupInfo(name, "?", problem=err.str() if hasattr(err, "str") else str(exc))
            continue
        members = tuple(GroupMember(m.member_id, m.client_id, m.host,
                                    tuple(sorted((tp.topic, tp.partition) for tp in
                                                 (m.assignment.topic_partitions if m.assignment else []))))
                        for m in d.members)
        state = getattr(d.state, "name", str(d.state))
        out[name] = GroupInfo(name, state, members)
    return out
