"""The audit log: read it with filters, export it, and record refused and failed calls.

Contract: :func:`list_audit` answers one page of the caller's tenant's entries,
newest first, matching an :class:`AuditFilter` (every field optional; actor,
action and object match exactly, or as a prefix when they end in ``*``; since
inclusive, until exclusive; ``before_id`` pages back). :func:`export` yields every
matching entry as CSV or JSON lines, read in batches of ``AUDIT_EXPORT_BATCH``
through short read transactions, never more than one batch in memory.
:func:`record_refusal` appends the one entry of a call the server refused (4xx:
"refused") or failed (5xx: "failed"); entries by unknown callers (no valid token)
go through the :class:`~taskfleet.domain.audit.UnknownLimiter` so a flood cannot
fill the disk. Entries themselves are written by ``kernel.write_audit`` and are
append-only in the database (migration 0012).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.audit import UnknownLimiter, csv_header, csv_line, jsonl_line
from taskfleet.server.kernel import DEFAULT_TENANT, AuditEntry, Principal, write_audit
from taskfleet.settings import AUDIT_EXPORT_BATCH, AUDIT_UNKNOWN_LIMIT, AUDIT_UNKNOWN_WINDOW
from taskfleet.store.schema import audit_log, tenants

UNKNOWN = "unknown"  # the actor of a refused call by no known caller


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    action: str | None = None
    object: str | None = None
    since: float | None = None
    until: float | None = None
    outcome: str | None = None
    before_id: int | None = None

    def query_string(self) -> dict[str, str]:
        """The filter as query parameters (the dashboard's links carry it)."""
        out = {}
        for name in ("actor", "action", "object", "outcome"):
            value = getattr(self, name)
            if value:
                out[name] = value
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                out[name] = f"{value:.3f}".rstrip("0").rstrip(".")
        return out


def _match(column: Any, value: str) -> Any:
    if value.endswith("*"):
        return column.startswith(value[:-1], autoescape=True)
    return column == value


def _where(p: Principal, f: AuditFilter) -> list[Any]:
    c = audit_log.c
    where: list[Any] = [c.tenant_id == p.tenant_id]
    if f.actor:
        where.append(_match(c.actor, f.actor))
    if f.action:
        where.append(_match(c.action, f.action))
    if f.object:
        where.append(_match(c.object, f.object))
    if f.outcome:
        where.append(c.outcome == f.outcome)
    if f.since is not None:
        where.append(c.at >= f.since)
    if f.until is not None:
        where.append(c.at < f.until)
    if f.before_id is not None:
        where.append(c.id < f.before_id)
    return where


_COLUMNS = (
    audit_log.c.id,
    audit_log.c.at,
    audit_log.c.actor,
    audit_log.c.address,
    audit_log.c.action,
    audit_log.c.object,
    audit_log.c.outcome,
    audit_log.c.detail,
)


async def list_audit(
    conn: AsyncConnection, p: Principal, f: AuditFilter, limit: int
) -> list[dict[str, Any]]:
    """Up to ``limit`` entries matching ``f``, newest first."""
    rows = await conn.execute(
        sa.select(*_COLUMNS).where(*_where(p, f)).order_by(audit_log.c.id.desc()).limit(limit)
    )
    return [dict(r._mapping) for r in rows]


Reader = Callable[[Callable[[AsyncConnection], Awaitable[list[dict[str, Any]]]]], Awaitable[Any]]


async def export(read: Reader, p: Principal, f: AuditFilter, fmt: str) -> AsyncIterator[str]:
    """Every entry matching ``f``, newest first, as ``csv`` or ``jsonl`` text."""
    if fmt == "csv":
        yield csv_header()
    line = csv_line if fmt == "csv" else jsonl_line
    page = f
    while True:
        batch: list[dict[str, Any]] = await read(
            lambda c, page=page: list_audit(c, p, page, AUDIT_EXPORT_BATCH)  # type: ignore[misc]
        )
        if not batch:
            return
        yield "".join(line(row) for row in batch)
        if len(batch) < AUDIT_EXPORT_BATCH:
            return
        page = AuditFilter(**{**f.__dict__, "before_id": batch[-1]["id"]})


# -- refused and failed calls ---------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A call the server refused or failed, as the HTTP edge saw it."""

    action: str  # the route's name ("cancel_request", "ui_cancel")
    status: int
    message: str
    method: str
    path: str
    address: str | None
    obj: str | None


class Recorder:
    """Writes the entries of refused and failed calls (one per call)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.unknown = UnknownLimiter(clock, AUDIT_UNKNOWN_LIMIT, AUDIT_UNKNOWN_WINDOW)
        self._default_tenant: int | None = None

    def entry(self, p: Principal | None, r: Refusal, now: float) -> AuditEntry | None:
        """The entry for ``r`` by ``p`` (None: an unknown caller, whose entry goes to the
        default tenant), or None when the bound on unknown callers' entries leaves it out."""
        detail: dict[str, Any] = {
            "status": r.status,
            "error": r.message[:500],
            "method": r.method,
            "path": r.path[:200],
        }
        if p is None:
            dropped = self.unknown.take()
            if dropped is None:
                return None
            if dropped:
                detail["not_recorded_before"] = dropped
        return AuditEntry(
            p.tenant_id if p is not None else 0,  # 0: the default tenant's, found by write
            p.actor if p is not None else UNKNOWN,
            r.action,
            now,
            detail,
            r.address,
            outcome="failed" if r.status >= 500 else "refused",
            obj=r.obj,
        )

    async def write(self, conn: AsyncConnection, entry: AuditEntry) -> None:
        """Append ``entry`` (run by the writer)."""
        if entry.tenant_id == 0:
            tenant = await self._default(conn)
            if tenant is None:  # no tenant yet: nobody to show it to
                return
            entry = replace(entry, tenant_id=tenant)
        await write_audit(conn, [entry])

    async def _default(self, conn: AsyncConnection) -> int | None:
        if self._default_tenant is None:
            tid = (
                await conn.execute(sa.select(tenants.c.id).where(tenants.c.name == DEFAULT_TENANT))
            ).scalar_one_or_none()
            self._default_tenant = None if tid is None else int(tid)
        return self._default_tenant
