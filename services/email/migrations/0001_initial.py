"""Initial schema of the email database (tables.py plus the runtime's inbox and outbox).

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 12:17:30.863760

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

    op.create_table('sent_emails',
    sa.Column('order_id', sa.String(length=64), nullable=False),
    sa.Column('message_id', sa.String(length=255), nullable=False),
    sa.Column('recipient', sa.String(length=320), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('order_id'),
    sa.UniqueConstraint('message_id')
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('sent_emails')
    runtime_tables_v1.drop_outbox()
    runtime_tables_v1.drop_inbox()
