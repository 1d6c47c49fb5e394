"""A computer's inventory on the server: applying reports, reading it, targets by it (issue 13).

Contract:

* ``record(conn, reports, now)`` applies the ``inventory`` messages of one
  exchange batch (``server/exchange.py``) in the batch's transaction, set-wise:
  one read of the computers' current rows, then a few statements for the whole
  batch, whatever the number of computers. The reports of one computer are
  folded in order into one change (``domain.inventory.compose``). A whole
  inventory replaces what was there. A delta is applied only to the snapshot it
  was made against (its ``base`` is the stored ``digest``); one already applied
  (its ``digest`` is the stored one) changes nothing; any other, and a report
  with a ``problem``, applies nothing, is logged and recorded (``problem``), and
  the computer is returned in ``Recorded.want_full``: the reply asks its agent
  for the whole inventory. ``Recorded.got_full`` are the computers whose whole
  inventory was stored.
* Packages and upgrades are rows of ``computer_packages`` (indexed by tenant and
  name for ``package:`` targets); the small sections, users and groups are the
  JSON of ``computer_inventory`` (tens of entries, read with the computer only).
* ``inventory_of`` and ``list_packages`` read it (tenant-scoped, paged);
  ``computers_with_package`` and ``computers_with_os`` resolve targets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain import inventory as inv
from taskfleet.domain.versions import satisfies
from taskfleet.protocol.inventory import InventoryReport
from taskfleet.store.schema import computer_inventory, computer_packages, computers

log = logging.getLogger("taskfleet.writer")

_JSON_SECTIONS = tuple(s for s in inv.SECTIONS if s not in ("packages", "upgrades"))
_PACKAGE_SECTIONS = ("packages", "upgrades")


@dataclass
class Recorded:
    want_full: set[int] = field(default_factory=set)
    got_full: set[int] = field(default_factory=set)


@dataclass
class _Change:
    """What one computer's reports of this batch amount to."""

    tenant_id: int
    full: inv.Snapshot | None = None  # a whole inventory (later deltas folded in)
    delta: inv.Delta = field(default_factory=dict)
    digest: str = ""
    problem: str | None = None


def _fold(
    cid: int, current: str | None, reports: list[InventoryReport], tenant_id: int
) -> _Change | None:
    change: _Change | None = None
    digest = current
    for r in reports:
        if r.problem is not None:
            log.warning("computer %d: inventory message %d refused: %s", cid, r.seq, r.problem)
            change = change or _Change(tenant_id)
            change.problem = r.problem
            continue
        if r.full:
            change = _Change(tenant_id, full=r.sections, digest=r.digest)
        elif r.digest == digest:
            continue  # applied already
        elif r.base == digest and digest is not None:
            change = change or _Change(tenant_id, digest=digest)
            if change.full is not None:
                change.full = inv.apply(change.full, r.sections)
            else:
                change.delta = inv.compose(change.delta, r.sections)
        else:
            log.warning(
                "computer %d: inventory delta %d is against %s, the server holds %s: "
                "asking for the whole inventory",
                cid,
                r.seq,
                r.base,
                digest,
            )
            change = change or _Change(tenant_id)
            change.problem = "a delta did not apply to the inventory held; the whole one was asked"
            continue
        change.digest = digest = r.digest
        change.problem = None
    return change


async def record(
    conn: AsyncConnection, reports: list[tuple[int, int, list[InventoryReport]]], now: float
) -> Recorded:
    """Apply ``(computer id, tenant id, its inventory reports in order)``."""
    out = Recorded()
    if not reports:
        return out
    ids = [cid for cid, _, _ in reports]
    rows = {
        r.computer_id: r
        for r in await conn.execute(
            sa.select(
                computer_inventory.c.computer_id,
                computer_inventory.c.digest,
                computer_inventory.c.sections,
            ).where(computer_inventory.c.computer_id.in_(ids))
        )
    }
    changes: dict[int, _Change] = {}
    for cid, tenant_id, items in reports:
        row = rows.get(cid)
        change = _fold(cid, row.digest if row else None, items, tenant_id)
        if change is None:
            continue
        changes[cid] = change
        if change.problem is not None:
            out.want_full.add(cid)
        elif change.full is not None:
            out.got_full.add(cid)
    await _write_packages(conn, changes)
    await _write_rows(conn, changes, rows, now)
    return out


def _package_rows(cid: int, tenant_id: int, snapshot: inv.Snapshot) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for key, e in (snapshot.get("packages") or {}).items():
        rows[key] = _row(cid, tenant_id, key, version=e.get("version"), held=e.get("held") is True)
    for key, e in (snapshot.get("upgrades") or {}).items():
        row = rows.setdefault(key, _row(cid, tenant_id, key))
        row["upgrade_version"] = e.get("version")
        row["security"] = e.get("security") is True
    return list(rows.values())


def _row(cid: int, tenant_id: int, key: str, **values: Any) -> dict[str, Any]:
    name, arch = inv.split_package_key(key)
    base = {"version": None, "held": False, "upgrade_version": None, "security": False}
    return {
        "computer_id": cid,
        "tenant_id": tenant_id,
        "name": name,
        "arch": arch,
        **base,
        **values,
    }


async def _write_packages(conn: AsyncConnection, changes: dict[int, _Change]) -> None:
    p = computer_packages.c
    # Whole inventories, and package sections that went or came back whole: replaced.
    replace = {
        cid: ch.full for cid, ch in changes.items() if ch.problem is None and ch.full is not None
    }
    if replace:
        await conn.execute(computer_packages.delete().where(p.computer_id.in_(list(replace))))
        rows = [
            r for cid, s in replace.items() for r in _package_rows(cid, changes[cid].tenant_id, s)
        ]
        if rows:
            await conn.execute(computer_packages.insert(), rows)
    installed: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    gone_installed: list[dict[str, Any]] = []
    gone_pending: list[dict[str, Any]] = []
    touched: set[int] = set()
    for cid, ch in changes.items():
        if ch.problem is not None or ch.full is not None:
            continue
        for section in _PACKAGE_SECTIONS:
            if section not in ch.delta:
                continue
            d = ch.delta[section]
            if d is None or d.get("clear"):  # the section went (or came back whole)
                await _clear(conn, cid, section)
                touched.add(cid)
            if d is None:
                continue
            for key, e in d.get("set", {}).items():
                name, arch = inv.split_package_key(key)
                row = {"computer_id": cid, "tenant_id": ch.tenant_id, "name": name, "arch": arch}
                if section == "packages":
                    row.update(version=e.get("version"), held=e.get("held") is True)
                    installed.append(row)
                else:
                    row.update(upgrade_version=e.get("version"), security=e.get("security") is True)
                    pending.append(row)
            for key in d.get("remove", ()):
                name, arch = inv.split_package_key(key)
                gone = gone_installed if section == "packages" else gone_pending
                gone.append({"b_c": cid, "b_n": name, "b_a": arch})
                touched.add(cid)
    await _upsert(
        conn, installed, ("version", "held"), {"upgrade_version": None, "security": False}
    )
    await _upsert(conn, pending, ("upgrade_version", "security"), {"version": None, "held": False})
    where = (
        p.computer_id == sa.bindparam("b_c"),
        p.name == sa.bindparam("b_n"),
        p.arch == sa.bindparam("b_a"),
    )
    if gone_installed:
        await conn.execute(
            computer_packages.update().where(*where).values(version=None, held=False),
            gone_installed,
        )
    if gone_pending:
        await conn.execute(
            computer_packages.update().where(*where).values(upgrade_version=None, security=False),
            gone_pending,
        )
    if touched:  # rows neither installed nor to be installed are gone
        await conn.execute(
            computer_packages.delete().where(
                p.computer_id.in_(list(touched)), p.version.is_(None), p.upgrade_version.is_(None)
            )
        )


async def _clear(conn: AsyncConnection, cid: int, section: str) -> None:
    p = computer_packages.c
    values = {"version": None, "held": False} if section == "packages" else {}
    values = values or {"upgrade_version": None, "security": False}
    await conn.execute(computer_packages.update().where(p.computer_id == cid).values(values))


async def _upsert(
    conn: AsyncConnection,
    rows: list[dict[str, Any]],
    columns: tuple[str, ...],
    others: dict[str, Any],
) -> None:
    """Insert ``rows`` (the other columns as ``others``), or set ``columns`` of existing ones."""
    if not rows:
        return
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = insert(computer_packages)
    stmt = stmt.on_conflict_do_update(
        index_elements=[
            computer_packages.c.computer_id,
            computer_packages.c.name,
            computer_packages.c.arch,
        ],
        set_={c: stmt.excluded[c] for c in columns},
    )
    await conn.execute(stmt, [{**others, **r} for r in rows])


def _columns(sections: dict[str, Any]) -> dict[str, Any]:
    os_ = sections.get("os") or {}
    kernel = sections.get("kernel") or {}
    return {
        "os_id": _text(os_.get("id"), 64),
        "os_version": _text(os_.get("version_id"), 64),
        "os_name": _text(os_.get("pretty_name"), 256),
        "kernel": _text(kernel.get("release"), 256),
    }


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


async def _write_rows(
    conn: AsyncConnection, changes: dict[int, _Change], rows: dict[int, Any], now: float
) -> None:
    new: list[dict[str, Any]] = []
    updated: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for cid, ch in changes.items():
        row = rows.get(cid)
        if ch.problem is not None:
            if row is not None:
                refused.append({"b_id": cid, "problem": ch.problem[:2000]})
            continue
        if ch.full is not None:
            sections = {k: v for k, v in ch.full.items() if k in _JSON_SECTIONS}
        else:
            json_delta = {k: v for k, v in ch.delta.items() if k in _JSON_SECTIONS}
            sections = inv.apply(dict(row.sections) if row else {}, json_delta)
        values = {
            **_columns(sections),
            "sections": sections,
            "digest": ch.digest,
            "updated_at": now,
            "problem": None,
        }
        if row is None:
            new.append({"computer_id": cid, "tenant_id": ch.tenant_id, **values})
        else:
            updated.append({"b_id": cid, **values})
    if new:
        await conn.execute(computer_inventory.insert(), new)
    c = computer_inventory.c
    if updated:
        await conn.execute(
            computer_inventory.update()
            .where(c.computer_id == sa.bindparam("b_id"))
            .values({k: sa.bindparam(k) for k in updated[0] if k != "b_id"}),
            updated,
        )
    if refused:
        await conn.execute(
            computer_inventory.update()
            .where(c.computer_id == sa.bindparam("b_id"))
            .values(problem=sa.bindparam("problem")),
            refused,
        )


# -- reads --------------------------------------------------------------------------


async def inventory_of(
    conn: AsyncConnection, tenant_id: int, computer_id: int
) -> dict[str, Any] | None:
    """The computer's inventory: its sections, package counts and pending upgrades."""
    c = computer_inventory.c
    row = (
        await conn.execute(
            sa.select(computer_inventory).where(
                c.computer_id == computer_id, c.tenant_id == tenant_id
            )
        )
    ).first()
    if row is None:
        return None
    p = computer_packages.c
    installed = (
        await conn.execute(
            sa.select(sa.func.count()).where(p.computer_id == computer_id, p.version.is_not(None))
        )
    ).scalar_one()
    ups = await conn.execute(
        sa.select(p.name, p.arch, p.version, p.upgrade_version, p.security)
        .where(p.computer_id == computer_id, p.upgrade_version.is_not(None))
        .order_by(p.name, p.arch)
    )
    return {
        **{k: v for k, v in row.sections.items()},
        "packages": installed,
        "upgrades": [dict(u._mapping) for u in ups],
        "updated_at": row.updated_at,
        "problem": row.problem,
    }


async def list_packages(
    conn: AsyncConnection,
    tenant_id: int,
    computer_id: int,
    *,
    after: str = "",
    limit: int = 1000,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Installed packages (and ones an upgrade would install) by name, from after ``after``."""
    p = computer_packages.c
    q = (
        sa.select(p.name, p.arch, p.version, p.held, p.upgrade_version, p.security)
        .where(p.computer_id == computer_id, p.tenant_id == tenant_id, p.name > after)
        .order_by(p.name, p.arch)
        .limit(limit)
    )
    if name is not None:
        q = q.where(p.name == name)
    return [dict(r._mapping) for r in await conn.execute(q)]


async def computers_with_package(
    conn: AsyncConnection, tenant_id: int, name: str, op: str | None, version: str | None
) -> list[int]:
    """Computers (not removed) with package ``name`` installed, at a version that
    satisfies ``OP VERSION`` when given (Debian ordering, compared here)."""
    p = computer_packages.c
    rows = await conn.execute(
        sa.select(p.computer_id, p.version)
        .join(computers, computers.c.id == p.computer_id)
        .where(p.tenant_id == tenant_id, p.name == name, p.version.is_not(None))
        .where(computers.c.removed_at.is_(None))
    )
    return sorted(
        {
            int(r.computer_id)
            for r in rows
            if op is None or version is None or satisfies(r.version, op, version)
        }
    )


async def computers_with_os(
    conn: AsyncConnection, tenant_id: int, os_id: str, os_version: str | None
) -> list[int]:
    c = computer_inventory.c
    q = (
        sa.select(c.computer_id)
        .join(computers, computers.c.id == c.computer_id)
        .where(c.tenant_id == tenant_id, c.os_id == os_id, computers.c.removed_at.is_(None))
    )
    if os_version is not None:
        q = q.where(c.os_version == os_version)
    return sorted(int(i) for i in (await conn.execute(q)).scalars())
