"""`orderpipe db`: the services' schema migrations (Alembic, one history per service database).

Services upgrade their own database on start (unless ORDERPIPE_DB_UPGRADE_ON_START=false), so
these commands are for deployments that migrate as a separate step, and for developers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from services.runtime.declaration import ServiceDeclaration

from services.runtime.settings import Settings

app = typer.Typer(help="Schema migrations of the service databases (Alembic).", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

# The help names no services: listing them would import every service (and its libraries) on each
# `orderpipe` call; an unknown name lists them.
Target = Annotated[str, typer.Argument(help="A service, e.g. orders or inventory, or all.")]


def _services(target: str) -> list[ServiceDeclaration]:
    from services import registry

    if target == "all":
        return list(registry.SERVICES)
    try:
        return [registry.service(target)]
    except registry.UnknownService:
        names = ", ".join(s.name for s in registry.SERVICES)
        err.print(f"[bold red]error:[/] unknown service {target!r}; choose one of: {names}, all")
        raise typer.Exit(1) from None


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command()
def upgrade(
    target: Target = "all",
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Migrate the database of SERVICE (or of all services) to the latest revision."""
    from services.runtime.db import make_engine
    from services.runtime.migrate import current_revision, upgrade_database

    settings = Settings()
    for service in _services(target):
        url = settings.database_url(service.name)
        engine = make_engine(url)
        try:
            before = current_revision(engine)
            upgrade_database(engine, service, revision)
            after = current_revision(engine)
        except Exception as exc:
            err.print(f"[bold red]error:[/] {service.name} ({_redacted(url)}): {type(exc).__name__}: {exc}")
            raise typer.Exit(1) from None
        finally:
            engine.dispose()
        change = "up to date" if before == after else f"{before or 'empty'} -> {after}"
        console.print(f"{service.name:<10} {after}  ({change})  {_redacted(url)}")


@app.command()
def current(target: Target = "all") -> None:
    """Show each database's revision next to the latest one in the code."""
    from services.runtime.db import make_engine
    from services.runtime.migrate import current_revision, head_revision

    settings = Settings()
    table = Table("service", "database", "current", "head", "state")
    behind = False
    for service in _services(target):
        url = settings.database_url(service.name)
        engine = make_engine(url)
        try:
            now = current_revision(engine)
        except Exception as exc:
            now, state = None, f"unreachable: {type(exc).__name__}"
        else:
            state = "up to date" if now == head_revision(service) else "behind"
        finally:
            engine.dispose()
        behind |= state != "up to date"
        table.add_row(service.name, _redacted(url), now or "-", head_revision(service) or "-", state)
    console.print(table)
    raise typer.Exit(1 if behind else 0)


@app.command()
def revision(
    service: Annotated[str, typer.Argument(help="A service, e.g. inventory.")],
    message: Annotated[str, typer.Option("--message", "-m", help="What the revision changes.")],
    empty: Annotated[bool, typer.Option(help="Write an empty revision instead of autogenerating it.")] = False,
) -> None:
    """Write SERVICE's next revision from the difference between its tables.py and its migrations."""
    from services.runtime.migrate import NothingToGenerate, new_revision

    (declaration,) = _services(service)
    try:
        path = new_revision(declaration, message, autogenerate=not empty)
    except NothingToGenerate as exc:
        err.print(f"nothing to do: {exc}")
        raise typer.Exit(1) from None
    console.print(f"wrote {path}; review it, then run `make test` (the schema test checks it on SQLite and PostgreSQL)")
