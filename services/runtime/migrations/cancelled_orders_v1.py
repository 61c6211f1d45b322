"""`cancelled_orders` (services/runtime/cancellation.py), created by one revision in the history
of every consumer service that compensates cancelled orders. Frozen like runtime_tables_v1."""

import sqlalchemy as sa
from alembic import op


def create_cancelled_orders() -> None:
    op.create_table('cancelled_orders',
    sa.Column('order_id', sa.String(length=64), nullable=False),
    sa.Column('compensation', sa.String(length=500), nullable=False),
    sa.Column('document', sa.String(length=255), nullable=True),
    sa.Column('compensated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('order_id')
    )


def drop_cancelled_orders() -> None:
    op.drop_table('cancelled_orders')
