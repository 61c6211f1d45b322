"""Cancellation: what each order added to the rollups (recorded_orders), so a cancellation takes exactly that out again, and the orders compensated (cancelled_orders).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 07:30:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

from services.runtime.migrations import cancelled_orders_v1

# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    cancelled_orders_v1.create_cancelled_orders()
    op.create_table('recorded_orders',
    sa.Column('order_id', sa.String(length=64), nullable=False),
    sa.Column('minute', sa.String(length=16), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('units', sa.Integer(), nullable=False),
    sa.Column('revenue', sa.Numeric(precision=18, scale=2), nullable=False),
    sa.Column('per_sku', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('order_id')
    )


def downgrade() -> None:
    op.drop_table('recorded_orders')
    cancelled_orders_v1.drop_cancelled_orders()
