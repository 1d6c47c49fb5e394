"""Refusals: server messages an agent did not act on because they were not genuinely for it.

Contract: an agent that refuses a server message for its authenticity (a bad
or missing signature, another computer, another enrollment generation, a
replayed operation, a message it cannot read: ``protocol/orders.py``) sends a
``refused`` message. The exchange records each one once, in the same
transaction that applies the rest of the exchange, as an audit entry
(action ``agent.refused``, actor ``computer:ID``, detail: the server message,
its operation, the reason and the agent's text) that an administrator reads
at ``GET /api/v1/audit``; once that transaction commits, it counts it in
``taskfleet_agent_refusals_total{reason}`` and logs a warning. No activity
state changes: the refused message was never acted on, so an operation whose
delivery was tampered with stays In Progress until it is declared lost.
Nothing secret is in the record: the agent's text names ids, never payloads.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.protocol.exchange import RefusedMessage
from taskfleet.server import metrics
from taskfleet.server.kernel import AuditEntry, write_audit

log = logging.getLogger("taskfleet.server")

ACTION = "agent.refused"


async def record(
    conn: AsyncConnection, refused: list[tuple[int, int, RefusedMessage]], now: float
) -> None:
    """Audit entries for ``(computer id, tenant id, message)`` refusals."""
    await write_audit(
        conn,
        [
            AuditEntry(
                tenant_id,
                f"computer:{computer_id}",
                ACTION,
                now,
                {
                    "computer": computer_id,
                    "server_seq": m.server_seq,
                    "op": m.op,
                    "reason": m.reason,
                    "text": m.text,
                },
            )
            for computer_id, tenant_id, m in refused
        ],
    )


def report(computer_id: int, refused: list[RefusedMessage]) -> None:
    """After the commit that recorded them: the metric and the log line."""
    for m in refused:
        metrics.AGENT_REFUSALS.labels(m.reason).inc()
        log.warning(
            "computer %d refused server message %d%s: %s (%r)",
            computer_id,
            m.server_seq,
            f" (operation {m.op})" if m.op is not None else "",
            m.reason,
            m.text,
        )
