"""relays: a relays table, computers behind a relay, relay enrollment tokens (issue 11)

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "relays",
        sa.Column("id", _BigId, nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("url", sa.String(length=512), nullable=True),
        sa.Column("tickle_port", sa.Integer(), nullable=True),
        sa.Column("address", sa.String(length=64), nullable=True),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.BigInteger(), nullable=False),
        sa.Column("enrolled_at", sa.Float(), nullable=False),
        sa.Column("last_seen_at", sa.Float(), nullable=True),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_relays_tenant_id_tenants")
        ),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name=op.f("fk_relays_token_id_api_tokens")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_relays")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_relays_tenant_id_name")),
    )
    with op.batch_alter_table("computers") as batch:
        batch.add_column(sa.Column("relay_id", sa.BigInteger(), nullable=True))
        batch.create_foreign_key(
            batch.f("fk_computers_relay_id_relays"), "relays", ["relay_id"], ["id"]
        )
        batch.create_index(batch.f("ix_computers_relay_id"), ["relay_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("computers") as batch:
        batch.drop_index(batch.f("ix_computers_relay_id"))
        batch.drop_constraint(batch.f("fk_computers_relay_id_relays"), type_="foreignkey")
        batch.drop_column("relay_id")
    op.drop_table("relays")
