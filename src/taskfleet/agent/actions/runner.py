"""Check and run one typed activity operation; its result message.

Contract: ``check_action`` takes a verified operation payload and this agent's own
policy and returns (why it is refused, None) or (None, the :class:`Action`): the
type must be one this agent runs (its policy's ``types``: enabled in its
configuration and supported here) and its parameters valid by
``domain/actions``. ``run_action`` runs it through its handler and returns the
``operation-result`` message: a handler's exception never escapes (it is the
activity's failure, said in the result line), a cancel ends it Canceled; and the
outcome's ``awaiting`` (a restart that succeeded: the operation ends when the
computer is back), which ``expect_restart`` recorded before its command ran.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from taskfleet.agent.actions.context import (
    ActionCanceled,
    ActionContext,
    ActionEnv,
    ActionOutcome,
    Starter,
)
from taskfleet.agent.actions.registry import handler
from taskfleet.domain.actions import ACTION_TYPES, action_refusal
from taskfleet.domain.results import result_line
from taskfleet.protocol.exchange import operation_result

log = logging.getLogger("taskfleet.agent")


@dataclass(frozen=True)
class Action:
    type: str
    params: dict[str, Any]
    timeout: float


def check_action(
    payload: dict[str, Any], policy: dict[str, Any]
) -> tuple[str | None, Action | None]:
    kind = str(payload.get("type"))
    why = action_refusal(policy, kind)
    if why is not None:
        return why, None
    try:
        params = ACTION_TYPES[kind].validate(payload.get("params"))
        timeout = payload["timeout"]
        if type(timeout) not in (int, float) or not timeout > 0:
            raise ValueError("timeout must be a positive number")
    except (ValueError, KeyError, TypeError) as exc:
        return f"invalid parameters ({exc})", None
    return None, Action(kind, params, float(timeout))


async def run_action(
    action: Action,
    env: ActionEnv,
    *,
    op: int,
    start: Starter,
    ended: Callable[[], None],
    canceled: Callable[[], bool],
    resync: Callable[[], Awaitable[None]] | None,
    expect_restart: Callable[[dict[str, Any] | None], None] = lambda awaiting: None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    ctx = ActionContext(
        env,
        op=op,
        params=action.params,
        timeout=action.timeout,
        start=start,
        ended=ended,
        canceled=canceled,
        resync=resync,
        expect_restart=expect_restart,
    )
    started = time.time()
    try:
        found = handler(action.type)
        assert found is not None  # the policy has no type without one (capabilities)
        outcome = await found.run(ctx)
    except ActionCanceled:
        outcome = ActionOutcome("canceled", "Canceled before its next step")
    except Exception as exc:  # a handler's bug or a tool we could not read: this run fails
        log.exception("operation %d (%s) failed", op, action.type)
        outcome = ActionOutcome.failed(f"{type(exc).__name__}: {exc}"[:500])
    if outcome.status == "failed" and canceled():
        outcome.status = "canceled"
    title = ACTION_TYPES[action.type].title
    line = result_line(title, outcome.status.title(), outcome.line, outcome.exit_code)
    message = operation_result(
        op,
        outcome.status,
        line,
        exit_code=outcome.exit_code,
        stdout=outcome.stdout,
        stderr=outcome.stderr,
        started_at=started,
        ended_at=time.time(),
    )
    return message, outcome.awaiting if outcome.status == "succeeded" else None
