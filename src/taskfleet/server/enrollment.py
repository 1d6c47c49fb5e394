"""Enrollment: a computer joins the fleet with an enrollment token (SPEC 3, 9).

Contract: the token's limits (expiry, uses, revocation) and the agent's
identity and policy are checked before anything is written; a machine that
enrolls again gets a new generation and its open work is Canceled (a rebuilt
machine never runs stale work); the caller puts the returned state into the
in-memory fleet after the commit. Enrolled through a relay (``relay``), the
computer is put behind it, and the token must be of the relay's tenant (403,
nothing written); enrolled directly again, a computer stays behind its relay.
Each enrollment starts a new identity lineage: a first identity nonce (offered,
``server/identity.py``), the old lineage's nonces and clone flag cleared.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.policy import validate_agent_policy
from taskfleet.protocol.exchange import MAX_VERSION_CHARS, clean_json, clean_text
from taskfleet.server import identity
from taskfleet.server.fleet import ComputerState, hash_secret
from taskfleet.server.inventory import cancel_open_work
from taskfleet.server.kernel import ApiError, tenant_disabled, token_hash
from taskfleet.store.schema import api_tokens, audit_log, computers, group_members, groups, outbox


@dataclass
class Enrolled:
    state: ComputerState
    secret: str
    reenrolled: bool
    canceled: int
    relay_id: int | None = None  # the relay it is behind
    nonce: str = ""  # its first identity nonce (server/identity.py)


@dataclass(frozen=True)
class Via:
    """The relay an enrollment came through."""

    relay_id: int
    tenant_id: int


async def _enroll_token(conn: AsyncConnection, token: str, now: float, relay: Via | None) -> Any:
    """The enrollment token's row if it may enroll a computer now; else the refusal."""
    row = (
        await conn.execute(
            sa.select(api_tokens).where(
                api_tokens.c.token_hash == token_hash(token), api_tokens.c.kind == "enroll"
            )
        )
    ).first()
    if row is None or row.revoked:
        raise ApiError(401, "invalid enrollment token")
    if row.expires_at is not None and row.expires_at < now:
        raise ApiError(401, "enrollment token expired")
    if row.uses_left is not None and row.uses_left <= 0:
        raise ApiError(401, "enrollment token used up")
    if relay is not None and row.tenant_id != relay.tenant_id:
        raise ApiError(403, "the enrollment token is of another tenant than this relay")
    if await tenant_disabled(conn, row.tenant_id):
        raise ApiError(403, "the enrollment token's tenant is disabled")
    return row


async def enroll(
    conn: AsyncConnection,
    now: float,
    *,
    token: str,
    hostname: str,
    machine_id: str,
    tickle_port: int | None,
    version: str,
    policy: dict[str, Any],
    address: str | None,
    relay: Via | None = None,
) -> Enrolled:
    row = await _enroll_token(conn, token, now, relay)
    if not hostname or len(hostname) > 255 or not machine_id or len(machine_id) > 128:
        raise ApiError(400, "hostname (1..255) and machine_id (1..128) are required")
    # Remote text as every database can store it (protocol/exchange.py). The
    # machine id is an identity: altered, two machines could become one.
    if clean_text(machine_id) != machine_id:
        raise ApiError(400, "machine_id must not contain NUL or unpaired surrogates")
    if len(version) > MAX_VERSION_CHARS:
        raise ApiError(
            400, f"version is {len(version)} characters, the limit is {MAX_VERSION_CHARS}"
        )
    hostname, version, policy = clean_text(hostname), clean_text(version), clean_json(policy)
    if tickle_port is not None and not 0 < tickle_port < 65536:
        raise ApiError(400, "tickle_port must be 1..65535 (or null: no UDP wake-ups)")
    try:
        # SPEC 7: the server refuses work the agent would refuse, so what it
        # stores of the agent's policy must be exactly what the agent meant.
        policy = validate_agent_policy(policy)
    except ValueError as exc:
        raise ApiError(400, f"invalid policy: {exc}") from None
    if row.uses_left is not None:
        await conn.execute(
            api_tokens.update().where(api_tokens.c.id == row.id).values(uses_left=row.uses_left - 1)
        )
    tenant_id = row.tenant_id
    secret = "tfc_" + secrets.token_urlsafe(32)
    find = sa.select(computers.c.id, computers.c.generation, computers.c.relay_id).where(
        computers.c.tenant_id == tenant_id, computers.c.machine_id == machine_id
    )
    if conn.dialect.name == "postgresql":
        # Locked before its activities are touched, as an exchange on another server
        # process locks it (server/outbox.py): the same order, no deadlock.
        find = find.with_for_update()
    existing = (await conn.execute(find)).first()
    # A new identity lineage: the old one's nonces and flag go with its secret.
    nonce, nonces = identity.first(now)
    values = {
        **identity.values(nonces),
        "hostname": hostname,
        "secret_hash": hash_secret(secret),
        "enrolled_at": now,
        "last_seen_at": now,
        "address": address,
        "tickle_port": tickle_port,
        "agent_version": version,
        "policy": policy,
        "in_acked": 0,
        "out_seq": 0,
        "out_acked": 0,
        "removed_at": None,  # enrolling a removed machine again brings it back
    }
    relay_id = existing.relay_id if existing is not None else None
    if relay is not None:
        values["relay_id"] = relay_id = relay.relay_id
    canceled = 0
    if existing is not None:
        # SPEC 9: a rebuilt machine must never run stale work.
        computer_id, generation = existing.id, existing.generation + 1
        canceled = len(await cancel_open_work(conn, tenant_id, computer_id, now))
        await conn.execute(outbox.delete().where(outbox.c.computer_id == computer_id))
        await conn.execute(
            computers.update()
            .where(computers.c.id == computer_id)
            .values(generation=generation, **values)
        )
    else:
        generation = 1
        computer_id = (
            await conn.execute(
                computers.insert()
                .values(tenant_id=tenant_id, machine_id=machine_id, generation=1, **values)
                .returning(computers.c.id)
            )
        ).scalar_one()
    if row.group_name:
        gid = (
            await conn.execute(
                sa.select(groups.c.id).where(
                    groups.c.tenant_id == tenant_id, groups.c.name == row.group_name
                )
            )
        ).scalar()
        if gid is not None:
            await conn.execute(
                sa.delete(group_members).where(
                    group_members.c.group_id == gid, group_members.c.computer_id == computer_id
                )
            )
            await conn.execute(
                group_members.insert().values(
                    group_id=gid, computer_id=computer_id, tenant_id=tenant_id
                )
            )
    await conn.execute(
        audit_log.insert().values(
            tenant_id=tenant_id,
            at=now,
            actor=f"enroll-token:{row.id}",
            action="computer.reenroll" if existing is not None else "computer.enroll",
            object=f"computer:{computer_id}",
            detail={
                "computer_id": computer_id,
                "hostname": hostname,
                "canceled": canceled,
                **({"relay_id": relay.relay_id} if relay is not None else {}),
            },
        )
    )
    state = ComputerState(
        computer_id,
        tenant_id,
        hash_secret(secret),
        generation,
        address=address,
        tickle_port=tickle_port,
        last_seen=now,
    )
    state.has_work = False
    state.identity = nonces
    return Enrolled(state, secret, existing is not None, canceled, relay_id, nonce)
