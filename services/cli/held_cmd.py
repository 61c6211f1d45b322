"""`orderpipe held`: keys whose later events wait for one in their group's retry chain or
dead-letter topic (ordered retries, services/runtime/held.py), read from each group's database,
and releasing a key by hand once its dead letter was purged.

Register with `app.add_typer(held_cmd.app, name="held")`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.cli.dlt_cmd import fail, ops_errors
from services.ops.errors import database_problem
from services.runtime.db import as_utc
from services.runtime.settings import Settings

app = typer.Typer(help="Keys held by ordered retries: list them, release one.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


def _groups(name: str | None) -> list[str]:
    """Every group's name, or the one asked for (an unknown one ends the command with the known ones)."""
    from services import registry
    from services.ops.deadletters import resolve_groups

    with ops_errors():
        return [g.name for g in resolve_groups(registry.GROUPS, name)]


@app.command("list")
def list_held(
    group: Annotated[str | None, typer.Option("--group", "-g", help="Only this consumer group.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Per group, every held key: its state (retrying, dead-lettered, releasing), the event it
    waits for, why, since when, and how many events wait behind it."""
    from sqlalchemy.exc import SQLAlchemyError

    from services.ops.held_keys import group_engine
    from services.runtime.held import HeldKeys

    rows = []
    for name in _groups(group):
        engine = group_engine(Settings(), name)
        if engine is None:
            continue  # the service never ran with this data folder: nothing is held
        try:
            rows += [{"group": name, **r} for r in HeldKeys.of_group(name).summary(engine)]
        except SQLAlchemyError as exc:  # not migrated yet, or unreachable: say so and go on
            reason = database_problem(exc)
            err.print(f"[yellow]{name}:[/] cannot read its held keys ({reason}); run `orderpipe db upgrade "
                      f"{name}` or check ORDERPIPE_{name.upper()}_DATABASE_URL", highlight=False, soft_wrap=True)
        finally:
            engine.dispose()
    if as_json:
        for r in rows:
            typer.echo(json.dumps({**r, "since": r["since"].isoformat()}))
        return
    if not rows:
        console.print("no key is held")
        return
    table = Table("group", "key", "state", "waiting", "held for", "head event", "why")
    now = datetime.now(UTC)
    for r in rows:
        since = as_utc(r["since"])
        table.add_row(r["group"], r["key"], r["state"], str(r["waiting"]), f"{(now - since).total_seconds():.0f} s",
                      r["head_event_id"], r["reason"][:120])
    console.print(table)


@app.command("release")
def release(
    group: Annotated[str, typer.Option("--group", "-g", help="The consumer group that holds the key.")],
    key: Annotated[str, typer.Option("--key", "--order-id", help="The held key (order id).")],
) -> None:
    """Let a held key go on: its waiting events run, in order, at the group's next check (a few
    seconds). For a key whose dead-lettered event was purged (`orderpipe dlt purge`); a replayed
    dead letter releases its key by itself when it succeeds."""
    from sqlalchemy.exc import SQLAlchemyError

    from services.ops.held_keys import group_engine
    from services.runtime.held import HeldKeys

    engine = group_engine(Settings(), _groups(group)[0])
    if engine is None:
        fail(f"group {group} has no database here (ORDERPIPE_{group.upper()}_DATABASE_URL or the data folder)")
    try:
        was = HeldKeys.of_group(group).release(engine, key)
    except SQLAlchemyError as exc:
        fail(f"cannot read group {group}'s held keys ({database_problem(exc)}); "
              f"run `orderpipe db upgrade {group}` or check ORDERPIPE_{group.upper()}_DATABASE_URL")
    finally:
        engine.dispose()
    if was is None:
        fail(f"group {group} holds no key {key!r} (`orderpipe held list --group {group}`)")
    console.print(f"{group}: key {key} released (it was {was}); its waiting events run next", highlight=False,
                  soft_wrap=True)
