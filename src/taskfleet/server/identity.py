"""Identities that cannot be cloned: the server's side of the rotating identity nonce.

Contract (the rule is ``domain/identity.py``; docs/reliability.md explains it):

* ``check`` is called for every direct agent exchange, after its secret was checked.
  It answers from memory (``ComputerState.identity``) when the rule changes
  nothing; anything else (a confirmation, an offer, a conflict, a computer whose
  state is not loaded yet, a flagged one) is decided again inside a write
  transaction on the computer's row (locked on PostgreSQL), so several server
  processes agree and a flag or a reset made elsewhere is seen. A fresh offer
  is stored before the reply that carries it is sent: the agent never holds a
  nonce the server could forget. If that write fails, the exchange fails (the
  agent retries with the nonce it holds) and memory is reloaded from the row.
* A conflict flags the computer (``identity_conflict_at``, ``_reason``) with an
  audit entry in the same transaction; the exchange and every later one is
  refused (409, ``identity-conflict``) and no work is handed to it, directly or
  through a relay (``blocked``), until an administrator resets it (``reset``,
  audited) or removes it. A relay's report (``report``: it caught two agents behind
  it, docs/relays.md "Copies behind a relay") flags a computer behind that relay
  the same way. A flag or a reset changes the relay's roster (``flagged``).
* Nonces are secrets: only their hashes are stored, they are never logged.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.identity import (
    Nonces,
    Verdict,
    decide,
    flag,
    hash_nonce,
    reset,
    with_offer,
)
from taskfleet.server.fleet import ComputerState
from taskfleet.server.kernel import ApiError, AuditEntry, Principal, audit, write_audit
from taskfleet.server.writer import Writer
from taskfleet.store.schema import computers

log = logging.getLogger("taskfleet.server")

REFUSAL_CODE = "identity-conflict"

_COLUMNS = (
    computers.c.identity_confirmed,
    computers.c.identity_confirmed_at,
    computers.c.identity_previous,
    computers.c.identity_offered,
    computers.c.identity_offered_at,
    computers.c.identity_superseded,
    computers.c.identity_conflict_at,
    computers.c.identity_conflict_reason,
)


@dataclass(frozen=True)
class Checked:
    """What an exchange's identity check decided: refused (``conflict``, why), or
    accepted, with the fresh nonce to send in the reply (``offer``) if one is made."""

    conflict: str | None = None
    offer: str | None = None
    flagged: bool = False  # this check raised the flag (the other processes are told)


def new_nonce() -> str:
    return secrets.token_hex(16)  # 128 random bits


def from_row(row: Any) -> Nonces:
    return Nonces(
        confirmed=row.identity_confirmed,
        confirmed_at=row.identity_confirmed_at,
        previous=row.identity_previous,
        offered=row.identity_offered,
        offered_at=row.identity_offered_at,
        superseded=tuple(row.identity_superseded or ()),
        conflict_at=row.identity_conflict_at,
        conflict_reason=row.identity_conflict_reason,
    )


def values(n: Nonces) -> dict[str, Any]:
    """The ``computers`` columns holding ``n``."""
    return {
        "identity_confirmed": n.confirmed,
        "identity_confirmed_at": n.confirmed_at,
        "identity_previous": n.previous,
        "identity_offered": n.offered,
        "identity_offered_at": n.offered_at,
        "identity_superseded": list(n.superseded) or None,
        "identity_conflict_at": n.conflict_at,
        "identity_conflict_reason": n.conflict_reason,
    }


def first(now: float) -> tuple[str, Nonces]:
    """An enrolled computer's first nonce (sent in the enrollment's answer) and state:
    offered, nothing confirmed yet."""
    nonce = new_nonce()
    return nonce, Nonces(offered=hash_nonce(nonce), offered_at=now)


def blocked(cs: ComputerState) -> bool:
    """Flagged: no work is handed to it (it stays Queued) until an administrator decides."""
    n = cs.identity
    return n is not None and n.conflict_at is not None


async def check(
    writer: Writer,
    cs: ComputerState,
    presented: str | None,
    now: float,
    *,
    rotate: float,
    grace: float,
) -> Checked:
    """Decide on a direct exchange of ``cs`` presenting ``presented`` (the plain nonce,
    None: none). Raises what the write raised (the exchange then fails: a 500)."""
    h = None if presented is None else hash_nonce(presented)
    if cs.identity is not None:
        d = decide(cs.identity, h, now, rotate=rotate, grace=grace)
        if d.verdict is Verdict.ACCEPT and not d.changed:
            return Checked()

    async def apply(conn: AsyncConnection) -> tuple[Nonces, Checked, bool]:
        state = await _locked(conn, writer, cs.id)
        d = decide(state, h, now, rotate=rotate, grace=grace)
        new, offer = d.state, None
        if d.offer:
            offer = new_nonce()
            new = with_offer(new, hash_nonce(offer), now)
        if new != state:
            await conn.execute(
                computers.update().where(computers.c.id == cs.id).values(**values(new))
            )
        flagged = d.verdict is Verdict.CONFLICT and d.changed
        if flagged:
            await _audit_flag(conn, cs, "server", {"reason": d.reason}, now)
        conflict = (d.reason or "identity conflict") if d.verdict is Verdict.CONFLICT else None
        return new, Checked(conflict, offer, flagged), flagged

    try:
        new, checked, flagged = await writer.run(apply)
    except Exception:
        cs.identity = None  # memory may be ahead of the row: read it again next time
        raise
    cs.identity = new
    if flagged:
        if cs.relay is not None:
            cs.relay.roster_changed()  # its relay refuses the agent too
        _log_flag(cs.id, checked.conflict)
    return checked


async def report(writer: Writer, cs: ComputerState, relay_id: int, reason: str, now: float) -> bool:
    """The relay ``relay_id``, which ``cs`` is behind (the caller checked), caught two
    agents using its identity: the computer is flagged as by a direct conflict
    (audited, with the relay named). Returns whether this flagged it (False: it
    was already). The relay is semi-trusted: it can only flag its own computers,
    which it could starve of work anyway."""
    why = f"relay {relay_id}: {reason}"

    async def apply(conn: AsyncConnection) -> tuple[Nonces, bool]:
        state = await _locked(conn, writer, cs.id)
        if state.conflict_at is not None:
            return state, False
        new = flag(state, why, now)
        await conn.execute(computers.update().where(computers.c.id == cs.id).values(**values(new)))
        detail = {"reason": why, "relay_id": relay_id}
        await _audit_flag(conn, cs, f"relay:{relay_id}", detail, now)
        return new, True

    try:
        new, flagged = await writer.run(apply)
    except Exception:
        cs.identity = None
        raise
    cs.identity = new
    if cs.relay is not None:
        cs.relay.roster_changed()  # the relay sees the flag: it stops reporting it
    if flagged:
        _log_flag(cs.id, why)
    return flagged


async def _locked(conn: AsyncConnection, writer: Writer, computer_id: int) -> Nonces:
    """The computer's identity state, its row locked until the commit (PostgreSQL)."""
    query = sa.select(*_COLUMNS).where(computers.c.id == computer_id)
    if writer.pg:
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    if row is None:
        raise ApiError(401, "unknown computer")
    return from_row(row)


async def _audit_flag(
    conn: AsyncConnection, cs: ComputerState, actor: str, detail: dict[str, Any], now: float
) -> None:
    entry = AuditEntry(
        cs.tenant_id,
        actor,
        "computer.identity_conflict",
        now,
        {"computer_id": cs.id, **detail},
        obj=f"computer:{cs.id}",
    )
    await write_audit(conn, [entry])


def _log_flag(computer_id: int, why: str | None) -> None:
    log.error(
        "computer %d flagged: %s; it gets no work until an administrator resets its "
        "identity (taskfleet computer identity-reset %d) or removes it",
        computer_id,
        why,
        computer_id,
    )


@dataclass(frozen=True)
class Reset:
    computer_id: int
    hostname: str
    was_flagged: bool
    state: Nonces


async def reset_identity(
    conn: AsyncConnection, p: Principal, computer_id: int, now: float
) -> Reset:
    """An administrator's decision: the flag and the nonces cleared (audited); the next
    exchange presenting the computer's secret starts a new lineage. A copy that still
    runs is caught again on the next rotations."""
    row = (
        await conn.execute(
            sa.select(
                computers.c.hostname,
                computers.c.removed_at,
                computers.c.identity_conflict_at,
                computers.c.identity_conflict_reason,
            ).where(computers.c.id == computer_id, computers.c.tenant_id == p.tenant_id)
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no computer {computer_id}")
    if row.removed_at is not None:
        raise ApiError(409, f"computer {computer_id} was removed: enroll it again instead")
    state = reset(now)
    await conn.execute(
        computers.update().where(computers.c.id == computer_id).values(**values(state))
    )
    await audit(
        conn,
        p,
        "computer.identity_reset",
        now,
        f"computer:{computer_id}",
        computer_id=computer_id,
        hostname=row.hostname,
        conflict_at=row.identity_conflict_at,
        conflict_reason=row.identity_conflict_reason,
    )
    return Reset(computer_id, row.hostname, row.identity_conflict_at is not None, state)
