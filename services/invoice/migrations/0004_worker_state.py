"""The ops console's worker state: the runtime's worker_state (worker_state_v1).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 10:00:00

"""
from typing import Sequence, Union

from services.runtime.migrations import worker_state_v1

# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    worker_state_v1.create_worker_state()


def downgrade() -> None:
    worker_state_v1.drop_worker_state()
