"""Server tasks in the store (SPEC 4), one module per concept; here what they all share.

Contract: every function of the package runs in the caller's transaction and moves
states only through ``domain.states.transition`` and ``store.activities.apply_changes``.

- ``submission``: submit one or many, duplicates of a task not yet dispatched (SPEC 4.2).
- ``dispatching``: the open tasks the scheduler reads, marking them dispatched and back.
- ``running``: a worker claims tasks and reports their outcomes. ``claim_many`` is the
  guard that makes a redelivered task never run twice at the same time: only a Queued,
  unclaimed task can be claimed, by one worker.
- ``stops``: cancel, and a canceled running task *held* until its worker stops it.
- ``heartbeats``: workers' heartbeats and reaping the tasks of silent workers.
- ``holds``: Blocked and Waiting tasks and how they move on.
- ``reads``: listings and lookups for the API and the scheduler.
"""

from __future__ import annotations

from taskfleet.domain.states import ActivityKind

SERVER = ActivityKind.SERVER


def label(type_: str, task_id: int) -> str:
    """SPEC 4.7: how logs name a task."""
    return f"{type_}[{task_id}]"
