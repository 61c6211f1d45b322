"""`orderpipe workers` and `orderpipe alerts`: what the running consumer workers report (paused
partitions and why, breaker state, heartbeat) and the alerts open now, read from each group's
database through services/ops/workers.py, as the ops console reads them.

Register with `app.add_typer(workers_cmd.app)` (no name: both join the top level).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.cli.dlt_cmd import ops_errors
from services.runtime.settings import Settings

app = typer.Typer()
console = Console()
err = Console(stderr=True)

GroupOption = Annotated[str | None, typer.Option("--group", "-g", help="Only this consumer group.")]
AsJson = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]


def _read(group: str | None):
    from services import registry
    from services.ops.deadletters import resolve_groups
    from services.ops.workers import read_workers

    with ops_errors():  # an unknown group ends the command with the known ones
        names = [g.name for g in resolve_groups(registry.GROUPS, group)]
    view = read_workers(Settings(), names)
    for problem in view.problems:
        err.print(f"[yellow]{problem}[/]", highlight=False, soft_wrap=True)
    return view


def _ago(when: datetime) -> str:
    return f"{(datetime.now(UTC) - when).total_seconds():.0f} s ago"


@app.command("workers")
def workers(group: GroupOption = None, as_json: AsJson = False) -> None:
    """The running consumer workers per group (one row each, from its own database): host and pid,
    live or stale (no heartbeat for 30 s: worker gone?), circuit breaker state, and each paused
    partition with why (retry not due yet, circuit breaker open, rate limit) and since when."""
    view = _read(group)
    if as_json:
        for w in view.workers:
            typer.echo(json.dumps(w.as_json()))
        return
    if not view.workers:
        console.print("no worker reports its state (none running, or not upgraded: `orderpipe db upgrade`)")
        return
    table = Table("group", "worker", "status", "breaker", "heartbeat", "paused partitions")
    for w in view.workers:
        paused = "\n".join(f"{p.topic}[{p.partition}]: {p.reason}"
                           + (f" until {p.until:%H:%M:%S}" if p.until else "") for p in w.paused) or "-"
        table.add_row(w.group, w.name, w.status, w.breaker or "none", _ago(w.updated_at), paused)
    console.print(table)


@app.command("alerts")
def alerts(group: GroupOption = None, as_json: AsJson = False) -> None:
    """The alerts open now, per group: a circuit breaker open, messages retrying past the alert
    threshold (ALERT_AFTER_ATTEMPTS), keys held behind a dead-lettered event, workers whose
    heartbeat stopped. Unhandled dead letters are listed by `orderpipe dlt list`."""
    view = _read(group)
    if as_json:
        for a in view.alerts:
            typer.echo(json.dumps(a.as_json()))
        return
    if not view.alerts:
        console.print("no open alert")
        return
    table = Table("group", "kind", "since", "worker", "what")
    for a in view.alerts:
        table.add_row(a.group, a.kind, f"{a.since:%Y-%m-%d %H:%M:%S}", a.worker or "-", a.message)
    console.print(table)
    console.print(", ".join(f"{n} {kind}" for kind, n in view.alerts_per_kind().items()), highlight=False)
