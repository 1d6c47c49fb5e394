"""The batch scheduler for server activities (SPEC 4), as a pure data structure.

Contract: callers ``add`` pending tasks and call ``dispatch(now)`` after any change (add,
cancel, finished) and when ``next_wakeup()`` comes due. A pass returns every task that may
start now, oldest (smallest id) first, and counts it running until ``finished``. A task may
start when ``now >= not_before``, its type has a free ``concurrency`` slot, and no task of a
type it excludes, or that excludes it, is running. For a ``per_tenant`` type the slots are
counted within the task's tenant; an exclusion is counted within the tenant only when both
types are per-tenant, otherwise across all tenants. Work that may not start waits
(``why_waiting`` says why) and never holds up other types or tenants; within one key (type,
plus tenant for a per-tenant type) tasks start in id order. A task not yet due is held aside
and joins its key, in id order, once due: it never blocks its key before then.

A pass costs what changed, not the pending history: no I/O, no clock (``now`` is the caller's,
seconds since the epoch, never going backwards).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from taskfleet.domain.task_types import Scope, TaskTypeSpec, is_concurrency, is_time_limit
from taskfleet.settings import TASK_TIME_LIMIT

# (type name, tenant for a per-tenant type else None): the unit of FIFO order and of slots.
Key = tuple[str, int | None]

_MAX_IDS_SHOWN = 10  # reasons list running ids; a limit of 500 must not make a 5 kB reason
_COMPACT_MIN_STALE = 1024
_K = TypeVar("_K")


@dataclass(frozen=True)
class TaskType:
    """The scheduler's view of a declared task type (``from_spec``): the limits it enforces.

    The declaration (``task_types.TaskTypeSpec``) is the model and validates itself; a view is
    plain data, built from one or by hand (tests, benchmarks), and ``validate_types`` checks
    only what the scheduler relies on, with the declaration's rules."""

    name: str
    scope: Scope = Scope.NONE  # carried for callers, not used by the scheduler
    concurrency: int | None = None  # max running at once (per tenant if per_tenant); None = any
    per_tenant: bool = False
    excludes: frozenset[str] = frozenset()  # types that may not run at the same time as this
    time_limit: float = TASK_TIME_LIMIT  # carried for callers
    retry_safe: bool = False  # carried for callers


@dataclass(frozen=True)
class Pending:
    id: int  # increasing with submission order: smaller = older
    type: str
    tenant: int | None = None
    group: str | None = None
    not_before: float | None = None


@dataclass(frozen=True)
class Wait:
    """Why a pending task is not dispatched now, written for an administrator."""

    reason: str


def from_spec(spec: TaskTypeSpec) -> TaskType:
    """The scheduler's view of the declared task type ``spec``."""
    return TaskType(
        name=spec.name,
        scope=Scope(spec.scope),
        concurrency=spec.concurrency,
        per_tenant=spec.per_tenant,
        excludes=frozenset(spec.excludes),
        time_limit=spec.time_limit,
        retry_safe=spec.retry_safe,
    )


def from_specs(specs: Mapping[str, TaskTypeSpec]) -> dict[str, TaskType]:
    """Views of every declared type, indexed by name and checked as a set."""
    return validate_types(from_spec(s) for s in specs.values())


def validate_types(types: Iterable[TaskType]) -> dict[str, TaskType]:
    """Index ``types`` by name; ValueError names the first problem found."""
    out: dict[str, TaskType] = {}
    listed = list(types)
    for t in listed:
        if not t.name:
            raise ValueError("a task type needs a name")
        if t.name in out:
            raise ValueError(f"duplicate task type {t.name!r}")
        if not is_concurrency(t.concurrency):
            raise ValueError(
                f"task type {t.name!r}: concurrency must be at least 1 or None (unlimited),"
                f" not {t.concurrency}"
            )
        if not is_time_limit(t.time_limit):
            raise ValueError(f"task type {t.name!r}: time_limit must be > 0, not {t.time_limit}")
        out[t.name] = t
    for t in listed:
        unknown = sorted(n for n in t.excludes if n not in out)
        if unknown:
            raise ValueError(f"task type {t.name!r} excludes unknown types: {', '.join(unknown)}")
    return out


def _iso(ts: float) -> str:
    try:
        dt = datetime.fromtimestamp(ts, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return repr(ts)
    spec = "seconds" if ts == math.floor(ts) else "milliseconds"
    return dt.isoformat(timespec=spec).replace("+00:00", "Z")


def _in(seconds: float) -> str:
    if seconds < 120:
        return f"{math.ceil(seconds)} s"
    if seconds < 7200:
        return f"{math.ceil(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _ids(ids: Iterable[int]) -> str:
    ordered = sorted(ids)
    shown = ", ".join(str(i) for i in ordered[:_MAX_IDS_SHOWN])
    more = len(ordered) - _MAX_IDS_SHOWN
    return f"[{shown}, ... +{more} more]" if more > 0 else f"[{shown}]"


def _tenant(tenant: int | None) -> str:
    return "no tenant" if tenant is None else f"tenant {tenant}"


class Scheduler:
    """Pending tasks in per-key FIFO heaps, not-yet-due tasks in a heap of not_before times.

    Only keys marked dirty are looked at by a pass. Invariant after a pass: a key with due
    tasks that is not dirty is blocked by what runs. Every task of one key faces the same
    constraints, and starting tasks only tightens them, so a key becomes startable again
    only when a task arrives in it or a task it conflicts with finishes; those mark it dirty.
    Heap entries are removed lazily: an entry ``(id, seq)`` is live while the task's current
    ``seq`` is still recorded, so cancel is O(1) and a re-added id never revives an old entry.
    """

    def __init__(self, types: Mapping[str, TaskType]) -> None:
        for name, t in types.items():
            if name != t.name:
                raise ValueError(f"task type registered as {name!r} is named {t.name!r}")
        self._types = validate_types(types.values())
        # Exclusions are symmetric: A excluding B keeps each from starting while the other runs.
        related: dict[str, set[str]] = {n: set(t.excludes) for n, t in self._types.items()}
        for n, t in self._types.items():
            for other in t.excludes:
                related[other].add(n)
        # (other type, counted within the tenant?) - within only when both are per-tenant.
        self._conflicts: dict[str, tuple[tuple[str, bool], ...]] = {
            n: tuple(
                (o, self._types[n].per_tenant and self._types[o].per_tenant) for o in sorted(os)
            )
            for n, os in related.items()
        }
        self._per_tenant = {n: t.per_tenant for n, t in self._types.items()}
        self._concurrency = {n: t.concurrency for n, t in self._types.items()}

        self._pending: dict[int, Pending] = {}
        self._seq = 0
        self._queued: dict[int, int] = {}  # id -> seq of its live entry in a key queue
        self._deferred: dict[int, int] = {}  # id -> seq of its live entry in self._later
        self._queues: dict[Key, list[tuple[int, int]]] = {}  # non-empty heaps of (id, seq)
        self._keys_by_type: dict[str, set[Key]] = {n: set() for n in self._types}
        self._later: list[tuple[float, int, int]] = []  # (not_before, id, seq)
        self._stale = 0  # dead entries left in the heaps by cancel/started
        self._dirty: set[Key] = set()

        self._running: dict[int, Pending] = {}
        self._running_by_key: dict[Key, set[int]] = {}  # no empty sets: membership = "any"
        self._running_by_type: dict[str, set[int]] = {}

    # -- public API -------------------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def running_count(self) -> int:
        return len(self._running)

    def running_ids(self) -> list[int]:
        """Tasks dispatched or running, as counted against limits and exclusions."""
        return list(self._running)

    def pending_ids(self) -> list[int]:
        return list(self._pending)

    def knows(self, task_id: int) -> bool:
        """Pending or counted as running."""
        return task_id in self._pending or task_id in self._running

    def add(self, task: Pending) -> None:
        self._check_new(task)
        nb = task.not_before
        if nb is not None and math.isnan(nb):
            raise ValueError(f"task {task.id}: not_before is NaN")
        self._pending[task.id] = task
        if nb is None:
            self._enqueue(task)
        else:
            # Held aside until due even if already due: add() has no clock, dispatch() moves it.
            self._seq += 1
            self._deferred[task.id] = self._seq
            heapq.heappush(self._later, (nb, task.id, self._seq))

    def cancel(self, task_id: int) -> bool:
        if self._pending.pop(task_id, None) is None:
            return False
        self._forget_entries(task_id)
        return True

    def started(self, task_id: int) -> None:
        """Mark a pending task running outside dispatch(); a running task is left as it is."""
        if task_id in self._running:
            return
        task = self._pending.pop(task_id, None)
        if task is None:
            raise ValueError(f"task {task_id} is neither pending nor running")
        self._forget_entries(task_id)
        self._mark_running(task)  # only tightens constraints: nothing becomes startable

    def finished(self, task_id: int) -> None:
        """A running task ended, whatever the outcome; unknown ids are ignored (repeat reports)."""
        task = self._running.pop(task_id, None)
        if task is None:
            return
        key = self._key(task)
        _discard(self._running_by_key, key, task_id)
        _discard(self._running_by_type, task.type, task_id)
        # The freed slot and the lifted exclusions can unblock exactly these keys.
        if key in self._queues:
            self._dirty.add(key)
        for other, within in self._conflicts[task.type]:
            if within:
                k = (other, task.tenant)
                if k in self._queues:
                    self._dirty.add(k)
            else:
                self._dirty.update(self._keys_by_type[other])

    def restore_running(self, task: Pending) -> None:
        """At server restart: a task already dispatched counts against limits until finished."""
        self._check_new(task)
        self._mark_running(task)

    def dispatch(self, now: float, limit: int | None = None) -> list[Pending]:
        """Take every task that may start now (at most ``limit``), oldest first; mark running."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, not {limit}")
        later = self._later
        while later and later[0][0] <= now:
            _, tid, seq = heapq.heappop(later)
            if self._deferred.get(tid) == seq:
                del self._deferred[tid]
                self._enqueue(self._pending[tid])
            else:
                self._stale -= 1
        if not self._dirty or limit == 0:
            return []

        # One candidate per dirty key, its head; the heap yields them oldest first across keys.
        candidates: list[tuple[int, Key]] = []
        for key in self._dirty:
            head = self._head(key)
            if head is not None:
                candidates.append((head, key))
        self._dirty = {key for _, key in candidates}
        heapq.heapify(candidates)

        out: list[Pending] = []
        queues, pending, queued = self._queues, self._pending, self._queued
        while candidates:
            if limit is not None and len(out) >= limit:
                break  # keys still in candidates stay dirty for the next pass
            tid, key = candidates[0]
            if self._blocked(key):
                # Tasks started later in this pass only add constraints: it stays blocked.
                heapq.heappop(candidates)
                self._dirty.discard(key)
                continue
            heapq.heappop(queues[key])
            task = pending.pop(tid)
            del queued[tid]
            self._mark_running(task)
            out.append(task)
            nxt = self._head(key)
            if nxt is None:
                heapq.heappop(candidates)
                self._dirty.discard(key)
            else:
                heapq.heapreplace(candidates, (nxt, key))
        return out

    def why_waiting(self, task_id: int, now: float) -> Wait | None:
        task = self._pending.get(task_id)
        if task is None:
            return None
        nb = task.not_before
        if task_id in self._deferred and nb is not None and nb > now:
            return Wait(f"not before {_iso(nb)} (in {_in(nb - now)})")
        key = self._key(task)
        reasons = self._reasons(key)
        if reasons:
            return Wait("; ".join(reasons))
        head = self._head(key)
        if head is not None and head < task_id:
            return Wait(
                f"ready: starts at the next dispatch pass, after older {task.type}[{head}]"
                " (same type starts in submission order)"
            )
        return Wait("ready: starts at the next dispatch pass")

    def next_wakeup(self) -> float | None:
        """The earliest not_before among tasks held aside; after dispatch(now) it is > now."""
        later = self._later
        while later:
            nb, tid, seq = later[0]
            if self._deferred.get(tid) == seq:
                return nb
            heapq.heappop(later)
            self._stale -= 1
        return None

    # -- internals --------------------------------------------------------------------------

    def _key(self, task: Pending) -> Key:
        return (task.type, task.tenant if self._per_tenant[task.type] else None)

    def _check_new(self, task: Pending) -> None:
        if task.type not in self._types:
            raise ValueError(f"task {task.id}: unknown task type {task.type!r}")
        if task.id in self._pending or task.id in self._running:
            raise ValueError(f"duplicate task id {task.id}")

    def _enqueue(self, task: Pending) -> None:
        self._seq += 1
        self._queued[task.id] = self._seq
        key = self._key(task)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = []
            self._keys_by_type[task.type].add(key)
        heapq.heappush(q, (task.id, self._seq))
        self._dirty.add(key)

    def _forget_entries(self, task_id: int) -> None:
        # Its heap entry stays behind, dead; compaction bounds how many may pile up.
        in_queue = self._queued.pop(task_id, None) is not None
        if in_queue or self._deferred.pop(task_id, None) is not None:
            self._stale += 1
        if self._stale > _COMPACT_MIN_STALE and self._stale > len(self._pending):
            self._compact()

    def _compact(self) -> None:
        for key in list(self._queues):
            live = [e for e in self._queues[key] if self._queued.get(e[0]) == e[1]]
            if live:
                heapq.heapify(live)
                self._queues[key] = live
            else:
                del self._queues[key]
                self._keys_by_type[key[0]].discard(key)
        self._later = [e for e in self._later if self._deferred.get(e[1]) == e[2]]
        heapq.heapify(self._later)
        self._stale = 0

    def _head(self, key: Key) -> int | None:
        q = self._queues.get(key)
        if q is None:
            return None
        queued = self._queued
        while q:
            tid, seq = q[0]
            if queued.get(tid) == seq:
                return tid
            heapq.heappop(q)
            self._stale -= 1
        del self._queues[key]
        self._keys_by_type[key[0]].discard(key)
        return None

    def _mark_running(self, task: Pending) -> None:
        self._running[task.id] = task
        self._running_by_key.setdefault(self._key(task), set()).add(task.id)
        self._running_by_type.setdefault(task.type, set()).add(task.id)

    def _blocked(self, key: Key) -> bool:
        name, tenant = key
        limit = self._concurrency[name]
        if limit is not None:
            running = self._running_by_key.get(key)
            if running is not None and len(running) >= limit:
                return True
        for other, within in self._conflicts[name]:
            if within:
                if (other, tenant) in self._running_by_key:
                    return True
            elif other in self._running_by_type:
                return True
        return False

    def _reasons(self, key: Key) -> list[str]:
        name, tenant = key
        out: list[str] = []
        limit = self._concurrency[name]
        running = self._running_by_key.get(key, set())
        if limit is not None and len(running) >= limit:
            per = self._per_tenant[name]
            where = f" per tenant reached for {_tenant(tenant)}" if per else " reached"
            out.append(f"type limit {limit}{where} ({len(running)} running: {_ids(running)})")
        for other, within in self._conflicts[name]:
            ids = (
                self._running_by_key.get((other, tenant))
                if within
                else self._running_by_type.get(other)
            )
            if ids:
                shown = sorted(ids)
                names = ", ".join(f"{other}[{i}]" for i in shown[:_MAX_IDS_SHOWN])
                if len(shown) > _MAX_IDS_SHOWN:
                    names += f", ... +{len(shown) - _MAX_IDS_SHOWN} more"
                where = f" for {_tenant(tenant)}" if within else ""
                out.append(f"excluded by {names} running{where}")
        return out


def _discard(index: dict[_K, set[int]], key: _K, task_id: int) -> None:
    ids = index[key]
    ids.discard(task_id)
    if not ids:
        del index[key]
