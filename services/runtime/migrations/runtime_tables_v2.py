"""The runtime's tables for ordered retries per key (services/runtime/held.py): `held_keys` and
`held_events`, created by one revision in every consumer service's history. Frozen like
runtime_tables_v1."""

import sqlalchemy as sa
from alembic import op


def create_held() -> None:
    op.create_table('held_keys',
    sa.Column('group_name', sa.String(length=64), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('head_event_id', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=500), nullable=False),
    sa.Column('topic', sa.String(length=249), nullable=False),
    sa.Column('partition', sa.Integer(), nullable=False),
    sa.Column('since', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('group_name', 'key')
    )
    op.create_table('held_events',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('group_name', sa.String(length=64), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('topic', sa.String(length=249), nullable=False),
    sa.Column('partition', sa.Integer(), nullable=False),
    sa.Column('offset', sa.BigInteger(), nullable=False),
    sa.Column('timestamp_ms', sa.BigInteger(), nullable=False),
    sa.Column('value', sa.LargeBinary(), nullable=True),
    sa.Column('headers', sa.JSON(), nullable=False),
    sa.Column('held_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('copy_sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('group_name', 'event_id', name='uq_held_events_group_event')
    )
    op.create_index('ix_held_events_group_key_seq', 'held_events', ['group_name', 'key', 'seq'], unique=False)


def drop_held() -> None:
    op.drop_index('ix_held_events_group_key_seq', table_name='held_events')
    op.drop_table('held_events')
    op.drop_table('held_keys')
