"""Lifecycle options: what an administrator asked for (a time, a dependency, an
approval, a rollout). :func:`parse_options` validates it into :class:`Options` or
raises ``ApiError(400)``; :func:`check_options` checks it against the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.lifecycle import (
    Dependency,
    RolloutPolicy,
    RuleError,
    dependency_doomed,
    dependency_met,
)
from taskfleet.domain.progress import Progress, progress
from taskfleet.server.kernel import ApiError, Principal, state_counts
from taskfleet.settings import MAX_AHEAD, MAX_ID, TIME_MAX, TIME_MIN
from taskfleet.store.schema import activities, requests


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class After:
    """Wait for request or activity ``on`` to reach ``percent`` of ``metric``."""

    kind: str  # "request" | "activity"
    on: int
    metric: str = "finished"
    percent: float = 100.0

    def rule(self) -> Dependency:
        return Dependency(self.on, self.metric, self.percent)

    def describe(self) -> str:
        what = "finished" if self.metric == "finished" else "succeeded"
        return f"{self.kind} {self.on} {self.percent:g}% {what}"

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "on": self.on, "metric": self.metric, "percent": self.percent}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> After:
        return cls(d["kind"], int(d["on"]), d["metric"], float(d["percent"]))


@dataclass(frozen=True)
class Options:
    not_before: float | None = None
    after: After | None = None
    approval: dict[str, Any] | None = None  # {"separation": bool, "expires_at": float|None}
    rollout: RolloutPolicy | None = None

    @property
    def empty(self) -> bool:
        return (
            self.not_before is None
            and self.after is None
            and self.approval is None
            and self.rollout is None
        )


def _time(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(400, f"{what} must be a time in epoch seconds, got {value!r}")
    return float(value)


def parse_options(
    now: float,
    *,
    at: Any = None,
    after: Any = None,
    approval: Any = None,
    rollout: Any = None,
) -> Options:
    """Validate the lifecycle part of a request; ApiError(400) names what is wrong."""
    try:
        not_before = None if at is None else _parse_at(now, at)
        dep = None if after is None else _parse_after(after)
        appr = None if approval is None else _parse_approval(now, approval)
        plan = None if rollout is None else _parse_rollout(rollout)
    except RuleError as exc:
        raise ApiError(400, str(exc)) from None
    return Options(not_before, dep, appr, plan)


def _parse_at(now: float, at: Any) -> float:
    not_before = _time(at, "at")
    if not TIME_MIN <= not_before <= TIME_MAX:  # and iso() below can show it
        raise ApiError(400, f"at must be epoch seconds in [{TIME_MIN:g}, {TIME_MAX:g}]")
    if not_before > now + MAX_AHEAD:
        raise ApiError(400, f"at {iso(not_before)} is more than a year ahead")
    return not_before


def _parse_after(after: Any) -> After:
    if not isinstance(after, dict):
        raise ApiError(400, "after must be an object: {request|activity: ID, ...}")
    kinds = [k for k in ("request", "activity") if after.get(k) is not None]
    unknown = set(after) - {"request", "activity", "metric", "percent"}
    if unknown:
        raise ApiError(400, f"after: unknown field(s) {', '.join(sorted(unknown))}")
    if len(kinds) != 1:
        raise ApiError(400, "after needs exactly one of request or activity")
    on = after[kinds[0]]
    if isinstance(on, bool) or not isinstance(on, int) or not 1 <= on <= MAX_ID:
        raise ApiError(400, f"after.{kinds[0]} must be an id, got {on!r}")
    dep = After(kinds[0], on, after.get("metric", "finished"), after.get("percent", 100.0))
    dep.rule()  # validates metric and threshold
    return dep


def _parse_approval(now: float, approval: Any) -> dict[str, Any]:
    if not isinstance(approval, dict):
        raise ApiError(400, "approval must be an object: {separation, expires_in}")
    unknown = set(approval) - {"separation", "expires_in"}
    if unknown:
        raise ApiError(400, f"approval: unknown field(s) {', '.join(sorted(unknown))}")
    expires_in = approval.get("expires_in")
    expires_at = None
    if expires_in is not None:
        seconds = _time(expires_in, "approval.expires_in")
        if not 0 < seconds <= MAX_AHEAD:
            raise ApiError(400, "approval.expires_in must be in (0, 366 days] seconds")
        expires_at = now + seconds
    return {"separation": bool(approval.get("separation", False)), "expires_at": expires_at}


def _parse_rollout(rollout: Any) -> RolloutPolicy:
    if not isinstance(rollout, dict):
        raise ApiError(400, "rollout must be an object: {canary, size|share, ...}")
    unknown = set(rollout) - {"canary", "size", "share", "success", "max_failures"}
    if unknown:
        raise ApiError(400, f"rollout: unknown field(s) {', '.join(sorted(unknown))}")
    plan = RolloutPolicy(
        canary=rollout.get("canary", 0),
        size=rollout.get("size"),
        share=rollout.get("share"),
        success=rollout.get("success", 100.0),
        max_failures=rollout.get("max_failures", 100.0),
    )
    if (plan.size is None) == (plan.share is None):
        raise ApiError(400, "rollout needs exactly one of size or share")
    return plan


async def dependency_progress(conn: AsyncConnection, tenant_id: int, after: After) -> Progress:
    """Progress of what ``after`` names; 404 if it is not in this tenant."""
    col = activities.c.request_id if after.kind == "request" else activities.c.id
    if after.kind == "request":
        exists = (
            await conn.execute(
                sa.select(requests.c.id).where(
                    requests.c.id == after.on, requests.c.tenant_id == tenant_id
                )
            )
        ).first()
        if exists is None:
            raise ApiError(404, f"dependency: no request {after.on} in this tenant")
    counts = await state_counts(conn, col == after.on, activities.c.tenant_id == tenant_id)
    if after.kind == "activity" and not counts:
        raise ApiError(404, f"dependency: no activity {after.on} in this tenant")
    return progress(counts)


async def check_options(conn: AsyncConnection, p: Principal, opts: Options) -> bool | None:
    """Check options against the store; True/False: the dependency is met now, None: none."""
    if opts.after is None:
        return None
    prog = await dependency_progress(conn, p.tenant_id, opts.after)
    rule = opts.after.rule()
    if dependency_met(rule, prog):
        return True
    if dependency_doomed(rule, prog):
        raise ApiError(
            409,
            f"dependency can never be met: {opts.after.describe()} is impossible "
            f"({prog.succeeded} succeeded, {prog.finished} finished of {prog.total})",
        )
    return False
