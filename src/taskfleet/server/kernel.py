"""The server's kernel: what every server module shares, importing no other server module.

Contract: the error every server function raises for bad input
(:class:`ApiError`, an HTTP status and a message saying what is wrong), the
authenticated caller (:class:`Principal`) and its roles, how API tokens are
hashed for storage, the audit log's writer (``server/audit.py`` reads it), and
the per-state count of activities. Nothing here imports from
``taskfleet.server``; every other server module may import from here, so the
server's imports form no cycle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.states import State
from taskfleet.store.schema import activities, audit_log, tenants

ROLES = ("viewer", "operator", "admin")
DEFAULT_TENANT = "default"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers  # e.g. Retry-After with a 429


@dataclass(frozen=True)
class Principal:
    token_id: int
    tenant_id: int
    role: str
    name: str
    via: str | None = None  # acting for the token, e.g. "schedule:4" (a cron run)
    super_admin: bool = False  # manages tenants; may act in any (docs/tenants.md)
    account_id: int | None = None  # a dashboard login account's (token_id is 0 then)
    address: str | None = None  # the caller's network address (API, dashboard); audited

    @property
    def actor(self) -> str:
        if self.via:
            return self.via
        if self.account_id is not None:
            return f"account:{self.account_id}"
        return f"token:{self.token_id}"

    def allows(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def audit(
    conn: AsyncConnection,
    p: Principal,
    action: str,
    at: float,
    obj: str | None = None,
    /,
    **detail: Any,
) -> None:
    """Append one "ok" entry by ``p`` (its actor and address); ``obj`` is what it acted
    on ("token:5"), derived from the action and detail when not given
    (:func:`audit_object`)."""
    await write_audit(
        conn, [AuditEntry(p.tenant_id, p.actor, action, at, detail, p.address, obj=obj)]
    )


@dataclass(frozen=True)
class AuditEntry:
    """One audit log row (also for actors that are not an API caller: ``computer:ID``)."""

    tenant_id: int
    actor: str
    action: str
    at: float
    detail: dict[str, Any]
    address: str | None = None  # None: an internal actor (schedule, computer, server)
    outcome: str = "ok"  # "ok" | "refused" | "failed"
    obj: str | None = None  # "request:12"; None: derived by audit_object


AUDIT_OBJECT_MAX = 128  # the columns' widths (store/schema.py)
AUDIT_ADDRESS_MAX = 64
# The noun an action's object is, when it is not the action's own first word.
_OBJECT_NOUN = {"bulk": "request", "rollout": "request", "agent": "computer", "tag": "computer"}
# Detail keys that name the object, in the order they are looked for.
_OBJECT_KEYS = ("id", "{noun}_id", "{noun}", "name", "sha256")


def audit_object(action: str, detail: dict[str, Any]) -> str | None:
    """What an entry acted on, from its action and detail: ``request.cancel`` with
    ``id=12`` is ``request:12``, ``group.create`` with ``name=web`` is ``group:web``,
    ``tag.set`` with ``computer=3`` is ``computer:3``; None when the detail names none."""
    first = action.split(".", 1)[0]
    noun = _OBJECT_NOUN.get(first, first)
    for key in _OBJECT_KEYS:
        value = detail.get(key.format(noun=noun))
        if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
            continue
        return f"{noun}:{value}"[:AUDIT_OBJECT_MAX]
    return None


async def write_audit(conn: AsyncConnection, entries: list[AuditEntry]) -> None:
    """Append audit rows in one statement."""
    if entries:
        await conn.execute(
            audit_log.insert(),
            [
                {
                    "tenant_id": e.tenant_id,
                    "at": e.at,
                    "actor": e.actor[:64],
                    "action": e.action[:64],
                    "detail": e.detail,
                    "address": e.address[:AUDIT_ADDRESS_MAX] if e.address else None,
                    "outcome": e.outcome,
                    "object": (e.obj or audit_object(e.action, e.detail) or "")[:AUDIT_OBJECT_MAX]
                    or None,
                }
                for e in entries
            ],
        )


async def tenant_disabled(conn: AsyncConnection, tenant_id: int) -> bool:
    """True if the tenant is disabled (docs/tenants.md): no new work, logins or enrollments."""
    return bool(
        (
            await conn.execute(sa.select(tenants.c.disabled).where(tenants.c.id == tenant_id))
        ).scalar()
    )


async def state_counts(conn: AsyncConnection, *where: Any) -> dict[State, int]:
    """How many activities matching ``where`` are in each state."""
    return {
        State(r.state): r.n
        for r in await conn.execute(
            sa.select(activities.c.state, sa.func.count().label("n"))
            .where(*where)
            .group_by(activities.c.state)
        )
    }
