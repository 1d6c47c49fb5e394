"""The database schema (SQLAlchemy Core). One schema, two engines: SQLite and PostgreSQL.

Every row belongs to a tenant. Migrations in ``store/migrations`` must produce
exactly this schema (tests/integration/test_migrations.py proves it).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)

# Python None stored as SQL NULL (not JSON null), so "IS NOT NULL" finds the set ones.
_JSON_OR_NULL = sa.JSON(none_as_null=True)

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite rowid aliasing

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    # A disabled tenant's tokens, accounts and enrollments are refused (docs/tenants.md).
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
)

server_secrets = sa.Table(
    "server_secrets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)

# The server processes on this database and the one that leads (server/cluster.py).
server_processes = sa.Table(
    "server_processes",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # random, per process start
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("stopped_at", sa.Float, nullable=True),
)

leadership = sa.Table(
    "leadership",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),  # "leader"
    sa.Column("holder", sa.String(32), nullable=False),  # server_processes.id
    sa.Column("epoch", sa.BigInteger, nullable=False),  # +1 at each change of leader
    sa.Column("since", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # admin | enroll | relay
    sa.Column("role", sa.String(16), nullable=True),  # viewer | operator | admin (admin kind)
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("uses_left", sa.Integer, nullable=True),  # enroll tokens: None = unlimited
    sa.Column("group_name", sa.String(64), nullable=True),  # enroll tokens: join this group
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
    # Manages tenants and may act in any of them (X-Taskfleet-Tenant); the bootstrap token.
    sa.Column("super_admin", sa.Boolean, nullable=False, default=False),
)

# Login accounts of the dashboard (docs/tenants.md): a name and an argon2id password hash.
accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("name", sa.String(64), nullable=False, unique=True),  # unique server-wide
    sa.Column("password_hash", sa.String(256), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),  # viewer | operator | admin
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_login_at", sa.Float, nullable=True),
)

# One-time login links (``taskfleet login-link``, the demo): the code's SHA-256, whose
# session it opens (an API token's or an account's), until when, and when it was used.
login_codes = sa.Table(
    "login_codes",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("code_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("token_id", sa.BigInteger, sa.ForeignKey("api_tokens.id"), nullable=True),
    sa.Column("account_id", sa.BigInteger, sa.ForeignKey("accounts.id"), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("used_at", sa.Float, nullable=True),
)

computers = sa.Table(
    "computers",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("machine_id", sa.String(128), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False, default=1),  # +1 per re-enrollment
    sa.Column("enrolled_at", sa.Float, nullable=False),
    sa.Column("last_seen_at", sa.Float, nullable=True),
    sa.Column("address", sa.String(64), nullable=True),
    sa.Column("tickle_port", sa.Integer, nullable=True),
    sa.Column("agent_version", sa.String(64), nullable=True),
    sa.Column("policy", sa.JSON, nullable=True),
    sa.Column("in_acked", sa.BigInteger, nullable=False, default=0),  # agent seq applied
    sa.Column("out_seq", sa.BigInteger, nullable=False, default=0),  # last server seq used
    sa.Column("out_acked", sa.BigInteger, nullable=False, default=0),  # server seq agent stored
    # Set when an administrator removed it: the row stays so that its history
    # (activities, events) still reads; enrolling the machine again clears it.
    sa.Column("removed_at", sa.Float, nullable=True),
    # The relay this computer is behind (issue 11): the relay's roster holds it and
    # the relay's entries for it are accepted; None: it talks to the server only.
    sa.Column("relay_id", sa.BigInteger, sa.ForeignKey("relays.id"), nullable=True),
    # The rotating identity nonce (issue 15, domain/identity.py): SHA-256 hashes of
    # the confirmed, the previous confirmed and the offered nonce ("*" confirmed: reset
    # by an administrator), superseded offers (a JSON list of hashes), and the flag
    # set when two agents use this computer's identity.
    sa.Column("identity_confirmed", sa.String(64), nullable=True),
    sa.Column("identity_confirmed_at", sa.Float, nullable=True),
    sa.Column("identity_previous", sa.String(64), nullable=True),
    sa.Column("identity_offered", sa.String(64), nullable=True),
    sa.Column("identity_offered_at", sa.Float, nullable=True),
    sa.Column("identity_superseded", sa.JSON, nullable=True),
    sa.Column("identity_conflict_at", sa.Float, nullable=True),
    sa.Column("identity_conflict_reason", sa.String(500), nullable=True),
    sa.UniqueConstraint("tenant_id", "machine_id"),
    sa.Index(None, "relay_id"),
)

# Relays (issue 11, docs/relays.md): a process near its computers that speaks the
# agent exchange to them and one multiplexed relay exchange to the server.
relays = sa.Table(
    "relays",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),  # SHA-256 of the relay's secret
    sa.Column("url", sa.String(512), nullable=True),  # advertised to agents
    sa.Column("tickle_port", sa.Integer, nullable=True),  # UDP: server -> relay wake-ups
    sa.Column("address", sa.String(64), nullable=True),  # where the server last heard it
    sa.Column("generation", sa.Integer, nullable=False, default=1),  # +1 per re-enrollment
    # The relay enrollment token it enrolled with: revoking it revokes the relay.
    sa.Column("token_id", sa.BigInteger, sa.ForeignKey("api_tokens.id"), nullable=False),
    sa.Column("enrolled_at", sa.Float, nullable=False),
    sa.Column("last_seen_at", sa.Float, nullable=True),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("version", sa.String(64), nullable=True),  # the relay's software version
    sa.UniqueConstraint("tenant_id", "name"),
)

groups = sa.Table(
    "groups",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    # Maintenance window (SPEC 9): client work for members is handed out only inside it.
    sa.Column("window", sa.String(16), nullable=True),  # HH:MM-HH:MM, local time
    sa.Column("utc_offset", sa.Integer, nullable=True),  # minutes east of UTC
    sa.UniqueConstraint("tenant_id", "name"),
)

group_members = sa.Table(
    "group_members",
    metadata,
    sa.Column("group_id", sa.BigInteger, sa.ForeignKey("groups.id"), primary_key=True),
    sa.Column("computer_id", sa.BigInteger, sa.ForeignKey("computers.id"), primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Index(None, "computer_id"),
)

computer_tags = sa.Table(
    "computer_tags",
    metadata,
    sa.Column("computer_id", sa.BigInteger, sa.ForeignKey("computers.id"), primary_key=True),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Index(None, "tenant_id", "key", "value"),
)

requests = sa.Table(
    "requests",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("target", sa.String(512), nullable=False),
    sa.Column("created_by", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("timeout", sa.Float, nullable=False),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("policy", sa.JSON, nullable=True),  # mode, interval, every (domain/policy.py)
    # The lifecycle (SPEC 2.1, 7, 9); see server/lifecycle/.
    sa.Column("not_before", sa.Float, nullable=True),  # Scheduled: not earlier than
    sa.Column("depends_on", _JSON_OR_NULL, nullable=True),  # {kind, on, metric, percent}
    sa.Column("approval", _JSON_OR_NULL, nullable=True),  # {separation, expires_at, decision, ...}
    sa.Column("rollout", _JSON_OR_NULL, nullable=True),  # {canary, size|share, success, ...}
    sa.Column("schedule_id", sa.BigInteger, nullable=True),  # fired by this cron schedule
)

activities = sa.Table(
    "activities",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("request_id", sa.BigInteger, sa.ForeignKey("requests.id"), nullable=True),
    sa.Column("computer_id", sa.BigInteger, sa.ForeignKey("computers.id"), nullable=True),
    sa.Column("kind", sa.String(8), nullable=False),  # client | server
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float, nullable=True),
    sa.Column("deadline_at", sa.Float, nullable=True),  # lost after this without a result
    sa.Column(
        "expires_at", sa.Float, nullable=True
    ),  # Queued work not handed out by then: Canceled
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("reason", sa.String(2000), nullable=True),  # why it is in its state
    sa.Column("exit_code", sa.Integer, nullable=True),
    sa.Column("result_line", sa.String(2000), nullable=True),
    sa.Column("stdout", sa.Text, nullable=True),
    sa.Column("stderr", sa.Text, nullable=True),
    sa.Column("stdout_dropped", sa.Integer, nullable=True),
    sa.Column("stderr_dropped", sa.Integer, nullable=True),
    sa.Column("agent_started_at", sa.Float, nullable=True),
    sa.Column("agent_ended_at", sa.Float, nullable=True),
    sa.Column("agent_report", sa.JSON, nullable=True),  # a report that changed no state
    sa.Column("agent_status", sa.String(16), nullable=True),  # working | deferred (agent says)
    sa.Column("agent_attempt", sa.Integer, nullable=True),
    sa.Column("runs", sa.Integer, nullable=True),  # recurring: runs reported so far
    sa.Column("not_before", sa.Float, nullable=True),  # not handed out before this time
    sa.Column("wave", sa.Integer, nullable=True),  # rollout wave (0 = first)
    sa.Index(None, "computer_id", "state"),
    sa.Index(None, "request_id", "state"),
    sa.Index(None, "state", "deadline_at"),
    sa.Index(None, "state", "expires_at"),
)

activity_events = sa.Table(
    "activity_events",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("activity_id", sa.BigInteger, sa.ForeignKey("activities.id"), nullable=False),
    sa.Column("from_state", sa.String(16), nullable=True),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("cause", sa.String(32), nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("reason", sa.String(2000), nullable=False, default=""),
    sa.Index(None, "activity_id"),
)

# Recurring work (SPEC "cron schedules"): each firing creates its own request.
schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("cron", sa.String(128), nullable=False),  # 5 fields, UTC
    sa.Column("template", sa.JSON, nullable=False),  # the request body each run uses
    sa.Column("created_by", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("next_at", sa.Float, nullable=True),  # None once canceled
    sa.Column("canceled_at", sa.Float, nullable=True),
    sa.Column("runs", sa.Integer, nullable=False, default=0),
    sa.Column("last_request_id", sa.BigInteger, nullable=True),
    sa.Column("last_error", sa.String(2000), nullable=True),
)

# Server -> agent messages not yet acknowledged by the agent (SPEC 3.1 resend).
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("computer_id", sa.BigInteger, sa.ForeignKey("computers.id"), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("message", sa.Text, nullable=False),  # the JSON text sent as is
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    # Issue 14 (docs/audit.md): the caller's address (none for internal actors such as
    # schedules and computers), "ok" | "refused" | "failed", what it acted on
    # ("request:12"). Rows are append-only: triggers (migration 0012) refuse changes.
    sa.Column("address", sa.String(64), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False, server_default="ok"),
    sa.Column("object", sa.String(128), nullable=True),
    sa.Index(None, "tenant_id", "at"),
)

# Server tasks (SPEC 4): the activity row holds the state; this row the rest.
server_tasks = sa.Table(
    "server_tasks",
    metadata,
    sa.Column("activity_id", sa.BigInteger, sa.ForeignKey("activities.id"), primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("scope_tenant", sa.BigInteger, nullable=True),  # the tenant it works on
    sa.Column("group_name", sa.String(64), nullable=True),  # the group it works on
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("dedupe_key", sa.String(64), nullable=False),  # type, tenant, group, params
    sa.Column("not_before", sa.Float, nullable=True),
    sa.Column("dispatched_at", sa.Float, nullable=True),
    sa.Column("claimed_by", sa.String(64), nullable=True),  # worker id
    sa.Column("claimed_at", sa.Float, nullable=True),
    sa.Column("retry_of", sa.BigInteger, nullable=True),
    sa.Column("command_line", sa.Text, nullable=True),
    sa.Column("submitted_by", sa.String(64), nullable=False),
    # Blocked/Waiting (issue 5): {"approval": {...}, "after": {"task": ID, "metric": ...}}
    sa.Column("hold", _JSON_OR_NULL, nullable=True),
    # Canceled while In Progress (issue 9): its type slot stays held from the
    # cancel (stop_requested_at) until its worker confirms the handler stopped,
    # or the worker is lost (stopped_at).
    sa.Column("stop_requested_at", sa.Float, nullable=True),
    sa.Column("stopped_at", sa.Float, nullable=True),
    sa.Index(None, "dedupe_key"),
    sa.Index(None, "claimed_by"),
    # Few rows have it set: the reaper and restarts find held tasks without a scan.
    sa.Index(None, "stop_requested_at"),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("queue", sa.String(255), nullable=False),  # embedded | amqp host/queue (no secrets)
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # idle | busy | stopped | lost
    sa.Column("running", sa.JSON, nullable=False),  # task ids it holds
)

# -- multi-phase jobs (issue 12, SPEC 6) ------------------------------------------

# Content addressed by SHA-256: the bytes live on disk under the server's data folder
# (server/content.py), the database holds only what describes them.
content = sa.Table(
    "content",
    metadata,
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("sha256", sa.String(64), primary_key=True),  # lowercase hex
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("name", sa.String(255), nullable=False),  # as added (a label, not a path)
    sa.Column("created_by", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# A job is a request of type "job" (it takes part in targets, approvals, windows,
# rollouts, expiry, cancel and audit like any request); this row holds what only a
# job has. Its id is the request's id.
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("request_id", sa.BigInteger, sa.ForeignKey("requests.id"), primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("terminate_by", sa.String(64), nullable=True),  # set: Terminating/Terminated
    sa.Column("terminate_at", sa.Float, nullable=True),
    sa.Column("terminate_reason", sa.String(2000), nullable=True),
    sa.Column("terminate_deadline", sa.Float, nullable=True),  # then: unreachable
    sa.Column("terminated_at", sa.Float, nullable=True),  # every computer stopped
)

# One row per (computer's activity, phase, item): its step status as the agent told it.
job_steps = sa.Table(
    "job_steps",
    metadata,
    sa.Column("activity_id", sa.BigInteger, sa.ForeignKey("activities.id"), primary_key=True),
    sa.Column("phase", sa.String(16), primary_key=True),
    sa.Column("item", sa.Integer, primary_key=True),  # index in the job's items
    sa.Column("request_id", sa.BigInteger, sa.ForeignKey("requests.id"), nullable=False),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # started|succeeded|failed|skipped
    sa.Column("detail", sa.String(2000), nullable=False),
    sa.Column("at", sa.Float, nullable=False),  # on the computer's clock, as reported
    sa.Index("ix_job_steps_request_id", "request_id"),
)

# -- the computer's inventory (issue 13, docs/inventory.md) -------------------------------

# One row per computer that reported one: what targets and listings read as columns, the
# rest (small sections, users, groups, sources it could not read) as JSON.
computer_inventory = sa.Table(
    "computer_inventory",
    metadata,
    sa.Column("computer_id", sa.BigInteger, sa.ForeignKey("computers.id"), primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("os_id", sa.String(64), nullable=True),  # os-release ID: debian, ubuntu
    sa.Column("os_version", sa.String(64), nullable=True),  # VERSION_ID: 12, 22.04
    sa.Column("os_name", sa.String(256), nullable=True),  # PRETTY_NAME
    sa.Column("kernel", sa.String(256), nullable=True),  # release: 6.1.0-18-amd64
    sa.Column("sections", sa.JSON, nullable=False),  # the small sections, users, groups
    sa.Column("digest", sa.String(32), nullable=False),  # what the agent says it holds
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("problem", sa.String(2000), nullable=True),  # the last report refused, and why
    sa.Index(None, "tenant_id", "os_id", "os_version"),
)

# Installed packages and pending upgrades, one row per (computer, package, architecture):
# ``version`` NULL is a package the upgrade would newly install.
computer_packages = sa.Table(
    "computer_packages",
    metadata,
    sa.Column("computer_id", sa.BigInteger, sa.ForeignKey("computers.id"), primary_key=True),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("arch", sa.String(32), primary_key=True),
    sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("version", sa.String(256), nullable=True),
    sa.Column("held", sa.Boolean, nullable=False, default=False),
    sa.Column("upgrade_version", sa.String(256), nullable=True),
    sa.Column("security", sa.Boolean, nullable=False, default=False),
    sa.Index(None, "tenant_id", "name"),  # package:NAME targets
)

# -- what every server process on one PostgreSQL database shares (docs/scale-out.md) ------
# (SQLite runs one process: it keeps these in memory and leaves the tables empty.)

# Dashboard sessions (server/dashboard/shared.py): the SHA-256 of the session id, never
# the id itself (the cookie's value is the secret).
dashboard_sessions = sa.Table(
    "dashboard_sessions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False),  # "" for an account's session
    sa.Column("account_id", sa.BigInteger, nullable=True),
    sa.Column("tenant_id", sa.BigInteger, nullable=True),
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_seen_at", sa.Float, nullable=False),  # bumped at most once a minute
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Index(None, "expires_at"),
)

# Failed credentials per (kind, source address) within a window (server/abuse.py).
auth_failures = sa.Table(
    "auth_failures",
    metadata,
    sa.Column("kind", sa.String(16), primary_key=True),  # token, enroll, login
    sa.Column("address", sa.String(64), primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("first_at", sa.Float, nullable=False),  # the window starts here
    sa.Column("last_at", sa.Float, nullable=False),
    sa.Index(None, "kind", "last_at"),
)
