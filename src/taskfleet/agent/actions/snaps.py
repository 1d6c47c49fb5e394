"""Snaps activities on the agent: Install, Remove, Refresh, Hold and Unhold Snaps
(``domain/actions/snaps.py`` for the parameters).

Contract:
* Each runs the ``snap`` command as argv through ``ActionContext.run``:
  ``snap install [--channel=C] [--classic] NAME...``, ``snap remove NAME...``,
  ``snap refresh [--channel=C] [NAME...]``, ``snap refresh --hold=forever|Ns NAME...``,
  ``snap refresh --unhold NAME...``. The result line is what snap said (its lines
  joined, "hello 2.10 from Canonical✓ installed"); a failure is snap's exit code and
  last line of error.
* ``unsupported``: no ``snap`` command, no snapd socket (``/run/snapd.socket``), or a
  system root other than ``/`` (snapd manages only the system it runs on): each
  reason starts with "snapd".
"""

from __future__ import annotations

import shutil
from pathlib import Path

from taskfleet.agent.actions.context import (
    ActionContext,
    ActionEnv,
    ActionOutcome,
    AgentAction,
    Ran,
)
from taskfleet.domain.actions.snaps import (
    FOREVER,
    SNAP_HOLD,
    SNAP_INSTALL,
    SNAP_REFRESH,
    SNAP_REMOVE,
    SNAP_UNHOLD,
)

SNAPD_SOCKET = Path("/run/snapd.socket")
_LINE_MAX = 500


def said(ran: Ran) -> str:
    """What snap said, its non-empty lines joined (standard output, then error)."""
    lines = [ln.strip() for ln in f"{ran.stdout}\n{ran.stderr}".splitlines() if ln.strip()]
    text = "; ".join(lines) or "snap said nothing"
    return text if len(text) <= _LINE_MAX else text[: _LINE_MAX - 3] + "..."


async def _snap(ctx: ActionContext, args: list[str]) -> ActionOutcome:
    ran = await ctx.run(["snap", *args], env={"LC_ALL": "C.UTF-8"})
    if not ran.ok:
        return ActionOutcome.failed(ran.why(), ran)
    return ActionOutcome.succeeded(said(ran), ran)


async def install(ctx: ActionContext) -> ActionOutcome:
    p = ctx.params
    args = ["install"]
    if p["channel"] is not None:
        args.append(f"--channel={p['channel']}")
    if p["classic"]:
        args.append("--classic")
    return await _snap(ctx, [*args, *p["names"]])


async def remove(ctx: ActionContext) -> ActionOutcome:
    return await _snap(ctx, ["remove", *ctx.params["names"]])


async def refresh(ctx: ActionContext) -> ActionOutcome:
    p = ctx.params
    args = ["refresh"]
    if p["channel"] is not None:
        args.append(f"--channel={p['channel']}")
    return await _snap(ctx, [*args, *p["names"]])


async def hold(ctx: ActionContext) -> ActionOutcome:
    hold_for = ctx.params["hold_for"]
    duration = FOREVER if hold_for == FOREVER else f"{hold_for}s"
    return await _snap(ctx, ["refresh", f"--hold={duration}", *ctx.params["names"]])


async def unhold(ctx: ActionContext) -> ActionOutcome:
    return await _snap(ctx, ["refresh", "--unhold", *ctx.params["names"]])


def unsupported(env: ActionEnv) -> str | None:
    if shutil.which("snap") is None:
        return "snapd is not installed (no snap command)"
    if env.chrooted:
        return f"snapd manages only the system the agent runs on, not the root {env.root}"
    if not SNAPD_SOCKET.exists():
        return f"snapd is not installed or not running (no {SNAPD_SOCKET})"
    return None


HANDLERS: dict[str, AgentAction] = {
    SNAP_INSTALL: AgentAction(install, unsupported),
    SNAP_REMOVE: AgentAction(remove, unsupported),
    SNAP_REFRESH: AgentAction(refresh, unsupported),
    SNAP_HOLD: AgentAction(hold, unsupported),
    SNAP_UNHOLD: AgentAction(unhold, unsupported),
}
