from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, Numeric, String, Table

from services.runtime.cancellation import cancelled_orders_table

metadata = MetaData()

# The orders this service compensated after their cancellation (services/runtime/cancellation.py).
cancelled_orders = cancelled_orders_table(metadata)

# Orders the invoice service has heard of, and what inventory decided for them. The invoice is
# issued when both the order and its StockReserved are here, whichever arrives first.
orders = Table(
    "invoice_orders", metadata,
    Column("order_id", String(64), primary_key=True),
    Column("order", JSON, nullable=True),             # OrderCreated as JSON, once seen
    Column("stock", String(16), nullable=True),       # None | "reserved" | "rejected"
)

invoices = Table(
    "invoices", metadata,
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("order_id", String(64), nullable=False, unique=True),
    Column("total", Numeric(18, 2), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("pdf_path", String(512), nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
)

# What cancelled orders were credited: numbered on their own, gapless like invoices.
credit_notes = Table(
    "credit_notes", metadata,
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("order_id", String(64), nullable=False, unique=True),
    Column("invoice_number", Integer, nullable=False),  # the invoice it credits
    Column("total", Numeric(18, 2), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("pdf_path", String(512), nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
)

# One row: the last credit note number issued (as invoice_counter, below, for invoices).
credit_note_counter = Table(
    "credit_note_counter", metadata,
    Column("id", Integer, primary_key=True),
    Column("last_number", Integer, nullable=False),
)

# One row: the last invoice number issued. Incremented in the issuing transaction, so a rolled
# back invoice gives its number back and the sequence stays gapless.
invoice_counter = Table(
    "invoice_counter", metadata,
    Column("id", Integer, primary_key=True),
    Column("last_number", Integer, nullable=False),
)
