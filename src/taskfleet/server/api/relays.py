"""Relays: list, show, assign a group's computers (``server/relays.py``)."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from taskfleet.server import relays
from taskfleet.server.api.deps import Admin, Id, Rt, Viewer, read, router_for

log = logging.getLogger("taskfleet.server")
router = router_for()


class AssignIn(BaseModel):
    group: str = Field(..., description="the group whose computers go behind the relay")


@router.get("/api/v1/relays", tags=["relays"])
async def list_relays(rt: Rt, p: Viewer) -> list[dict[str, Any]]:
    out = await read(rt, lambda c: relays.list_relays(c, p))
    return [relays.live(rt.fleet, r) for r in out]


@router.get("/api/v1/relays/{relay_id}", tags=["relays"])
async def get_relay(rt: Rt, relay_id: Id, p: Viewer) -> dict[str, Any]:
    return relays.live(rt.fleet, await read(rt, lambda c: relays.get_relay(c, p, relay_id)))


@router.post("/api/v1/relays/{relay_id}/assign", tags=["relays"])
async def assign(rt: Rt, relay_id: Id, body: AssignIn, p: Admin) -> dict[str, Any]:
    # Admin, not operator: the relay gets these computers' secret hashes and tickle keys.

    def after(ids: list[int]) -> None:
        changed = {relay_id: rt.fleet.relays.get(relay_id)}
        for cid in ids:
            cs = rt.fleet.get(cid)
            if cs is not None:
                if cs.relay is not None:
                    changed[cs.relay.id] = cs.relay
                rt.fleet.link(cs, relay_id)
        # Both sides fetch their new rosters now, not at their next poll: the old relay
        # answers the moved agents 503, so they fail over to the server, which names
        # their new relay in its reply (docs/relays.md "Moving computers").
        rt.tickler.wake_relays(rs for rs in changed.values() if rs is not None)

    ids = await rt.writer.run(
        lambda c: relays.assign(c, p, relay_id, body.group, rt.now()), after=after
    )
    log.info("relay %d: %d computers of group %s assigned", relay_id, len(ids), body.group)
    return {"relay_id": relay_id, "group": body.group, "computers": ids}
