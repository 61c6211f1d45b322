from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table

from services.runtime.cancellation import cancelled_orders_table
from services.runtime.db import outbox_table

metadata = MetaData()

# The orders this service compensated after their cancellation (services/runtime/cancellation.py).
cancelled_orders = cancelled_orders_table(metadata)

stock = Table(
    "stock", metadata,
    Column("sku", String(64), primary_key=True),
    Column("available", Integer, nullable=False),   # units that can still be reserved
    Column("reserved", Integer, nullable=False, default=0),
)

reservations = Table(
    "reservations", metadata,
    Column("order_id", String(64), primary_key=True),
    Column("sku", String(64), primary_key=True),
    Column("quantity", Integer, nullable=False),
    Column("reserved_at", DateTime(timezone=True), nullable=False),
)

# The runtime's outbox (runtime_tables_v1, in 0001_initial), declared here rather than added by
# the runtime so that `orderpipe stock add` (adjust.py) writes its StockAdjusted to the very table
# the inventory process's relay publishes: `Service` and `service_metadata` reuse this one.
outbox = outbox_table(metadata)

# Every change of stock made by hand (`orderpipe stock add`), who and why: the audit trail.
stock_adjustments = Table(
    "stock_adjustments", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sku", String(64), nullable=False, index=True),
    Column("delta", Integer, nullable=False),
    Column("available_after", Integer, nullable=False),
    Column("reason", String(200), nullable=False),
    Column("operator", String(100), nullable=False),
    Column("host", String(255), nullable=False),
    Column("adjusted_at", DateTime(timezone=True), nullable=False),
)
