"""Chat: one assistant reply per task; agents declared in the database.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from agent_orchestrator.db.types import JsonColumn, UtcDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "uq_messages_assistant_reply",
        "messages",
        ["task_id"],
        unique=True,
        postgresql_where=sa.text("role = 'assistant'"),
        sqlite_where=sa.text("role = 'assistant'"),
    )
    op.create_table(
        "agents",
        sa.Column("tenant_id", sa.String(128), primary_key=True),
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("config", JsonColumn, nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("agents")
    op.drop_index("uq_messages_assistant_reply", table_name="messages")
