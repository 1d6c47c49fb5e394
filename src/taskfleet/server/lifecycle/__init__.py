"""The lifecycle engine: Scheduled, Waiting and Blocked client activities (SPEC 2.1, 7, 9).

Contract:
* :func:`parse_options` turns what an administrator asked for (a time, a
  dependency, an approval, a rollout) into :class:`Options`, or raises
  ``ApiError(400)`` with the reason; :func:`check_options` checks them against
  the store (the dependency exists in the caller's tenant and can still be met).
* The pure rules live in ``domain/lifecycle.py``; every state change goes
  through ``domain.states.transition`` and ``store.activities.apply_changes``.
* :class:`Lifecycle` keeps small in-memory indexes so that a pass costs what
  changed; it never sleeps past a timer and reads the time from an injectable clock.
* Approvals, rejections, resumes and windows are functions run by the single
  writer, each audited. (Cron schedules, which create requests, live in
  ``server/schedules.py``: the lifecycle never imports the request module.)

Modules: ``options``, ``moves`` (state changes), ``approvals``, ``windows``
and ``engine``, which imports the others (never the reverse).
"""

from taskfleet.server.lifecycle.approvals import (
    approve,
    expire_approval,
    list_approvals,
    reject,
    resume,
)
from taskfleet.server.lifecycle.engine import Lifecycle, Wake
from taskfleet.server.lifecycle.moves import (
    Moved,
    evaluate_rollout,
    evaluate_waiter,
    release_waiting,
    set_after,
)
from taskfleet.server.lifecycle.options import (
    After,
    Options,
    check_options,
    dependency_progress,
    iso,
    parse_options,
)
from taskfleet.server.lifecycle.windows import (
    closed_windows,
    list_windows,
    load_windows,
    parse_offset,
    set_window,
)

__all__ = [
    "After",
    "Lifecycle",
    "Moved",
    "Options",
    "Wake",
    "approve",
    "check_options",
    "closed_windows",
    "dependency_progress",
    "evaluate_rollout",
    "evaluate_waiter",
    "expire_approval",
    "iso",
    "list_approvals",
    "list_windows",
    "load_windows",
    "parse_offset",
    "parse_options",
    "reject",
    "release_waiting",
    "resume",
    "set_after",
    "set_window",
]
