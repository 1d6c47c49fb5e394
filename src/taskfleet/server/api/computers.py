"""Computers: list, show (with the inventory), remove, tag (``server/inventory.py``); one
computer's packages, paged (``server/computer_inventory.py``); an administrator's decision
on a flagged identity (``server/identity.py``)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import Response
from pydantic import BaseModel

from taskfleet.server import computer_inventory, identity, inventory, metrics
from taskfleet.server.api.deps import (
    Admin,
    Id,
    Operator,
    Rt,
    Viewer,
    live,
    read,
    router_for,
)
from taskfleet.server.kernel import ApiError
from taskfleet.server.runtime import fleet_changed, give_work

log = logging.getLogger("taskfleet.server")
router = router_for()


class TagIn(BaseModel):
    key: str
    value: str


@router.get("/api/v1/computers", tags=["computers"])
async def list_computers(rt: Rt, p: Viewer, removed: bool = False) -> list[dict[str, Any]]:
    """The computers under management; ``removed=true``: the removed ones (the archive:
    each record and its history kept)."""
    out = await read(rt, lambda c: inventory.list_computers(c, p, removed=removed))
    return [live(rt, c) for c in out]


@router.get("/api/v1/computers/{computer_id}", tags=["computers"])
async def get_computer(rt: Rt, computer_id: Id, p: Viewer) -> dict[str, Any]:
    return live(rt, await read(rt, lambda c: inventory.get_computer(c, p, computer_id)))


@router.get("/api/v1/computers/{computer_id}/packages", tags=["computers"])
async def list_packages(
    rt: Rt,
    computer_id: Id,
    p: Viewer,
    after: str = "",
    limit: int = 1000,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Installed packages (and ones a pending upgrade would install: ``version`` null),
    by name; the next page starts ``after`` the last name of this one."""

    async def rows(c: Any) -> list[dict[str, Any]]:
        if not await inventory.list_computers(c, p, only=computer_id):
            raise ApiError(404, f"no computer {computer_id}")
        return await computer_inventory.list_packages(
            c,
            p.tenant_id,
            computer_id,
            # NUL cannot be in a PostgreSQL text parameter (nor in a package name).
            after=after[:128].replace("\x00", ""),
            limit=min(max(limit, 1), 10_000),
            name=None if name is None else name[:128].replace("\x00", ""),
        )

    return await read(rt, rows)


@router.delete("/api/v1/computers/{computer_id}", tags=["computers"])
async def remove_computer(rt: Rt, computer_id: Id, p: Admin) -> dict[str, Any]:
    # Admin, not operator: SPEC 7 gives operators the work (create, cancel,
    # terminate); removing a computer revokes its credentials, like a token.

    def after(res: inventory.Removed) -> None:
        rt.fleet.remove(res.computer_id)
        fleet_changed(rt, computer_ids=[res.computer_id])
        metrics.COMPUTERS.set(len(rt.fleet.computers))

    res = await rt.writer.run(
        lambda c: inventory.remove_computer(c, p, computer_id, rt.now()), after=after
    )
    await rt.lifecycle_engine.reload_windows()  # it left its groups
    log.info(
        "computer %d (%s) removed, %d open activities canceled",
        res.computer_id,
        res.hostname,
        len(res.canceled),
    )
    return {
        "id": res.computer_id,
        "hostname": res.hostname,
        "removed_at": res.removed_at,
        "canceled": res.canceled,
    }


class IdentityIn(BaseModel):
    decision: Literal["reset"]


@router.post("/api/v1/computers/{computer_id}/identity", tags=["computers"])
async def decide_identity(rt: Rt, computer_id: Id, body: IdentityIn, p: Admin) -> dict[str, Any]:
    """An administrator's decision on a computer flagged because two agents used its
    identity (``identity_conflict``): ``reset`` clears the flag and its identity nonces;
    the next exchange presenting its secret starts a new lineage (a copy that still
    runs is caught again). Removing the computer is the other decision."""

    def after(res: identity.Reset) -> None:
        cs = rt.fleet.get(res.computer_id)
        if cs is not None:
            cs.identity = res.state
            if cs.relay is not None:
                cs.relay.roster_changed()  # its relay stops refusing it, starts afresh
            # Its queued work is handed out at its next exchange: wake it.
            give_work(rt, [cs.id])
        fleet_changed(rt, computer_ids=[res.computer_id])  # the other processes too

    res = await rt.writer.run(
        lambda c: identity.reset_identity(c, p, computer_id, rt.now()), after=after
    )
    log.warning(
        "computer %d (%s): identity reset by %s%s",
        res.computer_id,
        res.hostname,
        p.actor,
        "" if res.was_flagged else " (it was not flagged)",
    )
    return {"id": res.computer_id, "decision": body.decision, "was_flagged": res.was_flagged}


@router.put("/api/v1/computers/{computer_id}/tags", tags=["computers"])
async def set_tag(rt: Rt, computer_id: Id, body: TagIn, p: Operator) -> dict[str, Any]:
    await rt.writer.run(
        lambda c: inventory.set_tag(c, p, computer_id, body.key, body.value, rt.now())
    )
    return {"computer_id": computer_id, "key": body.key, "value": body.value}


@router.delete("/api/v1/computers/{computer_id}/tags/{key}", status_code=204, tags=["computers"])
async def remove_tag(rt: Rt, computer_id: Id, key: str, p: Operator) -> Response:
    await rt.writer.run(lambda c: inventory.set_tag(c, p, computer_id, key, None, rt.now()))
    return Response(status_code=204)
