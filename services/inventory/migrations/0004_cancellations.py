"""Cancellation: the orders whose stock was released (cancelled_orders).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 07:30:00

"""
from typing import Sequence, Union

from services.runtime.migrations import cancelled_orders_v1

# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    cancelled_orders_v1.create_cancelled_orders()


def downgrade() -> None:
    cancelled_orders_v1.drop_cancelled_orders()
