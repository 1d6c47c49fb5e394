"""audit: source address, outcome and object of every entry (issue 14)

Revision ID: 0012
Revises: 0011
"""

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the audit work


def downgrade() -> None:
    pass
