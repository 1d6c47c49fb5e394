"""inventory: computer_inventory and computer_packages (issue 13)

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "computer_inventory",
        sa.Column("computer_id", sa.BigInteger(), nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("os_id", sa.String(length=64), nullable=True),
        sa.Column("os_version", sa.String(length=64), nullable=True),
        sa.Column("os_name", sa.String(length=256), nullable=True),
        sa.Column("kernel", sa.String(length=256), nullable=True),
        sa.Column("sections", sa.JSON(), nullable=False),
        sa.Column("digest", sa.String(length=32), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("problem", sa.String(length=2000), nullable=True),
        sa.ForeignKeyConstraint(
            ["computer_id"],
            ["computers.id"],
            name=op.f("fk_computer_inventory_computer_id_computers"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_computer_inventory_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("computer_id", name=op.f("pk_computer_inventory")),
    )
    op.create_index(
        op.f("ix_computer_inventory_tenant_id_os_id_os_version"),
        "computer_inventory",
        ["tenant_id", "os_id", "os_version"],
    )
    op.create_table(
        "computer_packages",
        sa.Column("computer_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("arch", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.String(length=256), nullable=True),
        sa.Column("held", sa.Boolean(), nullable=False),
        sa.Column("upgrade_version", sa.String(length=256), nullable=True),
        sa.Column("security", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["computer_id"],
            ["computers.id"],
            name=op.f("fk_computer_packages_computer_id_computers"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_computer_packages_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("computer_id", "name", "arch", name=op.f("pk_computer_packages")),
    )
    op.create_index(
        op.f("ix_computer_packages_tenant_id_name"), "computer_packages", ["tenant_id", "name"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_computer_packages_tenant_id_name"), table_name="computer_packages")
    op.drop_table("computer_packages")
    op.drop_index(
        op.f("ix_computer_inventory_tenant_id_os_id_os_version"), table_name="computer_inventory"
    )
    op.drop_table("computer_inventory")
