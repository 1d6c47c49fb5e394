"""jobs: content by hash, jobs (a request's job part), job steps (issue 12)

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "content",
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_content_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", "sha256", name=op.f("pk_content")),
    )
    op.create_table(
        "jobs",
        sa.Column("request_id", sa.BigInteger(), nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("terminate_by", sa.String(length=64), nullable=True),
        sa.Column("terminate_at", sa.Float(), nullable=True),
        sa.Column("terminate_reason", sa.String(length=2000), nullable=True),
        sa.Column("terminate_deadline", sa.Float(), nullable=True),
        sa.Column("terminated_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"], ["requests.id"], name=op.f("fk_jobs_request_id_requests")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_jobs_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_jobs")),
    )
    op.create_table(
        "job_steps",
        sa.Column("activity_id", sa.BigInteger(), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("item", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.BigInteger(), nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.String(length=2000), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["activity_id"], ["activities.id"], name=op.f("fk_job_steps_activity_id_activities")
        ),
        sa.ForeignKeyConstraint(
            ["request_id"], ["requests.id"], name=op.f("fk_job_steps_request_id_requests")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_job_steps_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("activity_id", "phase", "item", name=op.f("pk_job_steps")),
    )
    op.create_index("ix_job_steps_request_id", "job_steps", ["request_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_job_steps_request_id", table_name="job_steps")
    op.drop_table("job_steps")
    op.drop_table("jobs")
    op.drop_table("content")
