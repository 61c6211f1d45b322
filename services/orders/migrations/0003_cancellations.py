"""Cancelled orders (tables.py: cancellations).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 07:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('cancellations',
    sa.Column('order_id', sa.String(length=36), nullable=False),
    sa.Column('reason', sa.String(length=200), nullable=True),
    sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('order_id')
    )


def downgrade() -> None:
    op.drop_table('cancellations')
