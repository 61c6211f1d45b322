"""Initial schema of the invoice database (tables.py plus the runtime's inbox and outbox).

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 12:17:30.908369

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
    op.create_table('invoice_counter',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('last_number', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('invoice_orders',
    sa.Column('order_id', sa.String(length=64), nullable=False),
    sa.Column('order', sa.JSON(), nullable=True),
    sa.Column('stock', sa.String(length=16), nullable=True),
    sa.PrimaryKeyConstraint('order_id')
    )
    op.create_table('invoices',
    sa.Column('number', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('order_id', sa.String(length=64), nullable=False),
    sa.Column('total', sa.Numeric(precision=18, scale=2), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('pdf_path', sa.String(length=512), nullable=False),
    sa.Column('issued_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('number'),
    sa.UniqueConstraint('order_id')
    )
    runtime_tables_v1.create_outbox()



def downgrade() -> None:
    """Downgrade schema."""
    runtime_tables_v1.drop_outbox()
    op.drop_table('invoices')
    op.drop_table('invoice_orders')
    op.drop_table('invoice_counter')
    runtime_tables_v1.drop_inbox()
