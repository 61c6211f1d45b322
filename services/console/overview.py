"""What the overview page shows, read through the same code as the command line: the order-status
view (`orderpipe orders list`), consumer lag (`orderpipe lag`), held keys (`orderpipe held list`),
dead letters (`orderpipe dlt list`) and the alerts open now (`orderpipe alerts`). Each part is
read on its own: one that cannot be read (the broker away, a database not migrated) says why,
and the others still show."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from statistics import quantiles
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from services import registry
from services.ops.errors import OpsError, database_problem
from services.ops.workers import Alert, read_workers
from services.runtime.held import HeldKeys
from services.runtime.settings import Settings

ORDER_STATES = ("PENDING", "STALLED", "FAILED", "CANCELLED", "COMPLETED")


@dataclass
class Overview:
    states_now: dict[str, int] = field(default_factory=dict)
    last_hour: dict[str, Any] = field(default_factory=dict)  # changed, per state, completion rate, latency
    lag: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> input / retry / dead letters
    held: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> keys, events waiting, oldest
    dead_letters: list[tuple[str, str, int]] = field(default_factory=list)  # (group, exception type, count)
    alerts: list[Alert] = field(default_factory=list)  # open now, oldest first (services/ops/workers.py)
    problems: list[str] = field(default_factory=list)  # what could not be read, and why


def read_overview(settings: Settings, status, kafka_clients) -> Overview:
    """`status`: a StatusClient; `kafka_clients()`: a context manager giving (OpsKafka, AuditLog)."""
    view = Overview()
    _orders(view, status)
    _held(view, settings)
    _alerts(view, settings)
    try:
        with kafka_clients() as (kafka, audit):
            _lag(view, kafka, audit)
            _dead_letters(view, kafka, audit)
    except OpsError as exc:
        view.problems.append(f"Kafka: {exc}")
    return view


def _orders(view: Overview, status) -> None:
    from services.orders.api import StatusUnavailable

    try:
        view.states_now = {state: status.list(state=state, limit=1)["count"] for state in ORDER_STATES}
        recent = status.list(since="1h", limit=100_000)["statuses"]
    except (StatusUnavailable, ValueError) as exc:
        view.problems.append(f"order-status view: {exc}")
        return
    per_state = Counter(s["state"] for s in recent)
    finished = [s for s in recent if s["state"] in ("COMPLETED", "FAILED", "CANCELLED")]
    seconds = sorted((datetime.fromisoformat(s["updated_at"]) - datetime.fromisoformat(s["created_at"])).total_seconds()
                     for s in recent if s["state"] == "COMPLETED")
    view.last_hour = {
        "changed": len(recent), "per_state": dict(per_state),
        "completion_rate": (per_state["COMPLETED"] / len(finished)) if finished else None,
        "p50_s": seconds[len(seconds) // 2] if seconds else None,
        "p95_s": quantiles(seconds, n=20)[-1] if len(seconds) >= 2 else (seconds[0] if seconds else None),
    }


def _held(view: Overview, settings: Settings) -> None:
    from services.ops.held_keys import group_engine

    for group in registry.GROUPS:
        engine = group_engine(settings, group.name)
        if engine is None:
            continue
        try:
            rows = HeldKeys.of_group(group.name).summary(engine)
        except SQLAlchemyError as exc:
            view.problems.append(f"{group.name}'s held keys: {database_problem(exc)}")
            continue
        finally:
            engine.dispose()
        if rows:
            view.held[group.name] = {"keys": len(rows), "waiting": sum(r["waiting"] for r in rows),
                                     "oldest": min(r["since"] for r in rows)}


def _alerts(view: Overview, settings: Settings) -> None:
    workers = read_workers(settings, [g.name for g in registry.GROUPS])
    view.alerts = workers.alerts
    view.problems += [f"open alerts: {p}" for p in workers.problems]


def _lag(view: Overview, kafka, audit) -> None:
    from services.ops.lag import StreamGroup, consumer_lag, lag_groups

    groups = lag_groups()
    rows = consumer_lag(kafka, audit, groups)
    for g in groups:
        mine = [r for r in rows if r.owner == g.name]
        if isinstance(g, StreamGroup):
            view.lag[g.name] = {"input": sum(r.lag for r in mine), "retry": 0, "dead letters": 0}
        else:
            view.lag[g.name] = {kind: sum(r.lag for r in mine if r.kind == kind)
                                for kind in ("input", "retry", "dead letters")}


def _dead_letters(view: Overview, kafka, audit) -> None:
    from services.ops.reprocess import collect, selection

    snap = collect(kafka, audit, selection())
    counts = Counter((dl.group, dl.exception_type) for dl, _ in snap.letters)
    view.dead_letters = [(g, exc, n) for (g, exc), n in sorted(counts.items())]
