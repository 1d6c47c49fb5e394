"""Whether an operation the agent holds may run here, and what it runs.

Contract: ``check_operation`` checks a stored operation again just before it runs:
the server's signature over its payload, that it is for this computer and this
operation, then this computer's own policy for its type (a script: scripts
enabled and its user allowed; a job: ``agent/jobs.check_job``; a typed activity:
``agent/actions/runner.check_action``). It returns the refusal (the result line's
reason, prefixed ``REFUSED_PREFIX``) or what to run: a script's process spec and
time limit, a typed activity, or a job's spec. Pure but for reading its inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskfleet.agent import state as st
from taskfleet.domain.actions import ACTION_TYPES
from taskfleet.domain.kinds import JOB
from taskfleet.domain.results import REFUSED_PREFIX
from taskfleet.domain.scripts import EXECUTE_SCRIPT, policy_refusal, validate_script_params
from taskfleet.process import ScriptSpec
from taskfleet.protocol.signing import SignatureError, Verifier
from taskfleet.settings import OUTPUT_CAP, OUTPUT_CAP_MAX

if TYPE_CHECKING:
    from taskfleet.agent.actions.runner import Action
    from taskfleet.domain.jobs import JobSpec


def check_operation(
    op: st.Operation,
    verifier: Verifier,
    identity: st.Identity,
    policy: dict[str, Any],
    *,
    own_user: str,
    state_dir: Path,
) -> tuple[str | None, ScriptSpec | Action | None, float, JobSpec | None]:
    """(refusal, script or typed activity, its timeout, job): what ``op`` runs, or
    why it does not."""
    try:
        m = json.loads(op.body)
        verifier.verify(m["body"], m["sig"])
        payload = json.loads(m["body"])
    except (SignatureError, KeyError, ValueError, TypeError):
        return f"{REFUSED_PREFIX}: the payload signature does not verify", None, 0, None
    if payload.get("computer") != identity.computer_id or payload.get("op") != op.op:
        return f"{REFUSED_PREFIX}: the payload is meant for another computer", None, 0, None
    # Jobs and typed activities load their code only when one arrives (agent memory).
    if payload.get("type") == JOB:
        from taskfleet.agent.jobs import check_job

        why, job = check_job(payload, policy)
        return (f"{REFUSED_PREFIX}: {why}" if why else None), None, 0, job
    if payload.get("type") in ACTION_TYPES:
        from taskfleet.agent.actions.runner import check_action

        why, action = check_action(payload, policy)
        return (f"{REFUSED_PREFIX}: {why}" if why else None), action, 0, None
    refusal, spec, timeout = _check_script(
        op, payload, identity, policy, own_user=own_user, state_dir=state_dir
    )
    return refusal, spec, timeout, None


def _check_script(
    op: st.Operation,
    payload: dict[str, Any],
    identity: st.Identity,
    policy: dict[str, Any],
    *,
    own_user: str,
    state_dir: Path,
) -> tuple[str | None, ScriptSpec | None, float]:
    if payload.get("type") != EXECUTE_SCRIPT:
        return (
            f"{REFUSED_PREFIX}: activity type {payload.get('type')!r} is not enabled",
            None,
            0,
        )
    try:
        params = validate_script_params(
            payload.get("params"), default_cap=OUTPUT_CAP, max_cap=OUTPUT_CAP_MAX
        )
        timeout = float(payload["timeout"])
    except (ValueError, KeyError, TypeError) as exc:
        return f"{REFUSED_PREFIX}: invalid parameters ({exc})", None, 0
    why = policy_refusal(policy, params)
    if why:
        return f"{REFUSED_PREFIX}: {why}", None, timeout
    user = params.get("user")
    try:
        spec = ScriptSpec(
            argv=params.get("argv"),
            script=params.get("script"),
            interpreter=params.get("interpreter") or "/bin/sh",
            env={
                **params.get("env", {}),
                "TASKFLEET_COMPUTER_ID": str(identity.computer_id),
                "TASKFLEET_OPERATION_ID": str(op.op),
            },
            cwd=params.get("cwd"),
            timeout=timeout,
            output_cap=params["output_cap"],
            user=None if user in (None, own_user) else user,
            tmp_dir=str(state_dir),
        )
    except ValueError as exc:
        return f"{REFUSED_PREFIX}: invalid parameters ({exc})", None, timeout
    return None, spec, timeout
