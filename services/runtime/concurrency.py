"""Per-key lanes: how a batch is handled by N threads without breaking any order's sequence.

A batch is split by message key (the order id): all messages of one key go to the same lane, in
the order they were consumed, and a lane runs its messages one after the other. So two events
of one order never run at the same time or out of order, while different orders run in parallel
(what I/O-bound handlers such as SMTP sends need).

Lanes finish independently, and a lane can stop early (its database failed, or the circuit
breaker opened). Offsets may then only move over what is really done: per partition, up to the
first message that is not, and that message is where the partition is rewound to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Positioned(Protocol):
    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...
    def key(self) -> bytes | None: ...


def split_by_key(messages: Sequence[T], lanes: int, key: Callable[[T], object]) -> list[list[T]]:
    """At most `lanes` lists; each key's messages stay together and in order. Keys are dealt to
    the least loaded lane in order of first appearance, which spreads them evenly."""
    by_key: dict[object, list[T]] = {}
    for m in messages:
        by_key.setdefault(key(m), []).append(m)
    out: list[list[T]] = [[] for _ in range(max(1, min(lanes, len(by_key))))]
    for group in by_key.values():
        min(out, key=len).extend(group)
    return [lane for lane in out if lane]


def run_lanes(pool: ThreadPoolExecutor | None, lanes: list[list[T]], run: Callable[[list[T]], R]) -> list[R]:
    """Run each lane; in the pool when there is more than one, else on the calling thread."""
    if pool is None or len(lanes) <= 1:
        return [run(lane) for lane in lanes]
    return list(pool.map(run, lanes))


def done_prefix(batch: Iterable[Positioned], done: set[tuple[str, int, int]]
                ) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
    """Per partition of the batch: the offset to store (one past the contiguous done prefix) and
    the offset to rewind to (the first message not done). A partition appears in the first dict
    when its prefix is not empty, and in the second when something is left undone."""
    by_partition: dict[tuple[str, int], list[int]] = {}
    for m in batch:
        by_partition.setdefault((m.topic(), m.partition()), []).append(m.offset())
    store: dict[tuple[str, int], int] = {}
    rewind: dict[tuple[str, int], int] = {}
    for (topic, partition), offsets in by_partition.items():
        last_done = None
        for offset in sorted(offsets):
            if (topic, partition, offset) not in done:
                rewind[(topic, partition)] = offset
                break
            last_done = offset
        if last_done is not None:
            store[(topic, partition)] = last_done + 1
    return store, rewind
