"""Administrative operations on the store: tokens, enrollment, groups, requests, cancel.

Contract: every function takes an open connection and the caller's tenant and
touches only that tenant's rows; functions that write are run by the single
writer (``Writer.run``). Bad input raises :class:`ApiError` with an HTTP status
and a message that says what is wrong, before anything is written.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.lifecycle import RuleError, initial_state, plan_waves
from taskfleet.domain.policy import validate_agent_policy, validate_policy
from taskfleet.domain.progress import progress
from taskfleet.domain.scripts import (
    EXECUTE_SCRIPT,
    policy_refusal,
    validate_script_params,
    validate_timeout,
)
from taskfleet.domain.states import (
    ActivityKind,
    Cause,
    IllegalTransition,
    State,
    creation,
    transition,
)
from taskfleet.domain.targets import (
    Target,
    TargetError,
    TargetKind,
    parse_target,
    tag_value_problem,
    valid_name,
    valid_tag_key,
)
from taskfleet.protocol.exchange import MAX_VERSION_CHARS, clean_json, clean_text
from taskfleet.protocol.signing import new_signing_seed
from taskfleet.server.fleet import ComputerState, hash_secret
from taskfleet.server.kernel import (
    DEFAULT_TENANT,
    ROLES,
    ApiError,
    Principal,
    audit,
    state_counts,
    token_hash,
)
from taskfleet.server.lifecycle import Options, check_options, iso
from taskfleet.settings import OUTPUT_CAP, OUTPUT_CAP_MAX
from taskfleet.store.activities import Change, apply_changes, insert_activities, insert_events
from taskfleet.store.schema import (
    activities,
    activity_events,
    api_tokens,
    audit_log,
    computer_tags,
    computers,
    group_members,
    groups,
    outbox,
    requests,
    server_secrets,
    tenants,
)

# -- bootstrap -----------------------------------------------------------------


async def bootstrap(conn: AsyncConnection, now: float) -> tuple[dict[str, bytes], str | None]:
    """Create the default tenant and server keys; return (keys, new admin token or None)."""
    tenant = (
        await conn.execute(sa.select(tenants.c.id).where(tenants.c.name == DEFAULT_TENANT))
    ).scalar()
    if tenant is None:
        tenant = (
            await conn.execute(
                tenants.insert().values(name=DEFAULT_TENANT, created_at=now).returning(tenants.c.id)
            )
        ).scalar_one()
    keys = {r.name: r.value for r in await conn.execute(sa.select(server_secrets))}
    for name in ("signing_seed", "tickle_master"):
        if name not in keys:
            keys[name] = new_signing_seed() if name == "signing_seed" else secrets.token_bytes(32)
            await conn.execute(server_secrets.insert().values(name=name, value=keys[name]))
    has_admin = (
        await conn.execute(
            sa.select(sa.func.count())
            .select_from(api_tokens)
            .where(api_tokens.c.kind == "admin", api_tokens.c.role == "admin")
        )
    ).scalar_one()
    token = None
    if not has_admin:
        token = "tfa_" + secrets.token_urlsafe(32)
        await conn.execute(
            api_tokens.insert().values(
                tenant_id=tenant,
                name="bootstrap",
                kind="admin",
                role="admin",
                token_hash=token_hash(token),
                created_at=now,
                revoked=False,
            )
        )
    return keys, token


# -- tokens --------------------------------------------------------------------


async def resolve_token(conn: AsyncConnection, token: str, now: float) -> Principal | None:
    row = (
        await conn.execute(
            sa.select(api_tokens).where(
                api_tokens.c.token_hash == token_hash(token), api_tokens.c.kind == "admin"
            )
        )
    ).first()
    if row is None or row.revoked or (row.expires_at is not None and row.expires_at < now):
        return None
    return Principal(row.id, row.tenant_id, row.role, row.name)


async def create_token(
    conn: AsyncConnection,
    p: Principal,
    now: float,
    *,
    kind: str,
    name: str,
    role: str | None,
    expires_in: float | None,
    max_uses: int | None,
    group: str | None,
) -> dict[str, Any]:
    if kind not in ("admin", "enroll"):
        raise ApiError(400, "kind must be admin or enroll")
    if kind == "admin" and role not in ROLES:
        raise ApiError(400, f"role must be one of {', '.join(ROLES)}")
    if kind == "enroll" and role is not None:
        raise ApiError(400, "enrollment tokens have no role")
    if not name or len(name) > 128:
        raise ApiError(400, "name must be 1..128 characters")
    if expires_in is not None and expires_in <= 0:
        raise ApiError(400, "expires_in must be a positive number of seconds")
    if max_uses is not None and (kind != "enroll" or max_uses <= 0):
        raise ApiError(400, "max_uses is a positive number, for enrollment tokens only")
    if group is not None:
        if kind != "enroll":
            raise ApiError(400, "group is for enrollment tokens only")
        await _group_id(conn, p.tenant_id, group)
    token = ("tfa_" if kind == "admin" else "tfe_") + secrets.token_urlsafe(32)
    token_id = (
        await conn.execute(
            api_tokens.insert()
            .values(
                tenant_id=p.tenant_id,
                name=name,
                kind=kind,
                role=role,
                token_hash=token_hash(token),
                created_at=now,
                expires_at=None if expires_in is None else now + expires_in,
                uses_left=max_uses,
                group_name=group,
                revoked=False,
            )
            .returning(api_tokens.c.id)
        )
    ).scalar_one()
    await audit(conn, p, "token.create", now, id=token_id, kind=kind, role=role, name=name)
    return {"id": token_id, "token": token, "kind": kind, "role": role, "name": name}


async def list_tokens(conn: AsyncConnection, p: Principal) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(
            api_tokens.c.id,
            api_tokens.c.name,
            api_tokens.c.kind,
            api_tokens.c.role,
            api_tokens.c.created_at,
            api_tokens.c.expires_at,
            api_tokens.c.uses_left,
            api_tokens.c.group_name,
            api_tokens.c.revoked,
        )
        .where(api_tokens.c.tenant_id == p.tenant_id)
        .order_by(api_tokens.c.id)
    )
    return [dict(r._mapping) for r in rows]


def _valid_admin(tenant_id: int, now: float) -> Any:
    """Where-clause: the tenant's admin-role API tokens that authenticate at ``now``."""
    return sa.and_(
        api_tokens.c.tenant_id == tenant_id,
        api_tokens.c.kind == "admin",
        api_tokens.c.role == "admin",
        api_tokens.c.revoked.is_(False),
        sa.or_(api_tokens.c.expires_at.is_(None), api_tokens.c.expires_at >= now),
    )


async def revoke_token(conn: AsyncConnection, p: Principal, token_id: int, now: float) -> None:
    row = (
        await conn.execute(
            sa.select(api_tokens.c.id).where(
                api_tokens.c.id == token_id, api_tokens.c.tenant_id == p.tenant_id
            )
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no token {token_id}")
    # Revoking the tenant's last valid admin token would lock everyone out for good
    # (no token could create another); the single writer serialises this check.
    valid_admins = set(
        (await conn.execute(sa.select(api_tokens.c.id).where(_valid_admin(p.tenant_id, now))))
        .scalars()
        .all()
    )
    if valid_admins == {token_id}:
        raise ApiError(
            409,
            f"token {token_id} is the last valid admin token of this tenant: create another "
            "admin token first (or mint one on the server: taskfleet server mint-admin-token)",
        )
    await conn.execute(api_tokens.update().where(api_tokens.c.id == token_id).values(revoked=True))
    await audit(conn, p, "token.revoke", now, id=token_id)


async def mint_admin_token(
    conn: AsyncConnection, now: float, *, tenant: str = DEFAULT_TENANT, actor: str
) -> tuple[int, str]:
    """A new admin-role token for ``tenant`` (recovery from the server's data folder).

    Run by ``taskfleet server mint-admin-token`` with direct database access, not
    through the API: it is the way back in when no admin token is left."""
    tenant_id = (
        await conn.execute(sa.select(tenants.c.id).where(tenants.c.name == tenant))
    ).scalar()
    if tenant_id is None:
        raise ApiError(404, f"no tenant {tenant!r}")
    token = "tfa_" + secrets.token_urlsafe(32)
    token_id = (
        await conn.execute(
            api_tokens.insert()
            .values(
                tenant_id=tenant_id,
                name="minted",
                kind="admin",
                role="admin",
                token_hash=token_hash(token),
                created_at=now,
                revoked=False,
            )
            .returning(api_tokens.c.id)
        )
    ).scalar_one()
    await conn.execute(
        audit_log.insert().values(
            tenant_id=tenant_id,
            at=now,
            actor=actor,
            action="token.mint",
            detail={"id": token_id, "kind": "admin", "role": "admin", "name": "minted"},
        )
    )
    return int(token_id), token


# -- enrollment ----------------------------------------------------------------


@dataclass
class Enrolled:
    state: ComputerState
    secret: str
    reenrolled: bool
    canceled: int


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
) -> Enrolled:
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
    existing = (
        await conn.execute(
            sa.select(computers.c.id, computers.c.generation).where(
                computers.c.tenant_id == tenant_id, computers.c.machine_id == machine_id
            )
        )
    ).first()
    values = {
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
    canceled = 0
    if existing is not None:
        # SPEC 9: a rebuilt machine must never run stale work.
        computer_id, generation = existing.id, existing.generation + 1
        canceled = len(await _cancel_open_work(conn, tenant_id, computer_id, now))
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
            detail={"computer_id": computer_id, "hostname": hostname, "canceled": canceled},
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
    return Enrolled(state, secret, existing is not None, canceled)


async def _cancel_open_work(
    conn: AsyncConnection,
    tenant_id: int,
    computer_id: int,
    now: float,
    *,
    cause: Cause = Cause.REENROLLED,
    actor: str = "server",
    reason: str = "re-enrolled",
) -> list[int]:
    rows = (
        await conn.execute(
            sa.select(activities.c.id, activities.c.state).where(
                activities.c.computer_id == computer_id,
                activities.c.tenant_id == tenant_id,
                activities.c.state.notin_(
                    [s.value for s in (State.FAILED, State.SUCCEEDED, State.CANCELED)]
                ),
            )
        )
    ).all()
    changes = [
        Change(
            r.id,
            tenant_id,
            transition(
                ActivityKind.CLIENT,
                State(r.state),
                State.CANCELED,
                cause=cause,
                actor=actor,
                at=now,
                reason=reason,
            ),
            {"finished_at": now},
        )
        for r in rows
    ]
    await apply_changes(conn, changes)
    return [r.id for r in rows]


# -- removal ---------------------------------------------------------------------


@dataclass
class Removed:
    computer_id: int
    hostname: str
    removed_at: float
    canceled: list[int]


async def remove_computer(
    conn: AsyncConnection, p: Principal, computer_id: int, now: float
) -> Removed:
    """Take a computer off the fleet; its row, activities and events stay readable.

    Its open activities are Canceled (with the reason), its queued messages,
    group memberships and tags go; the caller drops it from the in-memory fleet
    after the commit, so its credentials stop working at once."""
    row = (
        await conn.execute(
            sa.select(computers.c.hostname, computers.c.removed_at).where(
                computers.c.id == computer_id, computers.c.tenant_id == p.tenant_id
            )
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no computer {computer_id}")
    if row.removed_at is not None:
        raise ApiError(409, f"computer {computer_id} was already removed")
    canceled = await _cancel_open_work(
        conn,
        p.tenant_id,
        computer_id,
        now,
        cause=Cause.ADMIN,
        actor=p.actor,
        reason=f"computer {computer_id} ({row.hostname}) was removed from the fleet",
    )
    await conn.execute(outbox.delete().where(outbox.c.computer_id == computer_id))
    await conn.execute(group_members.delete().where(group_members.c.computer_id == computer_id))
    await conn.execute(computer_tags.delete().where(computer_tags.c.computer_id == computer_id))
    await conn.execute(
        computers.update().where(computers.c.id == computer_id).values(removed_at=now)
    )
    await audit(
        conn,
        p,
        "computer.remove",
        now,
        computer_id=computer_id,
        hostname=row.hostname,
        canceled=len(canceled),
    )
    return Removed(computer_id, row.hostname, now, canceled)


# -- groups and tags -----------------------------------------------------------


async def _group_id(conn: AsyncConnection, tenant_id: int, name: str) -> int:
    gid = (
        await conn.execute(
            sa.select(groups.c.id).where(groups.c.tenant_id == tenant_id, groups.c.name == name)
        )
    ).scalar()
    if gid is None:
        raise ApiError(404, f"unknown group {name!r}")
    return int(gid)


async def _check_computers(conn: AsyncConnection, tenant_id: int, ids: list[int]) -> None:
    if not ids:
        raise ApiError(400, "no computer ids given")
    rows = (
        await conn.execute(
            sa.select(computers.c.id, computers.c.removed_at).where(
                computers.c.tenant_id == tenant_id, computers.c.id.in_(ids)
            )
        )
    ).all()
    found = {r.id for r in rows}
    missing = [i for i in ids if i not in found]
    if missing:
        raise ApiError(404, f"unknown computer(s): {', '.join(map(str, missing))}")
    removed = sorted(r.id for r in rows if r.removed_at is not None)
    if removed:
        raise ApiError(404, f"removed computer(s): {', '.join(map(str, removed))}")


async def create_group(
    conn: AsyncConnection, p: Principal, name: str, now: float
) -> dict[str, Any]:
    if not valid_name(name):
        raise ApiError(400, f"invalid group name {name!r}: letters, digits, _ . - (max 64)")
    exists = (
        await conn.execute(
            sa.select(groups.c.id).where(groups.c.tenant_id == p.tenant_id, groups.c.name == name)
        )
    ).scalar()
    if exists is not None:
        raise ApiError(409, f"group {name!r} already exists")
    gid = (
        await conn.execute(
            groups.insert()
            .values(tenant_id=p.tenant_id, name=name, created_at=now)
            .returning(groups.c.id)
        )
    ).scalar_one()
    await audit(conn, p, "group.create", now, name=name)
    return {"id": gid, "name": name, "members": []}


async def delete_group(conn: AsyncConnection, p: Principal, name: str, now: float) -> None:
    gid = await _group_id(conn, p.tenant_id, name)
    await conn.execute(group_members.delete().where(group_members.c.group_id == gid))
    await conn.execute(groups.delete().where(groups.c.id == gid))
    await audit(conn, p, "group.delete", now, name=name)


async def set_members(
    conn: AsyncConnection, p: Principal, name: str, ids: list[int], add: bool, now: float
) -> None:
    gid = await _group_id(conn, p.tenant_id, name)
    if len(set(ids)) != len(ids):
        raise ApiError(400, "computer ids repeat; give each once")
    await _check_computers(conn, p.tenant_id, ids)
    await conn.execute(
        group_members.delete().where(
            group_members.c.group_id == gid, group_members.c.computer_id.in_(ids)
        )
    )
    if add:
        await conn.execute(
            group_members.insert(),
            [{"group_id": gid, "computer_id": i, "tenant_id": p.tenant_id} for i in ids],
        )
    await audit(conn, p, "group.add" if add else "group.remove", now, name=name, computers=ids)


async def list_groups(conn: AsyncConnection, p: Principal) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(groups.c.name, sa.func.count(group_members.c.computer_id).label("size"))
        .select_from(groups.outerjoin(group_members, group_members.c.group_id == groups.c.id))
        .where(groups.c.tenant_id == p.tenant_id)
        .group_by(groups.c.name)
        .order_by(groups.c.name)
    )
    return [{"name": r.name, "size": r.size} for r in rows]


async def set_tag(
    conn: AsyncConnection, p: Principal, computer_id: int, key: str, value: str | None, now: float
) -> None:
    if not valid_tag_key(key):
        raise ApiError(400, f"invalid tag key {key!r}")
    problem = None if value is None else tag_value_problem(value)
    if problem is not None:
        raise ApiError(400, problem)
    await _check_computers(conn, p.tenant_id, [computer_id])
    existed = await conn.execute(
        computer_tags.delete().where(
            computer_tags.c.computer_id == computer_id, computer_tags.c.key == key
        )
    )
    if value is None and existed.rowcount == 0:
        raise ApiError(404, f"computer {computer_id} has no tag {key!r}")
    if value is not None:
        await conn.execute(
            computer_tags.insert().values(
                computer_id=computer_id, key=key, value=value, tenant_id=p.tenant_id
            )
        )
    await audit(
        conn,
        p,
        "tag.set" if value is not None else "tag.remove",
        now,
        computer=computer_id,
        key=key,
        value=value,
    )


# -- requests and activities ---------------------------------------------------


async def resolve_target(conn: AsyncConnection, tenant_id: int, target: Target) -> list[int]:
    c = computers.c
    if target.kind is TargetKind.ALL:
        q = sa.select(c.id).where(c.tenant_id == tenant_id, c.removed_at.is_(None))
    elif target.kind is TargetKind.GROUP:
        gid = await _group_id(conn, tenant_id, target.name)
        q = sa.select(group_members.c.computer_id).where(group_members.c.group_id == gid)
    elif target.kind is TargetKind.TAG:
        q = sa.select(computer_tags.c.computer_id).where(
            computer_tags.c.tenant_id == tenant_id,
            computer_tags.c.key == target.name,
            computer_tags.c.value == target.value,
        )
    else:
        await _check_computers(conn, tenant_id, list(target.computer_ids))
        return list(target.computer_ids)
    ids = sorted(int(i) for i in (await conn.execute(q)).scalars())
    if not ids:
        what = {
            "all": "no computers are enrolled",
            "group": f"group {target.name!r} is empty",
            "tag": f"no computer has tag {target.name}={target.value}",
        }[target.kind.value]
        raise ApiError(404 if target.kind is TargetKind.TAG else 400, f"nothing to target: {what}")
    return ids


@dataclass
class Created:
    request: dict[str, Any]
    computer_ids: list[int]


async def create_request(
    conn: AsyncConnection,
    p: Principal,
    now: float,
    *,
    type: str,
    target: str,
    params: Any,
    timeout: Any,
    policy: Any = None,
    expires_in: float | None = None,
    options: Options | None = None,
    schedule_id: int | None = None,
) -> Created:
    if type != EXECUTE_SCRIPT:
        raise ApiError(400, f"unknown activity type {type!r} (known: {EXECUTE_SCRIPT})")
    try:
        parsed = parse_target(target)
        clean = validate_script_params(params, default_cap=OUTPUT_CAP, max_cap=OUTPUT_CAP_MAX)
        limit = validate_timeout(timeout)
        run_policy = validate_policy(policy)
        if expires_in is not None and not 0 < expires_in <= 366 * 86400:
            raise ValueError("expires_in must be a number of seconds in (0, 366 days]")
    except (TargetError, ValueError) as exc:
        raise ApiError(400, str(exc)) from None
    ids = await resolve_target(conn, p.tenant_id, parsed)
    expires_at = None if expires_in is None else now + expires_in
    return await _create(
        conn,
        p,
        now,
        type,
        str(parsed),
        clean,
        limit,
        run_policy,
        ids,
        expires_at,
        options,
        schedule_id,
    )


def check_template(
    *, type: str, target: str, params: Any, timeout: Any, policy: Any, expires_in: Any
) -> None:
    """What create_request checks before touching the store, for a schedule's template."""
    if type != EXECUTE_SCRIPT:
        raise ApiError(400, f"unknown activity type {type!r} (known: {EXECUTE_SCRIPT})")
    try:
        parse_target(target)
        validate_script_params(params, default_cap=OUTPUT_CAP, max_cap=OUTPUT_CAP_MAX)
        validate_timeout(timeout)
        validate_policy(policy)
        if expires_in is not None and not 0 < expires_in <= 366 * 86400:
            raise ValueError("expires_in must be a number of seconds in (0, 366 days]")
    except (TargetError, ValueError) as exc:
        raise ApiError(400, str(exc)) from None


async def rerun_failed(conn: AsyncConnection, p: Principal, now: float, request_id: int) -> Created:
    """SPEC 9: a new request, same work, aimed only at the computers that failed."""
    old = await get_request(conn, p, request_id)
    ids = sorted(
        int(i)
        for i in (
            await conn.execute(
                sa.select(activities.c.computer_id)
                .join(computers, computers.c.id == activities.c.computer_id)
                .where(
                    activities.c.request_id == request_id,
                    activities.c.state == State.FAILED.value,
                    computers.c.removed_at.is_(None),  # a removed computer gets no new work
                )
            )
        ).scalars()
    )
    if not ids:
        raise ApiError(409, f"no computer failed in request {request_id}: nothing to re-run")
    return await _create(
        conn,
        p,
        now,
        old["type"],
        f"failed of request {request_id}",
        old["params"],
        old["timeout"],
        old["policy"] or validate_policy(None),
        ids,
    )


async def _create(
    conn: AsyncConnection,
    p: Principal,
    now: float,
    type: str,
    target: str,
    clean: dict[str, Any],
    limit: float,
    run_policy: dict[str, Any],
    ids: list[int],
    expires_at: float | None = None,
    options: Options | None = None,
    schedule_id: int | None = None,
) -> Created:
    opts = options or Options()
    met = await check_options(conn, p, opts)
    if opts.rollout is not None:
        r = opts.rollout
        try:
            waves = plan_waves(ids, canary=r.canary, size=r.size, share=r.share)
        except RuleError as exc:
            raise ApiError(400, f"rollout: {exc}") from None
    else:
        waves = [ids]
    wave_of = {cid: k for k, wave in enumerate(waves) for cid in wave}
    refusals = []
    for row in await conn.execute(
        sa.select(computers.c.id, computers.c.hostname, computers.c.policy).where(
            computers.c.id.in_(ids)
        )
    ):
        why = policy_refusal(row.policy, clean)
        if why:
            refusals.append(f"{row.id} ({row.hostname}): {why}")
    if refusals:
        shown = "; ".join(refusals[:10]) + (" ..." if len(refusals) > 10 else "")
        raise ApiError(
            409,
            f"{len(refusals)} of {len(ids)} target computers would refuse this script: {shown}",
        )
    request_id = (
        await conn.execute(
            requests.insert()
            .values(
                tenant_id=p.tenant_id,
                type=type,
                params=clean,
                target=target,
                created_by=p.actor,
                created_at=now,
                timeout=limit,
                total=len(ids),
                policy=run_policy,
                not_before=opts.not_before,
                depends_on=opts.after.as_json() if opts.after else None,
                approval=opts.approval,
                rollout=_rollout_json(opts, len(waves)),
                schedule_id=schedule_id,
            )
            .returning(requests.c.id)
        )
    ).scalar_one()
    states: dict[int, tuple[State, str]] = {}
    for cid in ids:
        wave = wave_of[cid] if opts.rollout is not None else None
        state = initial_state(
            approval=opts.approval is not None,
            waits=met is False or bool(wave),
            not_before=opts.not_before,
            now=now,
        )
        states[cid] = (state, _why(state, opts, request_id, wave))
    rows = await insert_activities(
        conn,
        [
            {
                "tenant_id": p.tenant_id,
                "request_id": request_id,
                "computer_id": cid,
                "kind": ActivityKind.CLIENT.value,
                "type": type,
                "state": states[cid][0].value,
                "created_at": now,
                "updated_at": now,
                "reason": states[cid][1],
                "expires_at": expires_at,
                "not_before": opts.not_before,
                "wave": wave_of[cid] if opts.rollout is not None else None,
            }
            for cid in ids
        ],
    )
    await insert_events(
        conn,
        [
            (
                aid,
                p.tenant_id,
                creation(states[cid][0], actor=p.actor, at=now, reason=states[cid][1]),
            )
            for aid, cid in zip(rows, ids, strict=True)
        ],
    )
    await audit(
        conn,
        p,
        "request.create",
        now,
        id=request_id,
        type=type,
        target=target,
        computers=len(ids),
        **({} if opts.empty else {"options": _options_json(opts)}),
    )
    ready = [cid for cid in ids if states[cid][0] in (State.QUEUED, State.SCHEDULED)]
    return Created(await get_request(conn, p, request_id), ready)


def _rollout_json(opts: Options, waves: int) -> dict[str, Any] | None:
    r = opts.rollout
    if r is None:
        return None
    return {
        "canary": r.canary,
        "size": r.size,
        "share": r.share,
        "success": r.success,
        "max_failures": r.max_failures,
        "waves": waves,
        "paused": False,
    }


def _options_json(opts: Options) -> dict[str, Any]:
    return {
        "not_before": opts.not_before,
        "after": opts.after.as_json() if opts.after else None,
        "approval": opts.approval,
        "rollout": _rollout_json(opts, 0),
    }


def _why(state: State, opts: Options, request_id: int, wave: int | None) -> str:
    """The creation event's reason: why the activity starts in ``state``."""
    head = f"request {request_id}" + ("" if wave is None else f", rollout wave {wave}")
    if state is State.BLOCKED:
        return f"{head}; needs approval"
    if state is State.WAITING:
        if opts.after is not None and not wave:
            return f"{head}; waits for {opts.after.describe()}"
        return (
            f"{head}; waits for wave {(wave or 1) - 1} to reach {opts.rollout.success:g}% succeeded"
            if opts.rollout
            else head
        )
    if state is State.SCHEDULED and opts.not_before is not None:
        return f"{head}; not earlier than {iso(opts.not_before)}"
    return head


@dataclass(frozen=True)
class BulkFilter:
    """Which unfinished client activities a bulk cancel takes (all given filters apply)."""

    state: str | None = None
    type: str | None = None
    group: str | None = None
    older_than: float | None = None  # seconds since creation
    request_id: int | None = None


async def check_bulk(conn: AsyncConnection, p: Principal, f: BulkFilter) -> None:
    final = {s.value for s in (State.FAILED, State.SUCCEEDED, State.CANCELED)}
    if f.state is not None:
        if f.state not in {s.value for s in State}:
            raise ApiError(400, f"unknown state {f.state!r}")
        if f.state in final:
            raise ApiError(
                400, f"{State(f.state).label} activities are finished: nothing to cancel"
            )
    if f.older_than is not None and f.older_than < 0:
        raise ApiError(400, "older_than must be a number of seconds >= 0")
    if f.group is not None:
        await _group_id(conn, p.tenant_id, f.group)
    if f.request_id is not None:
        await get_request(conn, p, f.request_id)


def bulk_query(p: Principal, f: BulkFilter, now: float) -> sa.Select[Any]:
    final = [s.value for s in (State.FAILED, State.SUCCEEDED, State.CANCELED)]
    q = sa.select(activities.c.id, activities.c.state, activities.c.computer_id).where(
        activities.c.tenant_id == p.tenant_id,
        activities.c.kind == ActivityKind.CLIENT.value,
        activities.c.state.notin_(final),
    )
    if f.state is not None:
        q = q.where(activities.c.state == f.state)
    if f.type is not None:
        q = q.where(activities.c.type == f.type)
    if f.older_than is not None:
        q = q.where(activities.c.created_at < now - f.older_than)
    if f.request_id is not None:
        q = q.where(activities.c.request_id == f.request_id)
    if f.group is not None:
        q = q.join(group_members, group_members.c.computer_id == activities.c.computer_id).join(
            groups,
            (groups.c.id == group_members.c.group_id)
            & (groups.c.name == f.group)
            & (groups.c.tenant_id == p.tenant_id),
        )
    return q.order_by(activities.c.id)


@dataclass
class Canceled:
    ids: list[int]
    # computer id -> cancel messages to send; appended to the outbox already
    notify: dict[int, int]


async def cancel(
    conn: AsyncConnection,
    p: Principal,
    now: float,
    seq_of: Callable[[int], int],
    *,
    activity_id: int | None = None,
    request_id: int | None = None,
    bulk: BulkFilter | None = None,
    reason: str = "",
) -> Canceled:
    """Cancel one activity (illegal from a final state) or every open child of a request.

    ``seq_of(computer_id)`` gives the last server seq used; the caller applies
    the returned counts to the in-memory fleet after the commit.
    """
    q = sa.select(activities.c.id, activities.c.state, activities.c.computer_id).where(
        activities.c.tenant_id == p.tenant_id
    )
    if activity_id is not None:
        rows = (await conn.execute(q.where(activities.c.id == activity_id))).all()
        if not rows:
            raise ApiError(404, f"no activity {activity_id}")
    elif bulk is not None:
        rows = list(await conn.execute(bulk_query(p, bulk, now)))
    else:
        await get_request(conn, p, request_id or 0)  # 404 if not ours
        rows = [
            r
            for r in (await conn.execute(q.where(activities.c.request_id == request_id))).all()
            if State(r.state) not in (State.FAILED, State.SUCCEEDED, State.CANCELED)
        ]
    why = reason or "canceled by administrator"
    changes: list[Change] = []
    notify: dict[int, int] = {}
    out_rows: list[dict[str, Any]] = []
    for r in rows:
        try:
            t = transition(
                ActivityKind.CLIENT,
                State(r.state),
                State.CANCELED,
                cause=Cause.ADMIN,
                actor=p.actor,
                at=now,
                reason=why,
            )
        except IllegalTransition as exc:
            raise ApiError(409, str(exc)) from None
        changes.append(Change(r.id, p.tenant_id, t, {"finished_at": now}))
        if State(r.state) is State.IN_PROGRESS:
            # SPEC 2.1: stays Canceled; the agent is told to stop and its report recorded.
            seq = seq_of(r.computer_id) + notify.get(r.computer_id, 0) + 1
            notify[r.computer_id] = notify.get(r.computer_id, 0) + 1
            out_rows.append(
                {
                    "computer_id": r.computer_id,
                    "seq": seq,
                    "tenant_id": p.tenant_id,
                    "message": orjson.dumps({"seq": seq, "type": "cancel", "op": r.id}).decode(),
                }
            )
    await apply_changes(conn, changes)
    if out_rows:
        await conn.execute(outbox.insert(), out_rows)
        await conn.execute(
            computers.update()
            .where(computers.c.id == sa.bindparam("b_id"))
            .values(out_seq=sa.bindparam("seq")),
            [{"b_id": cid, "seq": seq_of(cid) + n} for cid, n in notify.items()],
        )
    await audit(
        conn,
        p,
        "activity.cancel" if activity_id else "bulk.cancel" if bulk else "request.cancel",
        now,
        id=activity_id or request_id,
        canceled=len(changes),
    )
    return Canceled([r.id for r in rows], notify)


# -- reads ---------------------------------------------------------------------


async def get_request(conn: AsyncConnection, p: Principal, request_id: int) -> dict[str, Any]:
    row = (
        await conn.execute(
            sa.select(requests).where(
                requests.c.id == request_id, requests.c.tenant_id == p.tenant_id
            )
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no request {request_id}")
    prog = progress(await state_counts(conn, activities.c.request_id == request_id))
    out = dict(row._mapping)
    out.pop("tenant_id")
    out["progress"] = {
        "counts": {k: v for k, v in prog.counts.items() if v},
        "total": prog.total,
        "finished": prog.finished,
        "succeeded": prog.succeeded,
        "done": prog.done,
    }
    return out


async def list_requests(conn: AsyncConnection, p: Principal, limit: int) -> list[dict[str, Any]]:
    ids = (
        await conn.execute(
            sa.select(requests.c.id)
            .where(requests.c.tenant_id == p.tenant_id)
            .order_by(requests.c.id.desc())
            .limit(limit)
        )
    ).scalars()
    return [await get_request(conn, p, i) for i in ids]


_LIST_COLUMNS = (
    activities.c.id,
    activities.c.request_id,
    activities.c.computer_id,
    activities.c.type,
    activities.c.state,
    activities.c.created_at,
    activities.c.updated_at,
    activities.c.delivered_at,
    activities.c.finished_at,
    activities.c.exit_code,
    activities.c.result_line,
    activities.c.agent_started_at,
    activities.c.agent_ended_at,
    activities.c.reason,
)


async def list_activities(
    conn: AsyncConnection,
    p: Principal,
    *,
    request_id: int | None,
    computer_id: int | None,
    state: str | None,
    limit: int,
    with_output: bool = False,
) -> list[dict[str, Any]]:
    cols = [*list(_LIST_COLUMNS), computers.c.hostname]
    if with_output:
        cols += [activities.c.stdout, activities.c.stderr]
    q = (
        sa.select(*cols)
        .select_from(activities.outerjoin(computers, computers.c.id == activities.c.computer_id))
        .where(activities.c.tenant_id == p.tenant_id)
    )
    if request_id is not None:
        q = q.where(activities.c.request_id == request_id)
    if computer_id is not None:
        q = q.where(activities.c.computer_id == computer_id)
    if state is not None:
        try:
            q = q.where(activities.c.state == State(state).value)
        except ValueError:
            raise ApiError(400, f"unknown state {state!r}") from None
    rows = await conn.execute(q.order_by(activities.c.id.desc()).limit(limit))
    return [dict(r._mapping) for r in rows]


async def get_activity(conn: AsyncConnection, p: Principal, activity_id: int) -> dict[str, Any]:
    row = (
        await conn.execute(
            sa.select(activities, computers.c.hostname)
            .select_from(
                activities.outerjoin(computers, computers.c.id == activities.c.computer_id)
            )
            .where(activities.c.id == activity_id, activities.c.tenant_id == p.tenant_id)
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no activity {activity_id}")
    out = dict(row._mapping)
    out.pop("tenant_id")
    out["history"] = [
        dict(e._mapping)
        for e in await conn.execute(
            sa.select(
                activity_events.c.from_state,
                activity_events.c.to_state,
                activity_events.c.cause,
                activity_events.c.actor,
                activity_events.c.at,
                activity_events.c.reason,
            )
            .where(activity_events.c.activity_id == activity_id)
            .order_by(activity_events.c.id)
        )
    ]
    return out


async def list_computers(
    conn: AsyncConnection, p: Principal, *, only: int | None = None
) -> list[dict[str, Any]]:
    """The tenant's computers; removed ones only when asked for by id (``only``)."""
    where = [computers.c.removed_at.is_(None)] if only is None else [computers.c.id == only]
    rows = (
        await conn.execute(
            sa.select(
                computers.c.id,
                computers.c.hostname,
                computers.c.enrolled_at,
                computers.c.last_seen_at,
                computers.c.address,
                computers.c.tickle_port,
                computers.c.agent_version,
                computers.c.generation,
                computers.c.policy,
                computers.c.removed_at,
            )
            .where(computers.c.tenant_id == p.tenant_id, *where)
            .order_by(computers.c.id)
        )
    ).all()
    tags: dict[int, dict[str, str]] = {}
    for t in await conn.execute(
        sa.select(computer_tags).where(computer_tags.c.tenant_id == p.tenant_id)
    ):
        tags.setdefault(t.computer_id, {})[t.key] = t.value
    member: dict[int, list[str]] = {}
    for m in await conn.execute(
        sa.select(group_members.c.computer_id, groups.c.name)
        .join(groups, groups.c.id == group_members.c.group_id)
        .where(groups.c.tenant_id == p.tenant_id)
    ):
        member.setdefault(m.computer_id, []).append(m.name)
    return [
        {**dict(r._mapping), "tags": tags.get(r.id, {}), "groups": sorted(member.get(r.id, []))}
        for r in rows
    ]


async def get_computer(conn: AsyncConnection, p: Principal, computer_id: int) -> dict[str, Any]:
    for c in await list_computers(conn, p, only=computer_id):
        if c["id"] == computer_id:
            c["activities"] = await list_activities(
                conn, p, request_id=None, computer_id=computer_id, state=None, limit=20
            )
            return c
    raise ApiError(404, f"no computer {computer_id}")


async def list_audit(conn: AsyncConnection, p: Principal, limit: int) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(
            audit_log.c.id,
            audit_log.c.at,
            audit_log.c.actor,
            audit_log.c.action,
            audit_log.c.detail,
        )
        .where(audit_log.c.tenant_id == p.tenant_id)
        .order_by(audit_log.c.id.desc())
        .limit(limit)
    )
    return [dict(r._mapping) for r in rows]
