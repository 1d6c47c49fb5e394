"""The server processes on this database and the leader (server/cluster.py)."""

from __future__ import annotations

from typing import Any

from taskfleet.server import tenants
from taskfleet.server.api.deps import Rt, Viewer, router_for
from taskfleet.server.kernel import ApiError

router = router_for()


@router.get("/api/v1/servers", tags=["health"])
async def list_servers(rt: Rt, p: Viewer) -> dict[str, Any]:
    """Every server process (running, stopped or lost), and which one leads since when."""
    if not tenants.sees_infrastructure(p):
        raise ApiError(403, "server processes serve every tenant: only the super-admin sees them")
    assert rt.cluster is not None
    return await rt.cluster.status()
