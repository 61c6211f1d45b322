from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table

metadata = MetaData()

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
