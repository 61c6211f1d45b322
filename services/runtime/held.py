"""Ordered retries per key: while an event of key K (an order) is in its group's retry chain,
the group's later events of K wait, in order, in the group's database ("held"), and every other
key flows on. Kafka's retry topics alone lose that order: an OrderCancelled would overtake the
OrderCreated being retried, release nothing, and the create would then reserve stock for good.

A key's life (`held_keys.state`):
- `retrying`: its head event (`head_event_id`) failed and is in the retry chain. Later events of
  the key are stored in `held_events` instead of running, in the transaction that would have
  run them; the inbox claims them only when they run.
- the head succeeds: `releasing`. The loop then runs the held events one by one in the order they
  arrived, each in one transaction with its inbox claim, effects and outbox rows, deleting its
  held row; when none is left, the key row goes and the key flows again. A held event that fails
  on release becomes the head (`retrying`) and gets its own retry copy; the rest keep waiting.
- the head is dead-lettered: the group's policy (`WorkerControls.held_dead_letter_policy`):
  `hold` keeps the key `dead-lettered` until an operator replays the dead letter (its copy is the
  head again), purges it (`orderpipe dlt purge` releases the key) or releases the key by hand;
  `release` releases it at once.

Every change of state is in the same transaction as the effect that causes it, so a crash redelivers
what was not committed and finds the state as it was. The one gap, a crash between making a held
event the head and acking its retry copy, is closed by making the copy again (`copy_sent_at`).
Named crash points on this path, and their crash tests, are still to come (README, Status).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import MetaData, Select, Table, and_, delete, func, select, update
from sqlalchemy.engine import Connection, Engine

from services.runtime.db import among, held_events_table, held_keys_table, insert_ignore, utcnow
from services.runtime.handler import Service

RETRYING, DEAD_LETTERED, RELEASING = "retrying", "dead-lettered", "releasing"
POLICIES = ("hold", "release")
REASON_LIMIT = 500


@dataclass(frozen=True)
class Hold:
    head: str   # event id of the event the key waits for
    state: str


def key_text(key: bytes | None) -> str | None:
    """The key as stored; None (no ordering) for a missing or non-UTF-8 key, or one too long."""
    if not key:
        return None
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if len(text) <= 255 else None


class StoredMessage:
    """A held event, offering what the consumer loop calls on a Kafka message."""

    def __init__(self, row):
        self.seq = row["seq"]
        self.event_id = row["event_id"]
        self._row = row

    def topic(self) -> str:
        return self._row["topic"]

    def partition(self) -> int:
        return self._row["partition"]

    def offset(self) -> int:
        return self._row["offset"]

    def key(self) -> bytes:
        return self._row["key"].encode("utf-8")

    def value(self) -> bytes | None:
        return self._row["value"]

    def headers(self) -> list[tuple[str, bytes]]:
        return [(name, base64.b64decode(value)) for name, value in self._row["headers"]]

    def timestamp(self) -> tuple[int, int]:
        return 1, self._row["timestamp_ms"]  # TIMESTAMP_CREATE_TIME, as the original carried it

    def error(self) -> None:
        return None


class HeldKeys:
    """The group's held keys and events (tables of its own database)."""

    def __init__(self, group: str, keys: Table, events: Table, policy: str = "hold"):
        if policy not in POLICIES:
            raise ValueError(f"held_dead_letter_policy must be one of {', '.join(POLICIES)}")
        self.group, self.keys, self.events, self.policy = group, keys, events, policy
        self._holds_query: dict[str, Select] = {}  # per dialect

    @classmethod
    def of(cls, service: Service, policy: str = "hold") -> HeldKeys:
        return cls(service.group.name, service.held_keys, service.held_events, policy)

    @classmethod
    def of_group(cls, group: str) -> HeldKeys:
        """For the operators' commands, which have the group's database but not its service."""
        metadata = MetaData()
        return cls(group, held_keys_table(metadata), held_events_table(metadata))

    # -- while a batch runs (inside its transactions) -----------------------------------------

    def holds(self, conn: Connection, keys: set[str]) -> dict[str, Hold]:
        if not keys:
            return {}
        query = self._holds_query.get(conn.dialect.name)
        if query is None:  # built once per dialect: a batch asks for hundreds of keys
            query = self._holds_query[conn.dialect.name] = select(
                self.keys.c.key, self.keys.c.head_event_id, self.keys.c.state).where(
                self.keys.c.group_name == self.group, among(self.keys.c.key, "keys", conn.dialect.name))
        rows = conn.execute(query, {"keys": sorted(keys)})
        return {key: Hold(head, state) for key, head, state in rows}

    def start(self, conn: Connection, key: str, head: str, reason: str, topic: str, partition: int,
              now: datetime) -> Hold:
        conn.execute(self.keys.insert().values(
            group_name=self.group, key=key, head_event_id=head, state=RETRYING, reason=reason[:REASON_LIMIT],
            topic=topic, partition=partition, since=now, updated_at=now))
        return Hold(head, RETRYING)

    def park(self, conn: Connection, key: str, msg, event_id: str, now: datetime) -> None:
        """Store the event behind its key's head; a second delivery of it is stored once."""
        timestamp = msg.timestamp()[1] if msg.timestamp() else 0
        insert_ignore(conn, self.events, {
            "group_name": self.group, "key": key, "event_id": event_id, "topic": msg.topic(),
            "partition": msg.partition(), "offset": msg.offset(), "timestamp_ms": max(timestamp, 0),
            "value": msg.value(), "headers": [[name, base64.b64encode(value or b"").decode()]
                                              for name, value in msg.headers() or ()],
            "held_at": now, "copy_sent_at": None})

    def head_settled(self, conn: Connection, key: str, outcome: str, reason: str, now: datetime) -> Hold | None:
        """The head ran: `processed` releases the key, `retry` keeps it retrying, `dead` applies
        the policy. Its own held row (a head that failed on release) goes once it ran."""
        row = conn.execute(select(self.keys.c.head_event_id).where(
            self.keys.c.group_name == self.group, self.keys.c.key == key)).first()
        if row is None:
            return None
        head = row[0]
        if outcome != "retry":
            conn.execute(delete(self.events).where(self.events.c.group_name == self.group,
                                                   self.events.c.event_id == head))
        state = {"processed": RELEASING, "retry": RETRYING,
                 "dead": DEAD_LETTERED if self.policy == "hold" else RELEASING}[outcome]
        values = {"state": state, "updated_at": now}
        if outcome != "processed":
            values["reason"] = reason[:REASON_LIMIT]
        conn.execute(update(self.keys).where(self.keys.c.group_name == self.group, self.keys.c.key == key)
                     .values(**values))
        return Hold(head, state)

    def waiting(self, conn: Connection, key: str, head: str) -> int:
        """How many events wait behind the key's head (the head's own row, kept while it is
        retried after failing on release, does not count)."""
        return conn.execute(select(func.count()).select_from(self.events).where(
            self.events.c.group_name == self.group, self.events.c.key == key,
            self.events.c.event_id != head)).scalar_one()

    # -- releasing (the loop, after a batch) ---------------------------------------------------

    def releasing(self, engine: Engine, partitions: set[tuple[str, int]], limit: int = 100) -> list[str]:
        """Keys to release whose events this consumer reads (their partition is assigned here)."""
        with engine.connect() as conn:
            rows = conn.execute(select(self.keys.c.key, self.keys.c.topic, self.keys.c.partition).where(
                self.keys.c.group_name == self.group, self.keys.c.state == RELEASING)
                .order_by(self.keys.c.updated_at).limit(limit)).all()
        return [key for key, topic, partition in rows if (topic, partition) in partitions]

    def next_event(self, conn: Connection, key: str) -> StoredMessage | None:
        row = conn.execute(select(self.events).where(
            self.events.c.group_name == self.group, self.events.c.key == key)
            .order_by(self.events.c.seq).limit(1)).mappings().first()
        return StoredMessage(row) if row is not None else None

    def take(self, conn: Connection, held: StoredMessage) -> bool:
        """Delete the held row of an event that now runs; False when another consumer took it."""
        return conn.execute(delete(self.events).where(self.events.c.seq == held.seq)
                            .returning(self.events.c.seq)).first() is not None

    def make_head(self, conn: Connection, key: str, held: StoredMessage, reason: str, now: datetime) -> None:
        """A held event failed on release: it is the key's head now, and keeps its row (with no
        copy sent yet) until its retry copy is acked, so a crash before that loses nothing."""
        conn.execute(update(self.keys).where(self.keys.c.group_name == self.group, self.keys.c.key == key)
                     .values(head_event_id=held.event_id, state=RETRYING, reason=reason[:REASON_LIMIT],
                             updated_at=now))

    def finish(self, conn: Connection, key: str) -> None:
        """No event of the key is held any more: it flows again."""
        conn.execute(delete(self.keys).where(self.keys.c.group_name == self.group, self.keys.c.key == key,
                                             self.keys.c.state == RELEASING))

    def heads_without_copy(self, engine: Engine, partitions: set[tuple[str, int]]) -> list[StoredMessage]:
        """Heads that failed on release and whose retry copy was never acked (a crash between the
        commit and the ack): their copy is made again."""
        k, e = self.keys, self.events
        with engine.connect() as conn:
            rows = conn.execute(select(e).join(k, and_(k.c.group_name == e.c.group_name,
                                                       k.c.head_event_id == e.c.event_id))
                                .where(e.c.group_name == self.group, k.c.state == RETRYING,
                                       e.c.copy_sent_at.is_(None))).mappings().all()
        return [StoredMessage(r) for r in rows if (r["topic"], r["partition"]) in partitions]

    def copies_sent(self, engine: Engine, event_ids: list[str]) -> None:
        if event_ids:
            with engine.begin() as conn:
                conn.execute(update(self.events).where(self.events.c.group_name == self.group,
                                                       self.events.c.event_id.in_(event_ids))
                             .values(copy_sent_at=utcnow()))

    # -- for operators -------------------------------------------------------------------------

    def stats(self, engine: Engine) -> tuple[int, int, datetime | None]:
        """(held keys, held events, since when the oldest key is held): the metrics."""
        with engine.connect() as conn:
            keys, oldest = conn.execute(select(func.count(), func.min(self.keys.c.since))
                                        .where(self.keys.c.group_name == self.group)).one()
            events = conn.execute(select(func.count()).select_from(self.events)
                                  .where(self.events.c.group_name == self.group)).scalar_one()
        return keys, events, oldest

    def headed_by(self, engine: Engine, event_ids: list[str]) -> list[dict]:
        """The held keys whose head is one of these events (dead letters an operator handles),
        with how many events wait behind each."""
        if not event_ids:
            return []
        return [r for r in self.summary(engine) if r["head_event_id"] in set(event_ids)]

    def release(self, engine: Engine, key: str) -> str | None:
        """An operator lets a key go on (its dead-lettered head was purged): its held events run.
        Returns the state it was in (None: not held)."""
        with engine.begin() as conn:
            row = conn.execute(select(self.keys.c.state).where(
                self.keys.c.group_name == self.group, self.keys.c.key == key)).first()
            if row is None:
                return None
            conn.execute(update(self.keys).where(self.keys.c.group_name == self.group, self.keys.c.key == key)
                         .values(state=RELEASING, updated_at=utcnow()))
            return row[0]

    def summary(self, engine: Engine) -> list[dict]:
        """One row per held key: state, head, why, since, how many events wait."""
        k, e = self.keys, self.events
        waiting = (select(func.count()).select_from(e)
                   .where(e.c.group_name == k.c.group_name, e.c.key == k.c.key,
                          e.c.event_id != k.c.head_event_id).scalar_subquery())
        with engine.connect() as conn:
            rows = conn.execute(select(k.c.key, k.c.state, k.c.head_event_id, k.c.reason, k.c.since,
                                       waiting.label("waiting")).where(k.c.group_name == self.group)
                                .order_by(k.c.since)).mappings().all()
        return [dict(r) for r in rows]
