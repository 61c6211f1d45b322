"""What the running consumer workers report (services/runtime/worker_state.py), and the alerts
open now, read from each group's own database: the one reader of `orderpipe workers`,
`orderpipe alerts` and the ops console (overview and consumer-groups page).

Open alerts come from three places, all in the group's database:
- each live worker's row: its breaker open, messages retrying past the alert threshold;
- held_keys: a key held behind a dead-lettered event (`key_held`), as long as it is held, also
  when no worker runs;
- a stale row (no heartbeat for STALE_AFTER_S): `worker_stale`. What a stale row last reported
  may no longer be true, so its alerts are not listed as open; its paused partitions are shown,
  marked stale.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import MetaData, select
from sqlalchemy.exc import SQLAlchemyError

from services.ops.errors import database_problem
from services.runtime.alerts import KEY_HELD
from services.runtime.db import as_utc, utcnow, worker_state_table
from services.runtime.held import DEAD_LETTERED, HeldKeys
from services.runtime.settings import Settings
from services.runtime.worker_state import STALE_AFTER_S

WORKER_STALE = "worker_stale"  # no runtime alert: the reader's, for a row whose heartbeat stopped
STALE = "stale (worker gone?)"
LIVE = "live"


def _aware(value: datetime | str) -> datetime:
    return as_utc(datetime.fromisoformat(value) if isinstance(value, str) else value)


@dataclass(frozen=True)
class Paused:
    group: str
    topic: str
    partition: int
    reason: str
    since: datetime
    until: datetime | None
    worker: str  # "host pid N"
    status: str  # LIVE or STALE

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "since": self.since.isoformat(), "until": self.until.isoformat() if self.until else None}


@dataclass(frozen=True)
class Alert:
    group: str
    kind: str
    since: datetime
    message: str
    worker: str | None  # None: not a worker's (a held key)

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "since": self.since.isoformat()}


@dataclass(frozen=True)
class Worker:
    group: str
    instance: str
    host: str
    pid: int
    breaker: str | None
    started_at: datetime
    updated_at: datetime
    status: str  # LIVE or STALE
    paused: tuple[Paused, ...]

    @property
    def name(self) -> str:
        return f"{self.host} pid {self.pid}"

    def as_json(self) -> dict[str, Any]:
        return {"group": self.group, "instance": self.instance, "host": self.host, "pid": self.pid,
                "breaker": self.breaker, "status": self.status, "started_at": self.started_at.isoformat(),
                "updated_at": self.updated_at.isoformat(), "paused": [p.as_json() for p in self.paused]}


@dataclass
class Workers:
    workers: list[Worker] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)  # oldest first
    problems: list[str] = field(default_factory=list)  # a group's database that could not be read, and why
    reported: set[str] = field(default_factory=set)  # the groups whose database was read

    def paused(self, group: str) -> list[Paused]:
        return [p for w in self.workers if w.group == group for p in w.paused]

    def alerts_per_kind(self) -> dict[str, int]:
        return dict(sorted(Counter(a.kind for a in self.alerts).items()))


def read_workers(settings: Settings, groups: list[str], now: datetime | None = None) -> Workers:
    """The workers of `groups` (consumer groups of the consumer runtime) and the alerts open now."""
    from services.ops.held_keys import group_engine

    now = now or utcnow()
    table = worker_state_table(MetaData())
    out = Workers()
    for group in groups:
        engine = group_engine(settings, group)
        if engine is None:
            continue  # the service never ran with this data folder: no worker, nothing held
        try:
            with engine.connect() as conn:
                rows = conn.execute(select(table).where(table.c.group_name == group)
                                    .order_by(table.c.started_at, table.c.instance)).mappings().all()
            held = HeldKeys.of_group(group).summary(engine)
        except SQLAlchemyError as exc:  # not migrated yet, or unreachable: say so, read the others
            out.problems.append(f"{group}: cannot read its worker state ({database_problem(exc)}); run "
                                f"`orderpipe db upgrade {group}` or check ORDERPIPE_{group.upper()}_DATABASE_URL")
            continue
        finally:
            engine.dispose()
        out.reported.add(group)
        for row in rows:
            worker = _worker(row, now)
            out.workers.append(worker)
            if worker.status == STALE:
                age = (now - worker.updated_at).total_seconds()
                out.alerts.append(Alert(group, WORKER_STALE, worker.updated_at, (
                    f"{worker.name}: no heartbeat for {age:.0f} s (limit {STALE_AFTER_S:g} s): {STALE}; it last "
                    f"reported breaker {worker.breaker or 'none'}, {len(worker.paused)} paused partition(s)"),
                    worker.name))
                continue
            out.alerts += [Alert(group, a["kind"], _aware(a["since"]), a["message"], worker.name) for a in row["alerts"]]
        out.alerts += [Alert(group, KEY_HELD, _aware(h["since"]), (
            f"key {h['key']}: {h['waiting']} event(s) wait behind its dead-lettered event {h['head_event_id']}; "
            "replay that dead letter, or purge it (which releases the key)"), None)
            for h in held if h["state"] == DEAD_LETTERED]
    out.alerts.sort(key=lambda a: (a.since, a.group, a.kind))
    return out


def _worker(row, now: datetime) -> Worker:
    updated = _aware(row["updated_at"])
    status = STALE if (now - updated).total_seconds() > STALE_AFTER_S else LIVE
    name = f"{row['host']} pid {row['pid']}"
    paused = tuple(Paused(row["group_name"], p["topic"], p["partition"], p["reason"], _aware(p["since"]),
                          _aware(p["until"]) if p.get("until") else None, name, status) for p in row["paused"])
    return Worker(row["group_name"], row["instance"], row["host"], row["pid"], row["breaker"],
                  _aware(row["started_at"]), updated, status, paused)
