"""Workers that run server tasks."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa

from taskfleet.server.api.deps import (
    Rt,
    Viewer,
    router_for,
)
from taskfleet.server.kernel import ApiError
from taskfleet.store.schema import workers as workers_table

log = logging.getLogger("taskfleet.server")
router = router_for()


@router.get("/api/v1/workers", tags=["tasks"])
async def list_workers(rt: Rt, p: Viewer) -> list[dict[str, Any]]:
    """Workers are process-wide (no tenant's): only the super-admin sees them."""
    if not p.super_admin or p.via is not None:
        raise ApiError(403, "workers serve every tenant: only the super-admin sees them")
    async with rt.read.connect() as conn:
        rows = await conn.execute(sa.select(workers_table).order_by(workers_table.c.started_at))
        return [dict(r._mapping) for r in rows]
