"""the full activity lifecycle: schedules, dependencies, approvals, rollouts, windows

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("not_before", sa.Float(), nullable=True))
        batch.add_column(sa.Column("depends_on", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("approval", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("rollout", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("schedule_id", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("activities") as batch:
        batch.add_column(sa.Column("not_before", sa.Float(), nullable=True))
        batch.add_column(sa.Column("wave", sa.Integer(), nullable=True))
    with op.batch_alter_table("groups") as batch:
        batch.add_column(sa.Column("window", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("utc_offset", sa.Integer(), nullable=True))
    with op.batch_alter_table("server_tasks") as batch:
        batch.add_column(sa.Column("hold", sa.JSON(), nullable=True))
    op.create_table(
        "schedules",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("cron", sa.String(length=128), nullable=False),
        sa.Column("template", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("next_at", sa.Float(), nullable=True),
        sa.Column("canceled_at", sa.Float(), nullable=True),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("last_request_id", sa.BigInteger(), nullable=True),
        sa.Column("last_error", sa.String(length=2000), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_schedules_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedules")),
    )


def downgrade() -> None:
    op.drop_table("schedules")
    with op.batch_alter_table("server_tasks") as batch:
        batch.drop_column("hold")
    with op.batch_alter_table("groups") as batch:
        batch.drop_column("utc_offset")
        batch.drop_column("window")
    with op.batch_alter_table("activities") as batch:
        batch.drop_column("wave")
        batch.drop_column("not_before")
    with op.batch_alter_table("requests") as batch:
        for col in ("schedule_id", "rollout", "approval", "depends_on", "not_before"):
            batch.drop_column(col)
