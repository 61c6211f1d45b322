from sqlalchemy import JSON, Column, Integer, MetaData, Numeric, String, Table

from services.runtime.cancellation import cancelled_orders_table

metadata = MetaData()

# The orders this service compensated after their cancellation (services/runtime/cancellation.py).
cancelled_orders = cancelled_orders_table(metadata)

per_minute = Table(
    "rollup_per_minute", metadata,
    Column("minute", String(16), primary_key=True),      # "2026-11-23T10:58" (UTC, order creation time)
    Column("currency", String(3), primary_key=True),
    Column("orders", Integer, nullable=False),
    Column("units", Integer, nullable=False),
    Column("revenue", Numeric(18, 2), nullable=False),
)

per_sku = Table(
    "rollup_per_sku", metadata,
    Column("sku", String(64), primary_key=True),
    Column("currency", String(3), primary_key=True),
    Column("orders", Integer, nullable=False),
    Column("units", Integer, nullable=False),
    Column("revenue", Numeric(18, 2), nullable=False),
)

# What each order added to the rollups, so a cancellation takes exactly that out again.
recorded_orders = Table(
    "recorded_orders", metadata,
    Column("order_id", String(64), primary_key=True),
    Column("minute", String(16), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("units", Integer, nullable=False),
    Column("revenue", Numeric(18, 2), nullable=False),
    Column("per_sku", JSON, nullable=False),  # {sku: [units, revenue as text]}
)
