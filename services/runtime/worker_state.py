"""What a running consumer worker reports about itself, for the operators (`orderpipe workers`,
`orderpipe alerts`, the ops console): which partitions it has paused and why, its circuit
breaker's state and the alerts that are still open, in the `worker_state` table of its own
service database (one row per group and instance; services/ops/workers.py reads it).

Why a table in the service's database: the console and the CLI already read each group's
database (held keys), so this needs no new endpoint, port or discovery of the workers' addresses,
and it works the same for one process or many.

Cost: the loop only builds a small snapshot from what it holds in memory (`observe`, once per
poll, never per message); a thread of its own writes it, in its own short transaction, when it
changed (at most once per MIN_WRITE_GAP_S) and otherwise every HEARTBEAT_S as a heartbeat, so
neither a slow database nor a long batch holds the loop up or stops the heartbeat. A failed write
is logged (once, until it works again) and never stops processing. A clean stop deletes the row;
a row whose heartbeat is older than STALE_AFTER_S belongs to a worker that went away without
stopping (killed, its host gone) or cannot write, and is shown as stale; a live worker of the
group deletes such rows after FORGET_AFTER_S.

Open alerts are conditions true now, fed by the alerts themselves (`on_alert`, an Alerter
listener): the breaker is open (from `breaker_opened` until `breaker_closed`), or a message
failed its `alert_after_attempts`-th attempt or a later one and waits for its next attempt
(`retrying`, until that attempt is due plus RETRY_ALERT_GRACE_S, or it is dead-lettered; if the
attempt fails again, a new `retrying` alert opens it again with its first `since`). Keys held
behind a dead letter are not reported here: held_keys in the same database says so, also after
an operator released them, and the reader derives that alert from it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table, delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from services.runtime.alerts import BREAKER_CLOSED, BREAKER_OPENED, DEAD_LETTERED, RETRYING
from services.runtime.db import utcnow

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0          # the row is rewritten at least this often while the worker runs
MIN_WRITE_GAP_S = 1.0      # and at most once per this, however often its state changes
STALE_AFTER_S = 30.0       # a heartbeat older than this: the worker is gone, or cannot write
FORGET_AFTER_S = 3600.0    # a stale row this old is deleted by a live worker of the group
RETRY_ALERT_GRACE_S = 10.0  # a `retrying` alert stays open this long past its next attempt's due time
MAX_RETRYING_LISTED = 50   # more messages retrying than this: one alert says how many more

# Why a partition is paused (the reasons `ServiceConsumer` pauses for)
RETRY_NOT_DUE = "retry not due yet"
BREAKER_OPEN = "circuit breaker open"
RATE_LIMITED = "rate limit"
UNEXPLAINED = "paused"  # neither: not expected (the loop pauses for those reasons only), shown rather than hidden
_HOLD_ALL_REASONS = {"circuit breaker": BREAKER_OPEN, "rate limit": RATE_LIMITED}  # ServiceConsumer._admission's


@dataclass(frozen=True)
class PausedPartition:
    topic: str
    partition: int
    reason: str
    since: datetime
    until: datetime | None = None  # when it resumes, if known (a retry's due time)

    def as_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "reason": self.reason,
                "since": self.since.isoformat(), "until": self.until.isoformat() if self.until else None}


@dataclass(frozen=True)
class OpenAlert:
    kind: str
    since: datetime
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "since": self.since.isoformat(), "message": self.message}


@dataclass(frozen=True)
class Snapshot:
    breaker: str | None
    paused: tuple[PausedPartition, ...]
    alerts: tuple[OpenAlert, ...]


def pause_reasons(paused: Iterable[tuple[str, int]], not_due: Mapping[tuple[str, int], float],
                  holding_all: str) -> dict[tuple[str, int], tuple[str, float | None]]:
    """Each paused partition's reason, and its due time (on the loop's clock) when it waits for a
    retry. `holding_all`: why every partition is paused now (ServiceConsumer._admission's
    "circuit breaker" or "rate limit"), "" when nothing holds them all; that reason wins."""
    everything = _HOLD_ALL_REASONS.get(holding_all, holding_all)
    out = {}
    for tp in paused:
        if everything:
            out[tp] = (everything, None)
        elif tp in not_due:
            out[tp] = (RETRY_NOT_DUE, not_due[tp])
        else:
            out[tp] = (UNEXPLAINED, None)
    return out


def _at(clock_value: float) -> datetime:
    return datetime.fromtimestamp(clock_value, UTC)


class OpenAlerts:
    """The alert conditions open now, fed by the Alerter (`on_alert`, from the loop or a lane)."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock  # the loop's: due times are on it
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], tuple[OpenAlert, float | None]] = {}  # key -> (alert, expires at)

    def on_alert(self, kind: str, message: str, details: Mapping[str, Any]) -> None:
        now = utcnow()
        with self._lock:
            if kind == BREAKER_OPENED:
                self._keep_since(("breaker", ""), OpenAlert(kind, now, message), None)
            elif kind == BREAKER_CLOSED:
                self._open.pop(("breaker", ""), None)
            elif kind == RETRYING:
                due = float(details["due_at"]) if details.get("due_at") else self._clock()
                what = f"order {details.get('order_id')} (event {details.get('event_id')})"
                text = (f"{what}: attempt {details.get('attempt')} failed ({details.get('error')}); "
                        f"next attempt due {_at(due):%Y-%m-%d %H:%M:%S} UTC")
                self._keep_since((RETRYING, str(details.get("event_id") or what)), OpenAlert(kind, now, text),
                                 due + RETRY_ALERT_GRACE_S)
            elif kind == DEAD_LETTERED:  # it is no longer retrying: the dead letter is its own record
                self._open.pop((RETRYING, str(details.get("event_id"))), None)

    def _keep_since(self, key: tuple[str, str], alert: OpenAlert, expires: float | None) -> None:
        """Open it, or update its message and expiry; its `since` is when it first opened."""
        if key in self._open:
            alert = OpenAlert(alert.kind, self._open[key][0].since, alert.message)
        self._open[key] = (alert, expires)

    def current(self) -> tuple[OpenAlert, ...]:
        now = self._clock()
        with self._lock:
            for key in [k for k, (_, expires) in self._open.items() if expires is not None and expires <= now]:
                del self._open[key]
            alerts = sorted((alert for alert, _ in self._open.values()), key=lambda a: (a.since, a.kind, a.message))
        retrying = [a for a in alerts if a.kind == RETRYING]
        if len(retrying) > MAX_RETRYING_LISTED:  # the row stays small in an outage without a breaker
            more = retrying[MAX_RETRYING_LISTED:]
            alerts = [a for a in alerts if a.kind != RETRYING] + retrying[:MAX_RETRYING_LISTED] + [
                OpenAlert(RETRYING, more[0].since, f"and {len(more)} more messages retrying")]
        return tuple(alerts)


class WorkerState:
    """One worker's row in `worker_state`: `observe` from the loop, written by a thread of its own
    between `start` and `stop`."""

    def __init__(self, engine: Engine, table: Table, group: str, clock: Callable[[], float]):
        self.engine, self.table, self.group = engine, table, group
        self.host, self.pid = socket.gethostname()[:255], os.getpid()
        # new for every start: a restarted worker is a new row, the old one goes stale or was deleted
        self.instance = f"{self.host}:{self.pid}:{secrets.token_hex(3)}"[-128:]
        self.started_at = utcnow()
        self.clock = clock
        self.alerts = OpenAlerts(clock)
        self._since: dict[tuple[str, int, str], datetime] = {}  # (topic, partition, reason) -> paused since
        self._latest = Snapshot(None, (), ())
        self._written: Snapshot | None = None
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def on_alert(self, kind: str, message: str, details: Mapping[str, Any]) -> None:
        self.alerts.on_alert(kind, message, details)

    # -- the loop's side ----------------------------------------------------------------------

    def observe(self, paused: Iterable[tuple[str, int]], not_due: Mapping[tuple[str, int], float],
                holding_all: str, breaker: str | None) -> None:
        """The loop's state after a poll; cheap, and wakes the writer only when it changed."""
        now = utcnow()
        reasons = pause_reasons(paused, not_due, holding_all)
        since = {(t, p, reason): self._since.get((t, p, reason), now) for (t, p), (reason, _) in reasons.items()}
        self._since = since
        snapshot = Snapshot(breaker, tuple(sorted(
            (PausedPartition(t, p, reason, since[(t, p, reason)], _at(due) if due is not None else None)
             for (t, p), (reason, due) in reasons.items()), key=lambda x: (x.topic, x.partition))),
            self.alerts.current())
        if snapshot != self._latest:
            self._latest = snapshot
            self._changed.set()

    # -- the writer thread --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.group}-worker-state", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop writing and delete the row (a clean stop): the worker is no longer there."""
        self._stop.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(self.table).where(self.table.c.group_name == self.group,
                                                      self.table.c.instance == self.instance))
        except Exception as exc:  # it goes stale instead
            log.warning("could not delete this worker's state row", extra={"group": self.group, "error": repr(exc)})

    def _run(self) -> None:
        written_at = float("-inf")
        while not self._stop.is_set():
            self._changed.clear()  # before reading the snapshot: a change after this wakes the wait below
            elapsed = time.monotonic() - written_at
            changed = self._latest != self._written
            if elapsed >= HEARTBEAT_S or (changed and elapsed >= MIN_WRITE_GAP_S):
                self._write_now()
                written_at = time.monotonic()
                continue
            self._changed.wait(max(0.01, (MIN_WRITE_GAP_S if changed else HEARTBEAT_S) - elapsed))

    def _write_now(self) -> None:
        snapshot = self._latest
        try:
            self.write(snapshot, utcnow())
        except Exception as exc:
            if not self._failing:
                log.warning("could not write this worker's state; processing goes on, tried again at "
                            "each heartbeat", extra={"group": self.group, "error": repr(exc)})
            self._failing = True
        else:
            if self._failing:
                log.info("worker state written again", extra={"group": self.group})
            self._failing = False
        self._written = snapshot  # failed too: the next try is the heartbeat's (it writes the latest)

    def write(self, snapshot: Snapshot, now: datetime) -> None:
        """Upsert this worker's row and forget the group's rows stale for FORGET_AFTER_S."""
        t = self.table
        row = {"group_name": self.group, "instance": self.instance, "host": self.host, "pid": self.pid,
               "breaker": snapshot.breaker, "paused": [p.as_json() for p in snapshot.paused],
               "alerts": [a.as_json() for a in snapshot.alerts], "started_at": self.started_at, "updated_at": now}
        with self.engine.begin() as conn:
            dialect = {"sqlite": sqlite, "postgresql": postgresql}[conn.dialect.name]
            insert = dialect.insert(t).values(row)
            conn.execute(insert.on_conflict_do_update(
                index_elements=[t.c.group_name, t.c.instance],
                set_={c: insert.excluded[c] for c in ("breaker", "paused", "alerts", "updated_at")}))
            conn.execute(delete(t).where(t.c.group_name == self.group,
                                         t.c.updated_at < now - timedelta(seconds=FORGET_AFTER_S)))
