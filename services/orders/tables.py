from sqlalchemy import JSON, Column, DateTime, MetaData, Numeric, String, Table

from services.runtime.db import outbox_table

metadata = MetaData()

orders = Table(
    "orders", metadata,
    Column("order_id", String(36), primary_key=True),
    Column("customer_id", String(64), nullable=False),
    Column("customer_email", String(320), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("lines", JSON, nullable=False),
    Column("total", Numeric(18, 2), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

outbox = outbox_table(metadata)
