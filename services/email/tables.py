from sqlalchemy import Column, DateTime, MetaData, String, Table

metadata = MetaData()

sent_emails = Table(
    "sent_emails", metadata,
    Column("order_id", String(64), primary_key=True),
    Column("message_id", String(255), nullable=False, unique=True),
    Column("recipient", String(320), nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=False),
)
