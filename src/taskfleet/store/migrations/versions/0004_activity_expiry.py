"""queued work can expire (SPEC 9)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("activities") as batch:
        batch.add_column(sa.Column("expires_at", sa.Float(), nullable=True))
        batch.create_index(batch.f("ix_activities_state_expires_at"), ["state", "expires_at"])


def downgrade() -> None:
    with op.batch_alter_table("activities") as batch:
        batch.drop_index(batch.f("ix_activities_state_expires_at"))
        batch.drop_column("expires_at")
