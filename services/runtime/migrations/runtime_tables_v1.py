"""The runtime's inbox and outbox tables as every service's first migration creates them.

Every service database has its own Alembic history (services/*/migrations), and each one's
0001 creates these two tables (the orders service only the outbox: it consumes nothing).
Frozen like any migration: the functions describe version 1 and never change. A later change
to services/runtime/inbox.py or outbox.py's tables is a `runtime_tables_v2` module here plus a
new revision in each service that calls it, so every history stays replayable.
"""

import sqlalchemy as sa
from alembic import op


def create_inbox() -> None:
    op.create_table('inbox',
    sa.Column('group_name', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('event_type', sa.String(length=128), nullable=False),
    sa.Column('topic', sa.String(length=249), nullable=False),
    sa.Column('partition', sa.Integer(), nullable=False),
    sa.Column('offset', sa.BigInteger(), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('group_name', 'event_id')
    )


def drop_inbox() -> None:
    op.drop_table('inbox')


def create_outbox() -> None:
    op.create_table('outbox',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('aggregatetype', sa.String(length=64), nullable=False),
    sa.Column('aggregateid', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=128), nullable=False),
    sa.Column('topic', sa.String(length=249), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.Column('headers', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id')
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbox_published_at'), ['published_at'], unique=False)


def drop_outbox() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_published_at'))
    op.drop_table('outbox')
