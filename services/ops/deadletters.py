"""Dead letters as operators see them: where one lives (a REF), what it says, and filters.

A dead letter is a message in `<topic>.<group>.dlt`, written by the consumer runtime with the
original key, value and envelope headers plus the runtime's `x-` headers saying why it failed
(services/runtime/consumer.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from services.ops.errors import OpsError
from services.runtime import envelope as env
from services.runtime import failure_headers as fh
from services.runtime.topology import ConsumerGroup

# Added by `orderpipe dlt replay` to every copy; the consumer runtime carries `x-replay-*` headers
# along the retry chain, so a replayed message that dies again still says how often it was replayed.
H_REPLAY_OF = "x-replay-of"  # REF of the dead letter this copy was made from
H_REPLAY_COUNT = "x-replay-count"  # 1 on the first replay of an event, 2 on the next, ...
H_REPLAY_RUN = "x-replay-run"  # id of the replay run (see `orderpipe dlt audit`)
H_PARKED_AT = "x-parked-at"


@dataclass(frozen=True, order=True)
class Ref:
    """Where one message lives: `topic:partition:offset`, e.g. `orders.created.email.dlt:3:17`."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    @classmethod
    def parse(cls, text: str) -> Ref:
        parts = text.strip().rsplit(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
            raise OpsError(f"bad REF {text!r}: expected TOPIC:PARTITION:OFFSET, "
                           "e.g. orders.created.email.dlt:0:17 (the first column of `orderpipe dlt list`)")
        return cls(parts[0], int(parts[1]), int(parts[2]))


@dataclass(frozen=True)
class DltTopic:
    """One dead-letter topic: a group's dead letters from one of its input topics."""

    group: ConsumerGroup
    source: str

    @property
    def name(self) -> str:
        return self.group.dlt_topic(self.source)

    @property
    def retry_topic(self) -> str:
        return self.group.retry_topic(self.source, 1)

    @property
    def parking_topic(self) -> str:
        return self.group.parking_topic(self.source)


def dlt_topics(groups: Iterable[ConsumerGroup], source: str | None = None) -> list[DltTopic]:
    return [DltTopic(g, s) for g in groups for s in g.inputs if source is None or s == source]


def resolve_groups(known: Sequence[ConsumerGroup], name: str | None) -> list[ConsumerGroup]:
    if name is None:
        return list(known)
    for g in known:
        if g.name == name:
            return [g]
    raise OpsError(f"unknown group {name!r}; known groups: {', '.join(g.name for g in known)}")


def find_dlt_topic(known: Sequence[ConsumerGroup], topic: str) -> DltTopic | None:
    return next((t for t in dlt_topics(known) if t.name == topic), None)


@dataclass(frozen=True)
class DeadLetter:
    ref: Ref
    topic: DltTopic
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int

    @classmethod
    def from_message(cls, msg: Any, topic: DltTopic) -> DeadLetter:
        _, ts = msg.timestamp()
        return cls(Ref(msg.topic(), msg.partition(), msg.offset()), topic, msg.key(), msg.value(),
                   tuple((k, v) for k, v in msg.headers() or () if v is not None), ts)

    def header(self, name: str) -> str | None:
        value = None
        for key, raw in self.headers:  # last one wins, as in headers_to_dict
            if key == name:
                value = raw.decode("utf-8", "replace")
        return value

    @property
    def group(self) -> str:
        return self.topic.group.name

    @property
    def source(self) -> str:
        return self.header(fh.H_ORIGINAL_TOPIC) or self.topic.source

    @property
    def key_text(self) -> str:
        return self.key.decode("utf-8", "backslashreplace") if self.key is not None else ""

    @property
    def dead_lettered_at(self) -> datetime | None:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC) if self.timestamp_ms and self.timestamp_ms > 0 \
            else None

    @property
    def event_type(self) -> str | None:
        return self.header(env.EVENT_TYPE)

    @property
    def event_id(self) -> str | None:
        return self.header(env.EVENT_ID)

    @property
    def exception_type(self) -> str:
        return self.header(fh.H_EXC_TYPE) or "?"

    @property
    def exception_message(self) -> str:
        return self.header(fh.H_EXC_MESSAGE) or ""

    @property
    def traceback(self) -> str:
        return self.header(fh.H_EXC_TRACEBACK) or ""

    @property
    def attempt(self) -> int | None:
        return _int(self.header(fh.H_ATTEMPT))

    @property
    def replay_count(self) -> int:
        return _int(self.header(H_REPLAY_COUNT)) or 0

    def summary(self, handled: bool | None = None) -> dict[str, Any]:
        """JSON-ready, one line of `dlt list --json`."""
        at = self.dead_lettered_at
        out = {
            "ref": str(self.ref), "topic": self.ref.topic, "partition": self.ref.partition, "offset": self.ref.offset,
            "group": self.group, "source": self.source, "dead_lettered_at": at.isoformat() if at else None,
            "key": self.key_text, "event_type": self.event_type, "event_id": self.event_id,
            "exception_type": self.exception_type, "exception_message": self.exception_message,
            "reason": self.header(fh.H_REASON), "attempt": self.attempt, "replay_count": self.replay_count,
        }
        if handled is not None:
            out["handled"] = handled
        return out


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (`2026-03-14`, `2026-03-14T09:30`, `...+01:00`, `...Z`; no zone means UTC) or a
    duration ago (`90s`, `30m`, `2h`, `7d`, `1w`)."""
    now = now or datetime.now(UTC)
    value = text.strip()
    if m := _RELATIVE.match(value):
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise OpsError(f"bad time {text!r}: use ISO 8601 (2026-03-14, 2026-03-14T09:30, 2026-03-14T09:30+01:00) "
                       "or a duration ago (30m, 2h, 7d)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Filter:
    """Which dead letters an operator means. Empty fields match everything.

    `since`/`until` compare the time a message was dead-lettered (its timestamp in the
    dead-letter topic); `exception_type` matches the full name or its last part(s)
    (`MailRejected`, `mailer.MailRejected`); `key` is the message key, i.e. the order id."""

    since: datetime | None = None
    until: datetime | None = None
    exception_type: str | None = None
    key: str | None = None
    event_type: str | None = None

    def __post_init__(self):
        if self.since and self.until and self.since > self.until:
            raise OpsError(f"--since {self.since.isoformat()} is after --until {self.until.isoformat()}")

    @property
    def empty(self) -> bool:
        return not any((self.since, self.until, self.exception_type, self.key, self.event_type))

    def matches(self, dl: DeadLetter) -> bool:
        at = dl.dead_lettered_at
        if self.since and (at is None or at < self.since):
            return False
        if self.until and (at is None or at > self.until):
            return False
        if self.exception_type:
            full = dl.exception_type
            if full != self.exception_type and not full.endswith("." + self.exception_type):
                return False
        if self.key is not None and dl.key_text != self.key:
            return False
        if self.event_type and dl.event_type != self.event_type:
            return False
        return True

    def describe(self) -> dict[str, str]:
        """For audit records: only what was set."""
        out = {"since": self.since.isoformat() if self.since else None,
               "until": self.until.isoformat() if self.until else None,
               "exception_type": self.exception_type, "key": self.key, "event_type": self.event_type}
        return {k: v for k, v in out.items() if v is not None}
