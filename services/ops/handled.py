"""Which dead letters are handled (replayed, parked or purged), so nothing is done twice.

Per dead-letter partition, handled means:
- below the partition's *committed offset*: the group `orderpipe-dlt` commits it, and every
  audit record of a replay or purge repeats it;
- or one of the single offsets above it that an audit record lists as handled.

Why both: an operator often selects only some messages (one exception type, one order). An
offset can only move past messages that are all handled, so it stops at the first unselected
one, and the handled messages after it are remembered in the audit topic by offset ranges.
Purge therefore never touches anything not selected: an unselected message stays below no
committed offset and in no handled range. When the gaps fill in later, the committed offset
moves over the whole handled prefix.

The audit topic is the source of truth (its retention outlives the dead-letter topics'); the
consumer-group offsets are a mirror for standard tools (`kafka-consumer-groups`, `orderpipe
lag`). That matters because Kafka expires the committed offsets of a group without members
after `offsets.retention.minutes` (7 days by default); the audit records do not expire with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

TopicPart = tuple[str, int]
Ranges = list[list[int]]  # sorted, disjoint, inclusive [first, last] pairs


def to_ranges(offsets: Iterable[int]) -> Ranges:
    out: Ranges = []
    for o in sorted(set(offsets)):
        if out and o == out[-1][1] + 1:
            out[-1][1] = o
        else:
            out.append([o, o])
    return out


def from_ranges(ranges: Iterable[Iterable[int]]) -> Iterator[int]:
    for first, last in ranges:
        yield from range(int(first), int(last) + 1)


def nest(flat: Mapping[TopicPart, object]) -> dict[str, dict[str, object]]:
    """{(topic, partition): x} -> {topic: {"partition": x}}, the JSON shape of audit records."""
    out: dict[str, dict[str, object]] = {}
    for (topic, partition), value in sorted(flat.items()):
        out.setdefault(topic, {})[str(partition)] = value
    return out


def unnest(nested: Mapping[str, Mapping[str, object]] | None) -> dict[TopicPart, object]:
    return {(topic, int(p)): v for topic, parts in (nested or {}).items() for p, v in parts.items()}


@dataclass
class HandledState:
    committed: dict[TopicPart, int] = field(default_factory=dict)
    above: dict[TopicPart, set[int]] = field(default_factory=dict)  # handled offsets >= committed

    @classmethod
    def load(cls, group_offsets: Mapping[TopicPart, int | None], records: Iterable[Mapping]) -> HandledState:
        """From the ops group's committed offsets and the audit records (any order, any topic)."""
        state = cls({k: v for k, v in group_offsets.items() if v is not None})
        records = list(records)
        for record in records:
            for key, offset in unnest(record.get("committed")).items():
                state.committed[key] = max(state.committed.get(key, 0), int(offset))
        for record in records:
            for key, ranges in unnest(record.get("handled")).items():
                state.mark(key, from_ranges(ranges))
        return state

    def offset(self, key: TopicPart) -> int:
        return self.committed.get(key, 0)

    def is_handled(self, key: TopicPart, offset: int) -> bool:
        return offset < self.offset(key) or offset in self.above.get(key, ())

    def mark(self, key: TopicPart, offsets: Iterable[int]) -> None:
        """Record offsets as handled and move the committed offset over the handled prefix."""
        floor = self.offset(key)
        handled = self.above.setdefault(key, set())
        handled.update(o for o in offsets if o >= floor)
        self._advance(key)

    def raise_floor(self, key: TopicPart, low: int) -> None:
        """Offsets below the partition's first retained one are gone: nothing left to handle."""
        if low > self.offset(key):
            self.committed[key] = low
            self.above[key] = {o for o in self.above.get(key, ()) if o >= low}
            self._advance(key)

    def handled_between(self, key: TopicPart, start: int, end: int) -> int:
        """How many offsets in [start, end) are handled."""
        below = max(0, min(end, self.offset(key)) - start)
        return below + sum(1 for o in self.above.get(key, ()) if max(start, self.offset(key)) <= o < end)

    def _advance(self, key: TopicPart) -> None:
        handled = self.above.get(key, set())
        offset = self.offset(key)
        while offset in handled:
            handled.discard(offset)
            offset += 1
        if handled or key in self.committed or offset:
            self.committed[key] = offset
