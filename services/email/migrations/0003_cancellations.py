"""Cancellation: the orders whose cancellation mail was sent (cancelled_orders).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 07:30:00

"""
from typing import Sequence, Union

from services.runtime.migrations import cancelled_orders_v1

# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    cancelled_orders_v1.create_cancelled_orders()


def downgrade() -> None:
    cancelled_orders_v1.drop_cancelled_orders()
