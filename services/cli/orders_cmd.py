"""`orderpipe orders list`: orders by state and time, from the order-status view (every worker).

Register with `app.add_typer(orders_cmd.app, name="orders")`.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.runtime.settings import Settings

app = typer.Typer(help="Find orders by their status.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


@app.command("list")
def list_orders(
    state: Annotated[list[str] | None, typer.Option(
        "--state", "-s", help="PENDING, COMPLETED, FAILED, STALLED or CANCELLED; repeat or comma-separate for several.")] = None,
    since: Annotated[str | None, typer.Option(
        help="Only orders whose status changed since then: 30m, 1h, 2d or an ISO 8601 time.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="At most this many, newest first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List orders, e.g. every FAILED or STALLED one of the last hour:
    `orderpipe orders list --state FAILED,STALLED --since 1h`."""
    from services.orders.api import StatusClient, StatusUnavailable

    settings = Settings()
    try:
        answer = StatusClient(settings.status_url, timeout=30.0).list(
            state=",".join(state) if state else None, since=since, limit=limit)
    except ValueError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    except StatusUnavailable as exc:
        err.print(f"[bold red]error:[/] {exc} (set ORDERPIPE_STATUS_URL to the order-status view)")
        raise typer.Exit(1) from None
    statuses = answer["statuses"]
    if as_json:
        for status in statuses:
            print(json.dumps(status))
        return
    title = f"{answer['count']} order(s)" + (f", showing the newest {len(statuses)}" if len(statuses) < answer["count"] else "")
    table = Table("order", "state", "reason", "steps", "updated", title=title)
    for s in statuses:
        # a cancelled order's steps also say where their compensation stands (inventory:done/undo:done)
        steps = " ".join(f"{name}:{step['state']}" + (f"/undo:{step['compensation']}" if step.get("compensation") else "")
                         for name, step in s["steps"].items())
        table.add_row(s["order_id"], s["state"], s.get("reason") or "", steps, s["updated_at"])
    console.print(table)
