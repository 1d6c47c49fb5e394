"""server tasks canceled while running hold their slot until the worker stops them

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("server_tasks") as batch:
        batch.add_column(sa.Column("stop_requested_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("stopped_at", sa.Float(), nullable=True))
        batch.create_index(
            batch.f("ix_server_tasks_stop_requested_at"), ["stop_requested_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("server_tasks") as batch:
        batch.drop_index(batch.f("ix_server_tasks_stop_requested_at"))
        batch.drop_column("stopped_at")
        batch.drop_column("stop_requested_at")
