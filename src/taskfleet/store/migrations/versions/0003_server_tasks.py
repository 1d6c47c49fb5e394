"""server tasks and workers (SPEC 4)

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "server_tasks",
        sa.Column("activity_id", sa.BigInteger(), nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("scope_tenant", sa.BigInteger(), nullable=True),
        sa.Column("group_name", sa.String(length=64), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("dedupe_key", sa.String(length=64), nullable=False),
        sa.Column("not_before", sa.Float(), nullable=True),
        sa.Column("dispatched_at", sa.Float(), nullable=True),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("claimed_at", sa.Float(), nullable=True),
        sa.Column("retry_of", sa.BigInteger(), nullable=True),
        sa.Column("command_line", sa.Text(), nullable=True),
        sa.Column("submitted_by", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["activity_id"], ["activities.id"], name=op.f("fk_server_tasks_activity_id_activities")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_server_tasks_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("activity_id", name=op.f("pk_server_tasks")),
    )
    with op.batch_alter_table("server_tasks") as batch:
        batch.create_index(batch.f("ix_server_tasks_dedupe_key"), ["dedupe_key"], unique=False)
        batch.create_index(batch.f("ix_server_tasks_claimed_by"), ["claimed_by"], unique=False)
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("queue", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("running", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )


def downgrade() -> None:
    op.drop_table("workers")
    with op.batch_alter_table("server_tasks") as batch:
        batch.drop_index(batch.f("ix_server_tasks_claimed_by"))
        batch.drop_index(batch.f("ix_server_tasks_dedupe_key"))
    op.drop_table("server_tasks")
