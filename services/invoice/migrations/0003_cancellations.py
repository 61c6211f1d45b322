"""Cancellation: credit notes with their own gapless numbers, and the orders compensated (cancelled_orders).

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
    op.create_table('credit_notes',
    sa.Column('number', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('order_id', sa.String(length=64), nullable=False),
    sa.Column('invoice_number', sa.Integer(), nullable=False),
    sa.Column('total', sa.Numeric(precision=18, scale=2), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('pdf_path', sa.String(length=512), nullable=False),
    sa.Column('issued_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('number'),
    sa.UniqueConstraint('order_id')
    )
    op.create_table('credit_note_counter',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('last_number', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('credit_note_counter')
    op.drop_table('credit_notes')
    cancelled_orders_v1.drop_cancelled_orders()
