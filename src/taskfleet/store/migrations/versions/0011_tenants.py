"""tenants: disable, super-admin, password accounts (issue 14)

Revision ID: 0011
Revises: 0010
"""

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the tenants work


def downgrade() -> None:
    pass
