"""The inventory service, declared: it reserves stock for every order or rejects it whole, and
gives a cancelled order's stock back."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from services.inventory.catalog import CATALOG
from services.inventory.handlers import HANDLERS
from services.inventory.settings import InventorySettings
from services.inventory.tables import metadata, stock
from services.runtime.declaration import StatusStep, consumer_service
from services.runtime.events import StepCompensated, StockAdjusted, StockRejected, StockReserved
from services.runtime.handler import Service
from services.runtime.service_main import Runtime


def seed_stock(engine: Engine, levels: dict[str, int]) -> None:
    """Give an empty stock table its initial levels (a no-op once the table has rows).
    The table exists already: the process migrated its database before building the service."""
    with engine.begin() as conn:
        if conn.execute(select(func.count()).select_from(stock)).scalar_one() == 0:
            conn.execute(stock.insert(), [{"sku": sku, "available": qty, "reserved": 0} for sku, qty in levels.items()])


def build(runtime: Runtime) -> Service:
    initial_stock = runtime.settings.of(InventorySettings).initial_stock
    levels = {item.sku: (initial_stock if item.stocked else 0) for item in CATALOG}
    seed_stock(runtime.engine, levels)
    return Service(runtime.group, metadata, HANDLERS, batch_size=runtime.settings.consumer_batch_size)


SERVICE = consumer_service(
    "inventory", package_file=__file__, metadata=metadata, handlers=HANDLERS,
    # StockAdjusted: not from a handler but from `orderpipe stock add` (adjust.py), through this outbox.
    emits=(StockReserved, StockRejected, StepCompensated, StockAdjusted),
    build=build, settings=InventorySettings,
    # A rejected order fails as a whole: no step after it can make it succeed.
    step=StatusStep(done={"StockReserved": None}, failed={"StockRejected": "reason"}))
