"""activity policy (mode, interval) and the agent's own status

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("policy", sa.JSON(), nullable=True))
    with op.batch_alter_table("activities") as batch:
        batch.add_column(sa.Column("agent_status", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("agent_attempt", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("runs", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("activities") as batch:
        batch.drop_column("runs")
        batch.drop_column("agent_attempt")
        batch.drop_column("agent_status")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("policy")
