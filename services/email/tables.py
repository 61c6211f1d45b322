from sqlalchemy import Column, DateTime, MetaData, String, Table

from services.runtime.cancellation import cancelled_orders_table

metadata = MetaData()

# The orders this service compensated after their cancellation (services/runtime/cancellation.py).
cancelled_orders = cancelled_orders_table(metadata)

sent_emails = Table(
    "sent_emails", metadata,
    Column("order_id", String(64), primary_key=True),
    Column("message_id", String(255), nullable=False, unique=True),
    Column("recipient", String(320), nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=False),
)
