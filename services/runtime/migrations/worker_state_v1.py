"""`worker_state` (services/runtime/worker_state.py): what each running consumer worker reports
about itself (paused partitions, breaker, open alerts, heartbeat), created by one revision in
every consumer service's history. Frozen like runtime_tables_v1."""

import sqlalchemy as sa
from alembic import op


def create_worker_state() -> None:
    op.create_table('worker_state',
    sa.Column('group_name', sa.String(length=64), nullable=False),
    sa.Column('instance', sa.String(length=128), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('breaker', sa.String(length=16), nullable=True),
    sa.Column('paused', sa.JSON(), nullable=False),
    sa.Column('alerts', sa.JSON(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('group_name', 'instance')
    )


def drop_worker_state() -> None:
    op.drop_table('worker_state')
