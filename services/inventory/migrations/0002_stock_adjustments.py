"""Stock added by hand, with who and why (tables.py: stock_adjustments).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 03:40:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('stock_adjustments',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('sku', sa.String(length=64), nullable=False),
    sa.Column('delta', sa.Integer(), nullable=False),
    sa.Column('available_after', sa.Integer(), nullable=False),
    sa.Column('reason', sa.String(length=200), nullable=False),
    sa.Column('operator', sa.String(length=100), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('adjusted_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_stock_adjustments_sku'), 'stock_adjustments', ['sku'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_stock_adjustments_sku'), table_name='stock_adjustments')
    op.drop_table('stock_adjustments')
