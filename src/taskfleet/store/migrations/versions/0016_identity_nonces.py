"""computers: the rotating identity nonce and the clone flag (issue 15)

Revision ID: 0016
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0013"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("identity_confirmed", sa.String(length=64)),
    ("identity_confirmed_at", sa.Float()),
    ("identity_previous", sa.String(length=64)),
    ("identity_offered", sa.String(length=64)),
    ("identity_offered_at", sa.Float()),
    ("identity_superseded", sa.JSON()),
    ("identity_conflict_at", sa.Float()),
    ("identity_conflict_reason", sa.String(length=500)),
)


def upgrade() -> None:
    with op.batch_alter_table("computers") as batch:
        for name, type_ in _COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("computers") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
