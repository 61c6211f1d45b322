"""`orderpipe stock`: what inventory has, and putting stock in by hand (audited in inventory's
own database and published as StockAdjusted through inventory's outbox: services/inventory/adjust.py).

Register with `app.add_typer(stock_cmd.app, name="stock")`.
"""

from __future__ import annotations

import json
import socket
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.cli.dlt_cmd import fail
from services.runtime.settings import Settings

app = typer.Typer(help="Inventory's stock: list it, put stock in (every change audited).", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

Sku = Annotated[str | None, typer.Option("--sku", help="Only this SKU.")]
AsJson = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]


def _inventory_engine():
    """Inventory's database, migrated as its process migrates it (or checked, when
    ORDERPIPE_DB_UPGRADE_ON_START=false)."""
    from sqlalchemy.exc import SQLAlchemyError

    from services import registry
    from services.runtime.db import make_engine
    from services.runtime.migrate import prepare_database

    settings = Settings()
    engine = make_engine(settings.database_url("inventory"))
    try:
        prepare_database(engine, registry.service("inventory"), settings.db_upgrade_on_start)
    except SQLAlchemyError as exc:
        fail(f"inventory's database is not usable ({type(exc).__name__}: {str(exc.orig or exc)[:200]}); "
              "check ORDERPIPE_INVENTORY_DATABASE_URL")
    return engine


def _stock_adjusted_codec():
    """The codec inventory's process encodes with (codec_from_settings: SCHEMA_REGISTRY_URL or the
    embedded registry), with StockAdjusted's schema registered already: a registry that refuses
    the login or does not answer ends the command here, before anything changes."""
    from services.runtime.codec import RegistryRefused, codec_from_settings, without_userinfo
    from services.runtime.events import StockAdjusted

    settings = Settings()
    try:
        codec = codec_from_settings(settings)
        codec.registry.version(StockAdjusted.event_type(), StockAdjusted.schema_version)
    except RegistryRefused as exc:
        fail(f"{exc}; nothing was changed")
    except Exception as exc:  # noqa: BLE001 - unreachable, a timeout, an error answer: one line, no traceback
        fail(f"the Schema Registry at {without_userinfo(settings.schema_registry_url or '')} did not register "
             f"StockAdjusted ({type(exc).__name__}); nothing was changed; check SCHEMA_REGISTRY_URL")
    return codec


def _is_sku(text: str) -> bool:
    """What POST /orders accepts as a SKU (services/orders/model.py: Sku), so stock put in can be ordered."""
    from pydantic import TypeAdapter, ValidationError

    from services.orders.model import Sku

    try:
        TypeAdapter(Sku).validate_python(text)
    except ValidationError:
        return False
    return True


@app.command("add")
def add(
    sku: Annotated[str, typer.Argument(help="The SKU, e.g. SKU-001 or one inventory has never seen.")],
    quantity: Annotated[int, typer.Argument(min=1, help="Units to add.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why, for the audit trail, e.g. 'delivery 4711'.")],
) -> None:
    """Put QUANTITY units of SKU into stock: available at once to new orders, recorded with who,
    from which host and why (`orderpipe stock history`), and published as StockAdjusted to
    stock.adjusted by inventory's outbox relay (while inventory is not running, it waits there)."""
    from services.inventory.adjust import MAX_ADD, add_stock
    from services.ops.audit import operator

    if not _is_sku(sku):
        fail(f"SKU {sku!r} is not one an order can name: 1 to 64 of A-Z a-z 0-9 . _ -")
    if quantity > MAX_ADD:
        fail(f"at most {MAX_ADD:,} units at a time")
    if not reason.strip() or len(reason) > 200:
        fail("--reason must say why, in 1 to 200 characters")
    codec = _stock_adjusted_codec()
    engine = _inventory_engine()
    try:
        done = add_stock(engine, sku, quantity, reason=reason.strip(), operator=operator()[:100],
                         host=socket.gethostname()[:255], codec=codec)
    finally:
        engine.dispose()
    console.print(f"{done.sku}: +{done.delta:,}, {done.available_after:,} available "
                  f"(recorded for {done.operator}: {done.reason!r}); StockAdjusted queued in inventory's outbox, "
                  "published to stock.adjusted by inventory's relay", highlight=False, soft_wrap=True)


@app.command("list")
def list_stock(sku: Sku = None, as_json: AsJson = False) -> None:
    """Every SKU inventory knows: units available to new orders and units reserved."""
    from services.inventory.adjust import stock_levels

    engine = _inventory_engine()
    try:
        rows = stock_levels(engine, sku)
    finally:
        engine.dispose()
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    if not rows:
        console.print(f"inventory knows no SKU {sku!r}" if sku else "inventory has no stock yet (its first start "
                      "seeds the catalog)")
        return
    table = Table("sku", "available", "reserved")
    for row in rows:
        table.add_row(row["sku"], f"{row['available']:,}", f"{row['reserved']:,}")
    console.print(table)


@app.command("history")
def history(sku: Sku = None, limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="The last N.")] = 50,
            as_json: AsJson = False) -> None:
    """Every change made with `orderpipe stock add`: when, who, from where, why, the level after."""
    from services.inventory.adjust import adjustments

    engine = _inventory_engine()
    try:
        rows = adjustments(engine, sku, limit)
    finally:
        engine.dispose()
    if as_json:
        for row in rows:
            typer.echo(json.dumps({**row, "adjusted_at": row["adjusted_at"].isoformat()}))
        return
    if not rows:
        console.print("no stock was added by hand" + (f" for {sku}" if sku else ""))
        return
    table = Table()
    table.add_column("when", no_wrap=True)
    for column in ("sku", "added", "available after", "who", "host", "why"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["adjusted_at"].isoformat(timespec="seconds"), row["sku"], f"+{row['delta']:,}",
                      f"{row['available_after']:,}", row["operator"], row["host"], row["reason"])
    console.print(table)
