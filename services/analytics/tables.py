from sqlalchemy import Column, Integer, MetaData, Numeric, String, Table

metadata = MetaData()

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
