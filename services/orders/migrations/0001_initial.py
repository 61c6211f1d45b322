"""Initial schema of the orders database (tables.py plus the runtime's outbox).

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 12:17:30.776630

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
    op.create_table('orders',
    sa.Column('order_id', sa.String(length=36), nullable=False),
    sa.Column('customer_id', sa.String(length=64), nullable=False),
    sa.Column('customer_email', sa.String(length=320), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('lines', sa.JSON(), nullable=False),
    sa.Column('total', sa.Numeric(precision=18, scale=2), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('order_id')
    )
    runtime_tables_v1.create_outbox()



def downgrade() -> None:
    """Downgrade schema."""
    runtime_tables_v1.drop_outbox()
    op.drop_table('orders')
