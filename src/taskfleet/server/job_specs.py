"""A job's params on their way into the store: content filled in, checked, the policy asked.

Contract (imported by ``server/requests.py``, which creates every request, a job's
too; ``server/jobs.py`` holds the rest of the noun):

* :func:`complete_params` takes a job's params as an administrator wrote them, where
  a content reference may omit ``size`` and ``name``, and returns them complete
  (``JobSpec.as_json()``): every referenced SHA-256 must be in the caller's tenant's
  ``content`` table (400 naming the missing hashes, nothing written); a missing
  ``size`` or ``name`` is taken from that row before ``validate_job_spec`` checks
  the whole. A given ``size`` that differs from the stored one is refused (the
  agent would refuse the bytes). One query, whatever the number of references.
* :func:`check_shape` is the same check without the store (a schedule's template
  before it is stored): content references are not looked up.
* :func:`refusal` is why an agent with a given policy would refuse the job: the
  first of its commands (detect when the job analyzes, then its action) that the
  agent would refuse as a script (``domain.scripts.policy_refusal``).
* :func:`job_timeout` is the time the server waits between two reports of a
  computer running the job before it declares it lost: the request's ``timeout``,
  at least the longest step's own time limit.
* :func:`insert_job_row` writes the ``jobs`` row of a job request (its name), in
  the caller's transaction: every path that creates a job request calls it.
"""

from __future__ import annotations

import copy
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.jobs import (
    ANALYZE,
    DEFAULT_STEP_TIMEOUT,
    JOB,
    JobSpec,
    JobSpecError,
    validate_job_spec,
)
from taskfleet.domain.scripts import policy_refusal
from taskfleet.server.kernel import ApiError
from taskfleet.store.schema import content, jobs

__all__ = [
    "JOB",
    "check_shape",
    "complete_params",
    "insert_job_row",
    "job_timeout",
    "refusal",
]


def _refs(params: Any) -> list[dict[str, Any]]:
    """The content references of ``params`` that are objects (the rest is left for
    ``validate_job_spec`` to name)."""
    out: list[dict[str, Any]] = []
    if not isinstance(params, dict) or not isinstance(params.get("items"), list):
        return out
    for item in params["items"]:
        if isinstance(item, dict) and isinstance(item.get("content"), list):
            out += [c for c in item["content"] if isinstance(c, dict)]
    return out


def _validate(params: Any) -> JobSpec:
    try:
        return validate_job_spec(params)
    except JobSpecError as exc:
        raise ApiError(400, f"job: {exc}") from None


async def complete_params(conn: AsyncConnection, tenant_id: int, params: Any) -> dict[str, Any]:
    """The job's params with every content reference complete (module docstring)."""
    filled = copy.deepcopy(params)
    refs = _refs(filled)
    hashes = {r["sha256"] for r in refs if isinstance(r.get("sha256"), str)}
    known: dict[str, Any] = {}
    if hashes:
        known = {
            row.sha256: row
            for row in await conn.execute(
                sa.select(content.c.sha256, content.c.size, content.c.name).where(
                    content.c.tenant_id == tenant_id, content.c.sha256.in_(sorted(hashes))
                )
            )
        }
    missing = sorted(h for h in hashes if h not in known)
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ApiError(
            400,
            f"job: {len(missing)} content hash(es) not found in this tenant's content "
            f"(add them first: taskfleet content add FILE): {shown}",
        )
    for ref in refs:
        sha256 = ref.get("sha256")
        row = known.get(sha256) if isinstance(sha256, str) else None
        if row is None:
            continue  # not a hash: validate_job_spec names it
        if ref.get("size") is None:
            ref["size"] = int(row.size)
        elif ref["size"] != row.size:
            raise ApiError(
                400,
                f"job: content {row.sha256} has size {row.size}, the job says {ref['size']!r}",
            )
        if ref.get("name") is None:
            ref["name"] = row.name
    return _validate(filled).as_json()


def check_shape(params: Any) -> JobSpec:
    """``validate_job_spec`` of ``params`` whose references may lack size and name
    (filled here with stand-ins that pass; the store fills the real ones later)."""
    filled = copy.deepcopy(params)
    for ref in _refs(filled):
        ref.setdefault("size", 0)
        ref.setdefault("name", "content")
    return _validate(filled)


def commands(spec: JobSpec) -> list[tuple[str, dict[str, Any]]]:
    """(where, command) of every command the job runs on a computer."""
    out = []
    for i, item in enumerate(spec.items):
        where = f"item {i} ({item.name[:40]})"
        if ANALYZE in spec.phases and item.detect is not None:
            out.append((f"{where} detect", item.detect))
        if spec.action is not None:
            out.append((f"{where} {spec.action}", item.commands[spec.action]))
    return out


def refusal(policy: dict[str, Any] | None, spec: JobSpec) -> str | None:
    """Why an agent with ``policy`` would refuse one of the job's commands, or None."""
    for where, command in commands(spec):
        why = policy_refusal(policy, command)
        if why:
            return f"{where}: {why}"
    return None


def job_timeout(spec: JobSpec, timeout: float | None) -> float:
    """The request's timeout for a job (module docstring); 400 if shorter than a step's."""
    longest = max((float(c["timeout"]) for _, c in commands(spec)), default=0.0)
    if timeout is None:
        return longest or DEFAULT_STEP_TIMEOUT  # a job that only downloads
    if timeout < longest:
        raise ApiError(
            400,
            f"timeout {timeout:g}s is shorter than the job's longest step ({longest:g}s): "
            "the server would declare a computer lost while that step still runs",
        )
    return timeout


async def insert_job_row(
    conn: AsyncConnection, request_id: int, tenant_id: int, spec_json: dict[str, Any]
) -> None:
    await conn.execute(
        jobs.insert().values(request_id=request_id, tenant_id=tenant_id, name=spec_json["name"])
    )
