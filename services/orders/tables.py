from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, Numeric, String, Table

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

# At most one per order: the primary key is what keeps a second cancel from cancelling twice.
cancellations = Table(
    "cancellations", metadata,
    Column("order_id", String(36), primary_key=True),
    Column("reason", String(200), nullable=True),
    Column("cancelled_at", DateTime(timezone=True), nullable=False),
)

# The first answer to each Idempotency-Key (services/orders/idempotency.py), kept until expires_at.
idempotency_keys = Table(
    "idempotency_keys", metadata,
    Column("operation", String(64), primary_key=True),  # e.g. "POST /orders"
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),  # sha256 of the validated request
    Column("status_code", Integer, nullable=False),
    Column("body", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
)

outbox = outbox_table(metadata)
