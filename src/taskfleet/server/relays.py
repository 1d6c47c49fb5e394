"""Relays: enroll a relay, enroll computers through it, assign, read, and the relay
exchange's fan-out (issue 11, SPEC 3.2, 3.3; docs/relays.md).

Contract:

* ``enroll_relay`` takes a relay enrollment token (kind ``relay``, not revoked,
  not expired) and a name unique in the token's tenant; enrolling the same name
  again replaces the secret and bumps the generation (so its tickle key
  changes). The secret is returned once and stored as its SHA-256.
* ``enroll_computer`` enrolls a computer through a relay with the agent's own
  enrollment (``server/enrollment.py``): the computer is put behind the relay,
  and a token of another tenant is refused (403) with nothing written.
* ``assign`` puts the computers of a group behind a relay (audited).
* ``exchange`` applies one relay exchange: one ``ExchangeJob`` per entry, plus
  one per other computer of the relay for which the server holds messages the
  relay does not (new work, resends), all in ONE writer batch sharing one reply
  budget. An entry for a computer not behind this relay is refused alone (403),
  a malformed one 400, one that failed 500; the others are applied. An entry whose
  agent ``ack`` is beyond the last message sent has the ack ignored, not the entry
  refused (a refusal would cost the agent's results: see ``_entry_jobs``).
* The server remembers per computer which server messages the relay holds
  (``RelayState.have``, a hint; ``resync`` forgets it) and sends only above it.
* A relay's roster (its computers' ids, generations, secret hashes, tickle keys
  and ports) is versioned by a digest of its content: it is sent whenever the
  relay's version differs.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.protocol.exchange import MAX_VERSION_CHARS, AgentRequest, ProtocolError, clean_text
from taskfleet.protocol.relay import (
    ComputerOut,
    EntryError,
    RelayRequest,
    roster_body,
    roster_entry,
)
from taskfleet.protocol.tickle import derive_tickle_key
from taskfleet.server import enrollment, identity, metrics
from taskfleet.server.exchange import Exchange, ExchangeJob, ReplyBudget
from taskfleet.server.fleet import Fleet, RelayState, hash_secret
from taskfleet.server.inventory import group_id
from taskfleet.server.kernel import ApiError, Principal, audit, tenant_disabled, token_hash
from taskfleet.settings import RELAY_NAME_MAX, RELAY_REPLY_MAX_BYTES, RELAY_URL_MAX
from taskfleet.store.schema import api_tokens, audit_log, computers, group_members, relays

log = logging.getLogger("taskfleet.server")


# -- enrollment -------------------------------------------------------------------


@dataclass
class RelayEnrolled:
    state: RelayState
    secret: str
    reenrolled: bool


def _check_relay_fields(name: str, url: str, tickle_port: int | None, version: str) -> None:
    if not name or len(name) > RELAY_NAME_MAX:
        raise ApiError(400, f"name is required (1..{RELAY_NAME_MAX} characters)")
    # The name is the relay's identity in its tenant: altered, two relays could become one.
    if clean_text(name) != name:
        raise ApiError(400, "name must not contain NUL or unpaired surrogates")
    if len(url) > RELAY_URL_MAX or (url and not url.startswith(("http://", "https://"))):
        raise ApiError(400, f"url must be an http(s) URL of at most {RELAY_URL_MAX} characters")
    if tickle_port is not None and not 0 < tickle_port < 65536:
        raise ApiError(400, "tickle_port must be 1..65535 (or null: no UDP wake-ups)")
    if len(version) > MAX_VERSION_CHARS:
        raise ApiError(
            400, f"version is {len(version)} characters, the limit is {MAX_VERSION_CHARS}"
        )


async def enroll_relay(
    conn: AsyncConnection,
    now: float,
    *,
    token: str,
    name: str,
    url: str,
    tickle_port: int | None,
    version: str,
    address: str | None,
) -> RelayEnrolled:
    row = (
        await conn.execute(
            sa.select(api_tokens).where(
                api_tokens.c.token_hash == token_hash(token), api_tokens.c.kind == "relay"
            )
        )
    ).first()
    if row is None or row.revoked:
        raise ApiError(401, "invalid relay enrollment token")
    if row.expires_at is not None and row.expires_at < now:
        raise ApiError(401, "relay enrollment token expired")
    if await tenant_disabled(conn, row.tenant_id):
        raise ApiError(403, "the relay enrollment token's tenant is disabled")
    _check_relay_fields(name, url, tickle_port, version)
    url, version = clean_text(url), clean_text(version)
    secret = "tfrs_" + secrets.token_urlsafe(32)
    existing = (
        await conn.execute(
            sa.select(relays.c.id, relays.c.generation).where(
                relays.c.tenant_id == row.tenant_id, relays.c.name == name
            )
        )
    ).first()
    values = {
        "secret_hash": hash_secret(secret),
        "url": url or None,
        "tickle_port": tickle_port,
        "address": address,
        "token_id": row.id,
        "enrolled_at": now,
        "last_seen_at": now,
        "revoked_at": None,  # a new valid token brings a revoked relay back
        "version": version,
    }
    if existing is not None:
        relay_id, generation = existing.id, existing.generation + 1
        await conn.execute(
            relays.update().where(relays.c.id == relay_id).values(generation=generation, **values)
        )
    else:
        generation = 1
        relay_id = (
            await conn.execute(
                relays.insert()
                .values(tenant_id=row.tenant_id, name=name, generation=1, **values)
                .returning(relays.c.id)
            )
        ).scalar_one()
    await conn.execute(
        audit_log.insert().values(
            tenant_id=row.tenant_id,
            at=now,
            actor=f"relay-token:{row.id}",
            action="relay.reenroll" if existing is not None else "relay.enroll",
            object=f"relay:{relay_id}",
            detail={"relay_id": relay_id, "name": name, "generation": generation},
        )
    )
    state = RelayState(
        relay_id,
        row.tenant_id,
        name,
        hash_secret(secret),
        generation,
        address=address,
        tickle_port=tickle_port,
        last_seen=now,
        url=url or None,
    )
    return RelayEnrolled(state, secret, existing is not None)


async def enroll_computer(
    conn: AsyncConnection, now: float, rs: RelayState, **agent: Any
) -> enrollment.Enrolled:
    """Enroll a computer through relay ``rs`` (``agent``: the agent's enrollment body)."""
    revoked = (
        await conn.execute(sa.select(relays.c.revoked_at).where(relays.c.id == rs.id))
    ).scalar()
    if revoked is not None:  # revoked since the request was authenticated
        raise ApiError(401, "this relay is revoked")
    return await enrollment.enroll(
        conn, now, address=None, relay=enrollment.Via(rs.id, rs.tenant_id), **agent
    )


# -- administration ---------------------------------------------------------------


async def assign(
    conn: AsyncConnection, p: Principal, relay_id: int, group: str, now: float
) -> list[int]:
    """Put the computers of ``group`` behind relay ``relay_id``; their ids."""
    row = (
        await conn.execute(
            sa.select(relays.c.name, relays.c.revoked_at).where(
                relays.c.id == relay_id, relays.c.tenant_id == p.tenant_id
            )
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no relay {relay_id}")
    if row.revoked_at is not None:
        raise ApiError(409, f"relay {relay_id} is revoked (its token was): enroll it again first")
    gid = await group_id(conn, p.tenant_id, group)
    ids = sorted(
        (
            await conn.execute(
                sa.select(computers.c.id)
                .join(group_members, group_members.c.computer_id == computers.c.id)
                .where(group_members.c.group_id == gid, computers.c.removed_at.is_(None))
            )
        )
        .scalars()
        .all()
    )
    if not ids:
        raise ApiError(400, f"group {group!r} has no computers")
    await conn.execute(computers.update().where(computers.c.id.in_(ids)).values(relay_id=relay_id))
    await audit(
        conn, p, "relay.assign", now, relay_id=relay_id, relay=row.name, group=group, computers=ids
    )
    return ids


_COLUMNS = (
    relays.c.id,
    relays.c.name,
    relays.c.url,
    relays.c.tickle_port,
    relays.c.address,
    relays.c.generation,
    relays.c.token_id,
    relays.c.version,
    relays.c.enrolled_at,
    relays.c.last_seen_at,
    relays.c.revoked_at,
)


async def list_relays(
    conn: AsyncConnection, p: Principal, *, only: int | None = None
) -> list[dict[str, Any]]:
    """The tenant's relays (never their secrets), with how many computers are behind each."""
    count = (
        sa.select(sa.func.count())
        .where(computers.c.relay_id == relays.c.id, computers.c.removed_at.is_(None))
        .scalar_subquery()
    )
    where = [relays.c.tenant_id == p.tenant_id]
    if only is not None:
        where.append(relays.c.id == only)
    rows = await conn.execute(
        sa.select(*_COLUMNS, count.label("computers")).where(*where).order_by(relays.c.id)
    )
    return [dict(r._mapping) for r in rows]


async def get_relay(conn: AsyncConnection, p: Principal, relay_id: int) -> dict[str, Any]:
    """One relay with the computers behind it."""
    found = await list_relays(conn, p, only=relay_id)
    if not found:
        raise ApiError(404, f"no relay {relay_id}")
    out = found[0]
    rows = await conn.execute(
        sa.select(computers.c.id, computers.c.hostname, computers.c.last_seen_at)
        .where(computers.c.relay_id == relay_id, computers.c.removed_at.is_(None))
        .order_by(computers.c.id)
    )
    out["members"] = [dict(r._mapping) for r in rows]
    return out


def live(fleet: Fleet, d: dict[str, Any]) -> dict[str, Any]:
    """A relay read from the database, with what only memory knows (last contact,
    reported stats, how many of its computers last exchanged through it)."""
    rs = fleet.relays.get(d["id"])
    d["stats"] = {}
    d["computers_via_relay"] = 0
    if rs is None:
        return d
    if rs.last_seen and (d["last_seen_at"] or 0) < rs.last_seen:
        d["last_seen_at"] = rs.last_seen
        d["address"] = rs.address
    d["stats"] = dict(rs.stats)
    d["computers_via_relay"] = sum(1 for cs in rs.computers.values() if cs.via_relay)
    return d


async def flush_seen(conn: AsyncConnection, dirty: list[RelayState]) -> None:
    """Store relays' last contact and address (kept in memory between flushes)."""
    await conn.execute(
        relays.update()
        .where(relays.c.id == sa.bindparam("b_id"))
        .values(last_seen_at=sa.bindparam("seen"), address=sa.bindparam("addr")),
        [{"b_id": rs.id, "seen": rs.last_seen, "addr": rs.address} for rs in dirty],
    )


# -- the relay exchange -------------------------------------------------------------


def roster(rs: RelayState, master_key: bytes) -> dict[str, Any]:
    """The relay's roster as sent: what it needs to authenticate and tickle its agents."""
    return roster_body(
        rs.roster_version,
        [
            roster_entry(
                cs.id,
                cs.generation,
                cs.secret_hash.hex(),
                derive_tickle_key(master_key, cs.id, cs.generation).hex(),
                cs.tickle_port,
                identity.blocked(cs),
            )
            for cs in sorted(rs.computers.values(), key=lambda c: c.id)
        ],
    )


def quiet(rs: RelayState, req: RelayRequest) -> bool:
    """Nothing to do: answered from memory (no entries, no work, roster current)."""
    return (
        not req.entries
        and not req.errors
        and not req.resync
        and not rs.has_work
        and req.roster == rs.roster_version
    )


@dataclass
class Outcome:
    computers: list[ComputerOut]
    errors: list[EntryError]
    more: bool


def _entry_jobs(
    fleet: Fleet, rs: RelayState, req: RelayRequest, now: float, budget: ReplyBudget
) -> tuple[list[ExchangeJob], list[EntryError]]:
    jobs: list[ExchangeJob] = []
    errors: list[EntryError] = list(req.errors)
    for entry in req.entries:
        cs = fleet.get(entry.id)
        if cs is None or cs.relay is not rs:
            log.warning("relay %d sent an entry for computer %d, not behind it", rs.id, entry.id)
            errors.append(
                EntryError(entry.id, 403, f"computer {entry.id} is not behind this relay")
            )
            continue
        request = entry.request
        if request.ack > cs.out_seq:
            # Stale state at the relay or its agent (an older generation, a restored
            # database): the ack is ignored, the entry's messages are applied. Refusing
            # the entry (400) would make the relay drop the agent's spooled results
            # for good; acking up to out_seq instead could forget server messages the
            # agent never got. The relay forwards the agent's ack verbatim, so a
            # direct agent with the same ack is still told 400 (server/api/agent.py).
            log.warning(
                "relay %d forwarded ack %d for computer %d, beyond the last message sent "
                "(%d): ack ignored, its messages applied",
                rs.id,
                request.ack,
                entry.id,
                cs.out_seq,
            )
            request = replace(request, ack=cs.out_acked)
        # A ``have`` beyond what was ever sent is from an older generation: no hint.
        have = 0 if req.resync or entry.have > cs.out_seq else entry.have
        seen = now if entry.seen is None else min(entry.seen, now)
        if cs.last_seen is None or cs.last_seen < seen:
            cs.last_seen = seen
            cs.dirty = True
        address = cs.address
        if entry.address is not None and entry.request.agent is None:
            address = entry.address  # an info exchange stores it with the rest
            cs.dirty = True
        # Its agent speaks through the relay: tickle the relay.
        fleet.reach(cs, address, cs.tickle_port, True)
        jobs.append(
            ExchangeJob(cs, request, entry.address or cs.address, have, cs.last_seen, budget)
        )
    return jobs, errors


def _extra_jobs(
    rs: RelayState, skip: set[int], now: float, budget: ReplyBudget
) -> list[ExchangeJob]:
    """The relay's other computers for which the server holds messages the relay lacks."""
    jobs = []
    for cid, cs in rs.computers.items():
        if cid in skip or identity.blocked(cs):  # flagged: no work for it (server/identity.py)
            continue
        have = rs.have.get(cid, 0)
        if cs.has_work or cs.out_seq > max(cs.out_acked, have):
            seen = now if cs.last_seen is None else cs.last_seen  # not heard now
            req = AgentRequest(ack=cs.out_acked)
            jobs.append(ExchangeJob(cs, req, cs.address, have, seen, budget))
    return jobs


async def exchange(ex: Exchange, fleet: Fleet, rs: RelayState, req: RelayRequest) -> Outcome:
    """Apply a relay exchange that is not quiet (see :func:`quiet`)."""
    now = ex.clock()
    if req.resync:
        rs.have.clear()
    budget = ReplyBudget(RELAY_REPLY_MAX_BYTES)
    jobs, errors = _entry_jobs(fleet, rs, req, now, budget)
    # Cleared before looking: work that comes meanwhile sets it again.
    scan = rs.has_work or req.resync
    rs.has_work = False
    asked = {e.id for e in req.entries}
    if scan:
        jobs += _extra_jobs(rs, asked | {e.id for e in req.errors}, now, budget)
    metrics.RELAY_ENTRIES.observe(len(jobs))
    results = await ex.exchange_all(jobs)
    out: list[ComputerOut] = []
    more = False
    for job, res in zip(jobs, results, strict=True):
        cid = job.cs.id
        if isinstance(res, BaseException):
            rs.has_work = True  # what it was to get is still there: look again next time
            if isinstance(res, ProtocolError):
                errors.append(EntryError(cid, 400, f"bad exchange: {res}"))
            else:
                log.error("relay %d: exchange of computer %d failed: %r", rs.id, cid, res)
                errors.append(EntryError(cid, 500, "the server could not apply it; retry later"))
            continue
        have = max(job.have, res["sent"])
        if have > job.cs.out_acked:
            rs.have[cid] = have
        else:
            rs.have.pop(cid, None)
        if res["more"]:
            more = rs.has_work = True
        full = bool(res.get("inventory_full"))
        if res["messages"] or res["more"] or cid in asked or full:
            out.append(ComputerOut(cid, res["ack"], res["messages"], res["more"], full))
    for e in errors:
        metrics.RELAY_REFUSED_ENTRIES.labels(str(e.status)).inc()
    return Outcome(out, errors, more)
