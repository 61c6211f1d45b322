"""Reading, replaying and purging dead letters.

`collect` reads the selected dead-letter topics up to the end offsets seen when it starts
(messages dead-lettered meanwhile wait for the next run). `plan_replay`/`plan_purge` decide per
message; `Reprocessor.execute` carries a plan out in batches. Per batch:

1. produce the copies (replay: to the group's first retry topic, due now, so only that group
   sees them; or to the original topic; parked: to the parking topic) and wait for the acks;
2. mark the acknowledged ones handled: an audit record with their offsets and the new
   committed offsets, acknowledged too;
3. commit the `orderpipe-dlt` offsets (a mirror of 2, for standard tools).

So progress is recorded only for copies the broker has; an interrupted run resumes where it
stopped, and an unacknowledged copy is never counted as done. A kill -9 between 1 and 2 (a few
milliseconds) can make the next run replay that batch again: the copies keep their event id,
so the group's inbox turns the second one into a no-op (no second e-mail, no double stock).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from services.ops.audit import AuditLog, Run
from services.ops.broker import OPS_GROUP, OpsKafka, TopicPart, read_one, scan, watermarks
from services.ops.deadletters import (H_PARKED_AT, H_REPLAY_COUNT, H_REPLAY_OF, H_REPLAY_RUN, DeadLetter, DltTopic,
                                      Filter, Ref, dlt_topics, find_dlt_topic, parse_time, resolve_groups)
from services.ops.errors import OpsError
from services.ops.handled import HandledState
from services.runtime import failure_headers as fh

REPLAY_TO = ("retry", "original")


@dataclass(frozen=True)
class Selection:
    targets: list[DltTopic]
    filter: Filter = field(default_factory=Filter)
    include_handled: bool = False
    limit: int | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"groups": sorted({t.group.name for t in self.targets}),
                               "topics": [t.name for t in self.targets], "filter": self.filter.describe()}
        if self.include_handled:
            out["include_handled"] = True
        if self.limit is not None:
            out["limit"] = self.limit
        return out


@dataclass
class Snapshot:
    """The selected dead letters as of the start, with what is already handled."""

    letters: list[tuple[DeadLetter, bool]]  # (dead letter, handled), in read order
    state: HandledState
    ends: dict[TopicPart, int]
    # offsets the read skipped between messages (transaction markers, aborted or compacted
    # records): nothing to handle there, so a committed offset may move over them
    gaps: dict[TopicPart, list[int]]
    skipped_handled: int = 0
    unselected: int = 0
    truncated: bool = False  # stopped at the limit

    def unhandled_count(self, key: TopicPart, low: int) -> int:
        return self.ends[key] - low - self.state.handled_between(key, low, self.ends[key])


def load_state(kafka: OpsKafka, audit: AuditLog, parts: Iterable[TopicPart],
               records: list[dict] | None = None, metadata: dict | None = None) -> HandledState:
    parts = list(parts)
    records = audit.read(metadata) if records is None else records
    return HandledState.load(kafka.committed(OPS_GROUP, parts), records)


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min))?\s*$")


def parse_rate(text: str | None) -> float | None:
    """`50/s` or `300/min` as messages per second (`--rate` of `orderpipe dlt`, the console's rate)."""
    if text is None:
        return None
    m = _RATE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise OpsError(f"bad rate {text!r}: use N/s or N/min, e.g. 50/s")
    return float(m.group(1)) / (60.0 if m.group(2) in ("m", "min") else 1.0)


def selection(group: str | None = None, source: str | None = None, since: str | None = None,
              until: str | None = None, exception: str | None = None, key: str | None = None,
              event_type: str | None = None, include_handled: bool = False, limit: int | None = None) -> Selection:
    """The dead letters an operator means, from the filters of `orderpipe dlt` (and the console's)."""
    from services import registry

    groups = resolve_groups(registry.GROUPS, group)
    targets = dlt_topics(groups, source)
    if not targets:
        inputs = sorted({s for g in groups for s in g.inputs})
        raise OpsError(f"no dead-letter topic for input topic {source!r}"
                       + (f" in group {group!r}" if group else "") + f"; inputs: {', '.join(inputs)}")
    flt = Filter(since=parse_time(since) if since else None, until=parse_time(until) if until else None,
                 exception_type=exception, key=key, event_type=event_type)
    return Selection(targets, flt, include_handled, limit)


def collect(kafka: OpsKafka, audit: AuditLog, selection: Selection) -> Snapshot:
    metadata = kafka.topics()
    audit.check(metadata)
    parts = [(t.name, p) for t in selection.targets for p in kafka.partitions(t.name, metadata)]
    by_name = {t.name: t for t in selection.targets}
    state = load_state(kafka, audit, parts, metadata=metadata)
    consumer = kafka.consumer()
    marks = watermarks(consumer, parts, kafka.timeout)
    ranges = {}
    for key, (low, end) in marks.items():
        state.raise_floor(key, low)
        ranges[key] = (low if selection.include_handled else max(low, state.offset(key)), end)
    snap = Snapshot([], state, {k: end for k, (_, end) in marks.items()}, {})
    previous = {key: start - 1 for key, (start, _) in ranges.items()}
    for msg in scan(consumer, ranges):
        key = (msg.topic(), msg.partition())
        if msg.offset() > previous[key] + 1:
            snap.gaps.setdefault(key, []).extend(range(previous[key] + 1, msg.offset()))
        previous[key] = msg.offset()
        dl = DeadLetter.from_message(msg, by_name[msg.topic()])
        handled = state.is_handled(key, msg.offset())
        if handled and not selection.include_handled:
            snap.skipped_handled += 1
            continue
        if not selection.filter.matches(dl):
            snap.unselected += 1
            continue
        snap.letters.append((dl, handled))
        if selection.limit is not None and len(snap.letters) >= selection.limit:
            snap.truncated = True
            break
    # Offsets after a partition's last message are left alone: on a transactional topic they
    # could belong to a transaction still open; the next run finds them between messages.
    return snap


def read_dead_letter(kafka: OpsKafka, audit: AuditLog, where: Ref) -> tuple[DeadLetter, DltTopic | None, bool | None]:
    """The message at `where` (what `orderpipe dlt show` reads): the dead letter, its group's
    dead-letter topic (None: not a known one) and whether it is handled (None: unknown)."""
    from services import registry
    from services.runtime import topology

    metadata = kafka.topics()
    partitions = kafka.partitions(where.topic, metadata)
    if where.partition not in partitions:
        raise OpsError(f"topic {where.topic} has no partition {where.partition} "
                       f"(it has {len(partitions)}: 0..{len(partitions) - 1})")
    consumer = kafka.consumer()
    [(low, end)] = watermarks(consumer, [(where.topic, where.partition)], kafka.timeout).values()
    if not low <= where.offset < end:
        raise OpsError(f"no message at {where}: partition {where.partition} holds offsets "
                       + (f"{low}..{end - 1}" if end > low else "none"))
    msg = read_one(consumer, where.topic, where.partition, where.offset, kafka.timeout)
    if msg is None:
        raise OpsError(f"no message at {where} (past the end, or already deleted by retention)")
    dlt = find_dlt_topic(registry.GROUPS, where.topic)
    handled = None
    if dlt is not None and audit.topic in metadata:
        state = load_state(kafka, audit, [(where.topic, where.partition)], audit.read(metadata))
        handled = state.is_handled((where.topic, where.partition), where.offset)
    dl = DeadLetter.from_message(msg, dlt or DltTopic(topology.ConsumerGroup("?", ()), where.topic))
    return dl, dlt, handled


# -- plans ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    dead_letter: DeadLetter
    action: str  # "replay" | "park" | "purge"
    destination: str | None = None


@dataclass
class Plan:
    action: str  # "replay" | "purge"
    selection: Selection
    snapshot: Snapshot
    items: list[Item]
    options: dict[str, Any] = field(default_factory=dict)

    def destinations(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.items:
            if item.destination:
                out[item.destination] = out.get(item.destination, 0) + 1
        return out

    def left_alone(self) -> list[str]:
        """What the selection skipped and why, as the dry run says it ("3 already handled")."""
        out = []
        if self.snapshot.skipped_handled:
            out.append(f"{self.snapshot.skipped_handled} already handled")
        if self.snapshot.unselected:
            out.append(f"{self.snapshot.unselected} not matching the filter")
        return out

    def moves(self) -> list[tuple[str, int, str]]:
        """(what, how many, destination) per destination: the plan's action, or "park" for the
        too often replayed ones sent to the parking topic."""
        parked = {i.destination for i in self.items if i.action == "park"}
        return [("park" if destination in parked else self.action, n, destination)
                for destination, n in self.destinations().items()]


def plan_replay(snapshot: Snapshot, selection: Selection, *, to: str = "retry",
                max_replays: int | None = 3) -> Plan:
    if to not in REPLAY_TO:
        raise OpsError(f"--to must be one of: {', '.join(REPLAY_TO)}")
    items = []
    for dl, _ in snapshot.letters:
        if max_replays is not None and dl.replay_count >= max_replays:
            items.append(Item(dl, "park", dl.topic.parking_topic))
        else:
            items.append(Item(dl, "replay", dl.topic.retry_topic if to == "retry" else dl.source))
    return Plan("replay", selection, snapshot, items, {"to": to, "max_replays": max_replays})


def plan_purge(snapshot: Snapshot, selection: Selection) -> Plan:
    return Plan("purge", selection, snapshot, [Item(dl, "purge") for dl, _ in snapshot.letters])


def copy_headers(item: Item, run_id: str, now: float) -> list[tuple[str, bytes]]:
    """Key, value and the envelope (event id, ...) travel unchanged; the runtime's headers are
    adjusted for where the copy goes, and the replay headers are added."""
    dl = item.dead_letter
    if item.action == "park":
        return [*dl.headers, (H_PARKED_AT, f"{now:.3f}".encode()), (H_REPLAY_RUN, run_id.encode())]
    replay = [(H_REPLAY_OF, str(dl.ref).encode()), (H_REPLAY_COUNT, str(dl.replay_count + 1).encode()),
              (H_REPLAY_RUN, run_id.encode())]
    if item.destination == dl.topic.retry_topic:
        # Into the first retry tier, as if the first attempt had just failed: due now, and on a
        # new failure it goes on to the next tier and, after the last, back to the dead letters.
        dropped = {fh.H_ATTEMPT, fh.H_DUE_AT, fh.H_REASON, H_REPLAY_OF, H_REPLAY_COUNT, H_REPLAY_RUN}
        kept = [(k, v) for k, v in dl.headers if k not in dropped]
        if not dl.header(fh.H_ORIGINAL_TOPIC):
            kept.append((fh.H_ORIGINAL_TOPIC, dl.source.encode()))
        return [*kept, (fh.H_ATTEMPT, b"1"), (fh.H_DUE_AT, f"{now:.3f}".encode()), *replay]
    # To the original topic: a fresh delivery for every group, so no runtime headers at all.
    return [*((k, v) for k, v in dl.headers if not k.startswith("x-")), *replay]


# -- carrying a plan out ----------------------------------------------------------------------


@dataclass
class Outcome:
    run: Run
    outcome: str  # completed | interrupted | failed: ...

    @property
    def ok(self) -> bool:
        return self.outcome == "completed"


class Reprocessor:
    def __init__(self, kafka: OpsKafka, audit: AuditLog, *, batch_size: int = 200,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 wall_clock: Callable[[], float] = time.time, user: str | None = None,
                 source: str | None = None):
        """`user`/`source`: who the audit records name, when not the OS user of a CLI run
        (the ops console passes its logged-in user and "console")."""
        self.kafka = kafka
        self.who: dict[str, str] = {k: v for k, v in (("user", user), ("source", source)) if v}
        self.audit = audit
        self.batch_size = batch_size
        self.clock, self.sleep, self.wall_clock = clock, sleep, wall_clock

    def check_destinations(self, plan: Plan) -> None:
        metadata = self.kafka.topics()
        for topic in plan.destinations():
            self.kafka.partitions(topic, metadata)

    def execute(self, plan: Plan, *, rate: float | None = None, stop: Callable[[], bool] = lambda: False,
                on_batch: Callable[[Run], None] | None = None) -> Outcome:
        self.check_destinations(plan)
        selection = {**plan.selection.describe(), **plan.options}
        if rate:
            selection["rate_per_s"] = rate
        run = Run(plan.action, selection, planned=len(plan.items), **self.who)
        consumer = self.kafka.consumer(OPS_GROUP)  # commits for the group; never subscribes
        self.audit.write(run.record("started"))
        outcome = "completed"
        batch_size = max(1, min(self.batch_size, int(rate))) if rate else self.batch_size
        gaps_left = dict(plan.snapshot.gaps)
        started, sent = self.clock(), 0
        try:
            for i in range(0, len(plan.items), batch_size):
                if stop():
                    outcome = "interrupted"
                    break
                batch = plan.items[i:i + batch_size]
                done, failure, interrupted = self._send(batch, run.run_id, rate, started, sent, stop)
                sent += len(batch)
                self._record(plan, run, consumer, done, gaps_left)
                if on_batch:
                    on_batch(run)
                if failure:
                    outcome = f"failed: {failure}"
                    break
                if interrupted:
                    outcome = "interrupted"
                    break
        except BaseException as exc:
            outcome = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {exc}"
            self._final(run, outcome)
            if isinstance(exc, (KeyboardInterrupt, OpsError)):
                raise
            raise OpsError(f"{plan.action} failed after {run.count} message(s): {exc}") from None
        self._final(run, outcome)
        return Outcome(run, outcome)

    def _send(self, batch: list[Item], run_id: str, rate: float | None, started: float, sent: int,
              stop: Callable[[], bool]) -> tuple[list[Item], str | None, bool]:
        """Produce the batch's copies and wait for the acks; return the acknowledged items."""
        if all(item.action == "purge" for item in batch):
            return batch, None, False
        producer = self.kafka.producer()
        results: dict[int, Any] = {}
        produced: list[Item] = []
        interrupted = False
        for n, item in enumerate(batch):
            if rate and not self._wait_turn(started + (sent + n) / rate, stop):
                interrupted = True
                break
            if n and stop():
                interrupted = True
                break
            dl = item.dead_letter
            kwargs = {} if dl.key is not None else {"partition": dl.ref.partition}
            producer.produce(item.destination, key=dl.key, value=dl.value,
                             headers=copy_headers(item, run_id, self.wall_clock()),
                             on_delivery=lambda err, _msg, n=n: results.__setitem__(n, err), **kwargs)
            produced.append(item)
            producer.poll(0)
        producer.flush(self.kafka.timeout)
        done = [item for n, item in enumerate(produced) if n in results and results[n] is None]
        failed = [results.get(n) for n in range(len(produced)) if results.get(n, "unacked") is not None]
        failure = None
        if failed:
            first = failed[0]
            failure = (f"{len(failed)} copies not acknowledged by the broker "
                       f"({first.str() if hasattr(first, 'str') else 'no acknowledgement'})")
        return done, failure, interrupted

    def _wait_turn(self, due: float, stop: Callable[[], bool]) -> bool:
        while (left := due - self.clock()) > 0:
            if stop():
                return False
            self.sleep(min(left, 0.2))
        return True

    def _record(self, plan: Plan, run: Run, consumer, done: list[Item], gaps_left: dict[TopicPart, list[int]]) -> None:
        state = plan.snapshot.state
        handled: dict[TopicPart, list[int]] = {}
        for item in done:
            ref = item.dead_letter.ref
            key = (ref.topic, ref.partition)
            handled.setdefault(key, []).append(ref.offset)
            run.add(ref, parked=item.action == "park")
        for key in list(handled):
            handled[key] += gaps_left.pop(key, [])
        for key, offsets in handled.items():
            state.mark(key, offsets)
        committed = {key: state.offset(key) for key in handled}
        self.audit.write(run.record("running", handled=handled, committed=committed))
        try:
            self.kafka.commit(consumer, committed)
        except Exception:  # the audit record above is the source of truth; this is a mirror
            pass

    def _final(self, run: Run, outcome: str) -> None:
        try:
            self.audit.write(run.record(outcome))
        except OpsError:
            if outcome == "completed":
                raise
