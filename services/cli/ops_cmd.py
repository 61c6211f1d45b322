"""`orderpipe lag` and `orderpipe topics describe`: positions and counts read from the broker.

Register with `app.add_typer(ops_cmd.app)` (no name: `lag` joins the top level) and
`topics_app.command("describe")(ops_cmd.topics_describe)`.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.cli.dlt_cmd import clients, ops_errors

app = typer.Typer()
console = Console()

AsJson = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for the broker.")]


@app.command("lag")
def lag(
    group: Annotated[str | None, typer.Option("--group", "-g", help="Only this consumer group.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Also partitions that never held a message.")] = False,
    as_json: AsJson = False,
    timeout: Timeout = 10.0,
) -> None:
    """Consumer lag per group and partition: committed offset, end offset, lag (input, retry, dead letters).

    Every service group and the order-status worker's group (order-status). For a dead-letter
    topic the committed offset is the handled offset of orderpipe-dlt and the lag is the number
    of dead letters not yet replayed, parked or purged."""
    from services.ops.lag import StreamGroup, consumer_lag, lag_groups

    with ops_errors():
        groups = lag_groups(group)
        with clients(timeout) as (kafka, audit):
            rows = consumer_lag(kafka, audit, groups)
    shown = [r for r in rows if every or r.end > 0 or r.committed]
    if as_json:
        for r in shown:
            typer.echo(json.dumps(r.as_dict()))
        return
    table = Table("group", "topic", "part.", "committed", "end", "lag")
    for column in table.columns[2:]:
        column.justify = "right"
    for r in shown:
        table.add_row(r.group if r.kind != "dead letters" else f"{r.group} ({r.owner})", r.topic, str(r.partition),
                      "-" if r.committed is None else str(r.committed), str(r.end),
                      f"[bold red]{r.lag}[/]" if r.lag and r.kind == "dead letters" else str(r.lag))
    console.print(table)
    for g in groups:
        mine = [r for r in rows if r.owner == g.name]
        if isinstance(g, StreamGroup):
            console.print(f"{g.name}: lag {sum(r.lag for r in mine)} on input", highlight=False)
            continue
        console.print(f"{g.name}: lag {sum(r.lag for r in mine if r.kind == 'input')} on input, "
                      f"{sum(r.lag for r in mine if r.kind == 'retry')} in retry topics, "
                      f"{sum(r.lag for r in mine if r.kind == 'dead letters')} unhandled dead letters",
                      highlight=False)


def topics_describe(
    as_json: AsJson = False,
    timeout: Timeout = 10.0,
) -> None:
    """The declared topics as the broker has them: partitions and message counts."""
    from services.ops.lag import topic_counts
    from services import registry

    with ops_errors():
        with clients(timeout) as (kafka, _):
            counts = topic_counts(kafka, registry.all_topics())
    if as_json:
        for c in counts:
            typer.echo(json.dumps({"topic": c.spec.name, "declared_partitions": c.spec.partitions,
                                   "partitions": c.partitions, "messages": c.messages,
                                   "cleanup": c.spec.cleanup_policy, "writer": c.spec.writer}))
        return
    table = Table("topic", "partitions", "messages", "cleanup", "written by")
    for column in table.columns[1:3]:
        column.justify = "right"
    for c in counts:
        if not c.exists:
            parts, messages = f"[red]missing[/] ({c.spec.partitions})", "-"
        else:
            parts = str(c.partitions) if c.partitions == c.spec.partitions else \
                f"[yellow]{c.partitions}[/] (declared {c.spec.partitions})"
            messages = str(c.messages)
        table.add_row(c.spec.name, parts, messages, c.spec.cleanup_policy, c.spec.writer)
    console.print(table)
    missing = [c.spec.name for c in counts if not c.exists]
    if missing:
        console.print(f"{len(missing)} declared topic(s) missing: run `orderpipe topics create`", highlight=False)
    console.print("messages = retained offsets (end - start) summed over partitions; on compacted or "
                  "transactional topics offsets can outnumber messages", highlight=False)
