"""Workers that run server tasks."""

from __future__ import annotations

import logging
from typing import Any

from taskfleet.server import tenants
from taskfleet.server.api.deps import (
    Rt,
    Viewer,
    router_for,
)
from taskfleet.server.kernel import ApiError
from taskfleet.store.tasks import reads

log = logging.getLogger("taskfleet.server")
router = router_for()


@router.get("/api/v1/workers", tags=["tasks"])
async def list_workers(rt: Rt, p: Viewer) -> list[dict[str, Any]]:
    """Workers are process-wide (no tenant's): only the super-admin sees them."""
    if not tenants.sees_infrastructure(p):
        raise ApiError(403, "workers serve every tenant: only the super-admin sees them")
    async with rt.read.connect() as conn:
        return await reads.list_workers(conn)
