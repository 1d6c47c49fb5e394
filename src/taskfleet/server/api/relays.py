"""Relays: list, show, assign a group's computers (``server/relays.py``)."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from taskfleet.server import relays
from taskfleet.server.api.deps import Admin, Id, Rt, Viewer, read, router_for
from taskfleet.server.runtime import fleet_changed

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
        # The relays fetch their new rosters now, not at their next poll; agents talking
        # to the server directly are woken so their next reply names their relay; those
        # behind another relay are woken once it has its new roster (relay_exchange.py).
        direct, changed = rt.fleet.assign(ids, relay_id)
        fleet_changed(rt, computer_ids=ids)
        rt.tickler.wake_relays(changed)
        rt.tickler.wake(direct)

    ids = await rt.writer.run(
        lambda c: relays.assign(c, p, relay_id, body.group, rt.now()), after=after
    )
    log.info("relay %d: %d computers of group %s assigned", relay_id, len(ids), body.group)
    return {"relay_id": relay_id, "group": body.group, "computers": ids}
