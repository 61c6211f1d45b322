"""Initial schema of the analytics database (tables.py plus the runtime's inbox and outbox).

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 12:17:30.954346

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

from services.runtime.migrations import runtime_tables_v1

# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    runtime_tables_v1.create_inbox()
    runtime_tables_v1.create_outbox()

    op.create_table('rollup_per_minute',
    sa.Column('minute', sa.String(length=16), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('orders', sa.Integer(), nullable=False),
    sa.Column('units', sa.Integer(), nullable=False),
    sa.Column('revenue', sa.Numeric(precision=18, scale=2), nullable=False),
    sa.PrimaryKeyConstraint('minute', 'currency')
    )
    op.create_table('rollup_per_sku',
    sa.Column('sku', sa.String(length=64), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('orders', sa.Integer(), nullable=False),
    sa.Column('units', sa.Integer(), nullable=False),
    sa.Column('revenue', sa.Numeric(precision=18, scale=2), nullable=False),
    sa.PrimaryKeyConstraint('sku', 'currency')
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('rollup_per_sku')
    op.drop_table('rollup_per_minute')
    runtime_tables_v1.drop_outbox()
    runtime_tables_v1.drop_inbox()
