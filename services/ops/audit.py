"""The audit topic `orderpipe.audit`: one JSON record per step of a replay or purge run.

A run writes `started` (who, when, host, selection, planned count), then one `running` record
per acknowledged batch (the dead-letter offsets it handled, as ranges, and the committed
offsets after it), and a final record: `completed`, `interrupted` or `failed: ...`. A run
killed hard (kill -9, power loss) has no final record: `orderpipe dlt audit` shows it as
`incomplete`. Dry runs change nothing and write nothing.

An operator's single action from the console (a cancel of one order: `cancel_record`) is ONE
record, final at once, with the same fields a run's record has (so `orderpipe dlt audit` and the
console's audit log show it as a run of its own) plus what it acted on.

The `handled` and `committed` fields are what handled.py reads back, so these records are
both the audit trail and the memory of which dead letters are done.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.ops.broker import OpsKafka, scan, watermarks
from services.ops.deadletters import Ref
from services.ops.errors import OpsError
from services.ops.handled import TopicPart, nest, to_ranges
from services.runtime.settings import Settings
from services.runtime.topology import AUDIT

FINAL = ("completed", "interrupted", "failed")


def operator() -> str:
    """Who runs the command: the login name (ORDERPIPE_OPERATOR overrides it, e.g. in CI jobs)."""
    if name := os.environ.get("ORDERPIPE_OPERATOR"):
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid {os.getuid()}"


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class Run:
    """One replay or purge: builds its audit records."""

    action: str  # "replay" | "purge"
    selection: dict[str, Any]  # groups, DLT topics, filter, options
    planned: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    user: str = field(default_factory=operator)
    host: str = field(default_factory=socket.gethostname)
    started_at: str = field(default_factory=_now)
    count: int = 0  # messages handled so far (replayed + parked, or purged)
    parked: int = 0
    first: Ref | None = None
    last: Ref | None = None
    offsets: dict[TopicPart, list[int]] = field(default_factory=dict)  # per partition: [first, last] handled
    # Where the run was started when not from the command line (e.g. "console": the ops web
    # console, whose `user` is the logged-in name); None leaves it out of the records.
    source: str | None = None

    def add(self, ref: Ref, parked: bool = False) -> None:
        self.count += 1
        self.parked += parked
        # Lowest and highest REF rather than first and last handled: partitions are read
        # concurrently, so the handling order differs from run to run; these do not.
        where = (ref.topic, ref.partition, ref.offset)
        if self.first is None or where < (self.first.topic, self.first.partition, self.first.offset):
            self.first = ref
        if self.last is None or where > (self.last.topic, self.last.partition, self.last.offset):
            self.last = ref
        key = (ref.topic, ref.partition)
        span = self.offsets.setdefault(key, [ref.offset, ref.offset])
        span[0], span[1] = min(span[0], ref.offset), max(span[1], ref.offset)

    def record(self, outcome: str, *, handled: dict[TopicPart, Iterable[int]] | None = None,
               committed: dict[TopicPart, int] | None = None) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "action": self.action, "outcome": outcome,
            "user": self.user, "host": self.host, "started_at": self.started_at, "at": _now(),
            "selection": self.selection, "planned": self.planned, "count": self.count, "parked": self.parked,
            "first": str(self.first) if self.first else None, "last": str(self.last) if self.last else None,
            "offsets": nest(self.offsets),
            "handled": nest({k: to_ranges(v) for k, v in (handled or {}).items() if v}),
            "committed": nest(committed or {}),
            **({"source": self.source} if self.source else {}),
        }


def cancel_record(order_id: str, reason: str | None, outcome: str, *, user: str, source: str | None = None,
                  already: bool = False) -> dict[str, Any]:
    """The one audit record of cancelling an order (action "cancel"), written once the cancel has
    committed (`outcome` "completed"), or once it failed ("failed: ..."). `already`: the order
    was cancelled before and nothing was done again (count 0)."""
    now = _now()
    subject = {"order_id": order_id, **({"reason": reason} if reason else {})}
    done = outcome == "completed" and not already
    return {
        "run_id": uuid.uuid4().hex[:12], "action": "cancel", "outcome": outcome,
        "user": user, "host": socket.gethostname(), "started_at": now, "at": now,
        # The shape of a run's selection, so the audit tables show the order id and the reason.
        "selection": {"topics": [], "filter": {**subject, **({"already_cancelled": "yes"} if already else {})}},
        "planned": 1, "count": int(done), "parked": 0, "first": None, "last": None,
        **subject, "already_cancelled": already,
        **({"source": source} if source else {}),
    }


class AuditLog:
    def __init__(self, kafka: OpsKafka, topic: str = AUDIT):
        self.kafka = kafka
        self.topic = topic

    def check(self, metadata: dict[str, Any]) -> None:
        self.kafka.partitions(self.topic, metadata)

    def write(self, record: dict[str, Any]) -> None:
        """Produce one record and wait for the broker's ack; raise if it did not come."""
        producer = self.kafka.producer()
        acked: list = []
        producer.produce(self.topic, key=record["run_id"].encode(), value=json.dumps(record).encode(),
                         on_delivery=lambda err, msg: acked.append(err))
        producer.flush(self.kafka.timeout)
        if acked != [None]:
            reason = acked[0].str() if acked and acked[0] is not None else "no acknowledgement"
            raise OpsError(f"could not write the audit record to {self.topic}: {reason}")

    def read(self, metadata: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every record, in the order written (one partition)."""
        metadata = metadata or self.kafka.topics()
        parts = [(self.topic, p) for p in self.kafka.partitions(self.topic, metadata)]
        consumer = self.kafka.consumer()
        marks = watermarks(consumer, parts, self.kafka.timeout)
        records = []
        for msg in scan(consumer, {k: (low, end) for k, (low, end) in marks.items()}):
            try:
                records.append(json.loads(msg.value()))
            except (TypeError, ValueError):
                continue  # not ours; the audit topic holds JSON only
        return records


def runs(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per run: its last record, `incomplete` when it never wrote a final one."""
    last: dict[str, dict[str, Any]] = {}
    for record in records:
        last[record.get("run_id", "?")] = record
    out = []
    for record in last.values():
        if not str(record.get("outcome", "")).startswith(FINAL):
            record = {**record, "outcome": f"incomplete (last seen {record.get('outcome')})"}
        out.append(record)
    return sorted(out, key=lambda r: r.get("started_at", ""))


@contextmanager
def ops_clients(settings: Settings, timeout: float = 10.0) -> Iterator[tuple[OpsKafka, AuditLog]]:
    """The operators' Kafka client and the audit log on it, closed afterwards: what `orderpipe
    dlt`, `lag` and the ops console read and act through."""
    kafka = OpsKafka(settings, timeout=timeout)
    try:
        yield kafka, AuditLog(kafka)
    finally:
        kafka.close()
