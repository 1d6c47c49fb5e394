"""The audit log (admin)."""

from __future__ import annotations

import logging
from typing import Any

from taskfleet.server import kernel
from taskfleet.server.api.deps import (
    Admin,
    Rt,
    read,
    router_for,
)

log = logging.getLogger("taskfleet.server")
router = router_for()


@router.get("/api/v1/audit", tags=["audit"])
async def list_audit(rt: Rt, p: Admin, limit: int = 100) -> list[dict[str, Any]]:
    return await read(rt, lambda c: kernel.list_audit(c, p, min(max(limit, 1), 10_000)))
