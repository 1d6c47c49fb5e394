"""System activities on the agent: Resynchronize, Restart, Shutdown, Signal Process.

Contract (``domain/actions/system.py`` for the parameters):
* ``resync``: the whole inventory is collected and queued before the result, so the
  server has it when it sees the activity Succeeded; unsupported where the agent's
  inventory reporting is off (``--no-inventory``).
"""

from __future__ import annotations

from taskfleet.agent.actions.context import ActionContext, ActionEnv, ActionOutcome, AgentAction
from taskfleet.domain.actions.system import RESYNC


async def resync(ctx: ActionContext) -> ActionOutcome:
    await ctx.resync()
    return ActionOutcome.succeeded("the whole inventory was collected and sent")


def _resync_unsupported(env: ActionEnv) -> str | None:
    return None if env.inventory else "inventory reporting is off in its configuration"


HANDLERS: dict[str, AgentAction] = {
    RESYNC: AgentAction(resync, _resync_unsupported),
}
