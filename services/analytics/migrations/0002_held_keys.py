"""Ordered retries per key: the runtime's held_keys and held_events (runtime_tables_v2).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 04:00:00

"""
from typing import Sequence, Union

from services.runtime.migrations import runtime_tables_v2

# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    runtime_tables_v2.create_held()


def downgrade() -> None:
    runtime_tables_v2.drop_held()
