"""audit: source address, outcome and object of every entry; append-only (issue 14)

Revision ID: 0012
Revises: 0011

The audit log is append-only in the database itself: triggers refuse every UPDATE
and DELETE of its rows (and TRUNCATE on PostgreSQL), whoever asks, so not even a
bug in the server can rewrite history (docs/audit.md says how an owner who truly
must prune it would do so).
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_MESSAGE = "audit_log is append-only: its rows cannot be changed or deleted"

_SQLITE_UP = [
    f"CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
    f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END",
    f"CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
    f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END",
]
_SQLITE_DOWN = [
    "DROP TRIGGER IF EXISTS audit_log_no_update",
    "DROP TRIGGER IF EXISTS audit_log_no_delete",
]
_PG_UP = [
    "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger "
    f"LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION '{_MESSAGE}'; END $$",
    "CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
    "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
]
_PG_DOWN = [
    "DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log",
    "DROP TRIGGER IF EXISTS audit_log_no_change ON audit_log",
    "DROP FUNCTION IF EXISTS audit_log_append_only()",
]


def _triggers(up: bool) -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    statements = (_SQLITE_UP if up else _SQLITE_DOWN) if sqlite else (_PG_UP if up else _PG_DOWN)
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("address", sa.String(length=64), nullable=True))
        batch.add_column(
            sa.Column("outcome", sa.String(length=16), nullable=False, server_default="ok")
        )
        batch.add_column(sa.Column("object", sa.String(length=128), nullable=True))
        batch.create_index(batch.f("ix_audit_log_tenant_id_at"), ["tenant_id", "at"])
    _triggers(up=True)


def downgrade() -> None:
    _triggers(up=False)
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_index(batch.f("ix_audit_log_tenant_id_at"))
        batch.drop_column("object")
        batch.drop_column("outcome")
        batch.drop_column("address")
