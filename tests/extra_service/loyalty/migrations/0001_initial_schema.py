"""Initial schema of the loyalty database (tables.py plus the runtime's inbox and outbox).

Written by `orderpipe db revision loyalty -m "initial schema"`, then the inbox and outbox
replaced by the runtime's shared definitions, as in every service's first revision.

Revision ID: 0001
Revises:
Create Date: 2026-12-06 22:10:41.827244

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
    op.create_table('loyalty_points',
    sa.Column('customer_id', sa.String(length=64), nullable=False),
    sa.Column('points', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('customer_id')
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('loyalty_points')
    runtime_tables_v1.drop_outbox()
    runtime_tables_v1.drop_inbox()
