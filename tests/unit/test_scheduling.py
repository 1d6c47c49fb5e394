"""The batch scheduler (SPEC 4): constraints, ordering, reasons, and a naive oracle."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from taskfleet.domain.scheduling import (
    Pending,
    Scheduler,
    TaskType,
    Wait,
    validate_types,
)
from taskfleet.domain.task_types import Scope

T0 = datetime(2026, 5, 9, 12, 0, 0, tzinfo=UTC).timestamp()


def make(*types: TaskType) -> Scheduler:
    return Scheduler(validate_types(types))


def ids(tasks: Iterable[Pending]) -> list[int]:
    return [t.id for t in tasks]


def reason(s: Scheduler, task_id: int, now: float = T0) -> str:
    w = s.why_waiting(task_id, now)
    assert w is not None
    return w.reason


# -- limits ----------------------------------------------------------------------------------


def test_type_limit_one_makes_the_second_wait_and_start_after_the_first_finishes() -> None:
    s = make(TaskType("backup", concurrency=1))
    s.add(Pending(1, "backup"))
    s.add(Pending(2, "backup"))
    assert ids(s.dispatch(T0)) == [1]
    assert ids(s.dispatch(T0)) == []
    assert (s.pending_count, s.running_count) == (1, 1)
    s.finished(1)
    assert ids(s.dispatch(T0)) == [2]
    assert (s.pending_count, s.running_count) == (0, 1)


def test_type_limit_n_lets_n_run_at_once() -> None:
    s = make(TaskType("scan", concurrency=3))
    for i in range(1, 6):
        s.add(Pending(i, "scan"))
    assert ids(s.dispatch(T0)) == [1, 2, 3]
    s.finished(2)
    assert ids(s.dispatch(T0)) == [4]


def test_unlimited_type_starts_everything() -> None:
    s = make(TaskType("report"))
    for i in range(1, 101):
        s.add(Pending(i, "report"))
    assert ids(s.dispatch(T0)) == list(range(1, 101))


def test_per_tenant_type_runs_tenants_in_parallel_while_the_same_tenants_second_waits() -> None:
    s = make(TaskType("sync", Scope.TENANT, concurrency=1, per_tenant=True))
    s.add(Pending(1, "sync", tenant=10))
    s.add(Pending(2, "sync", tenant=10))
    s.add(Pending(3, "sync", tenant=20))
    assert ids(s.dispatch(T0)) == [1, 3]
    s.finished(3)  # another tenant's slot: tenant 10 still waits
    assert ids(s.dispatch(T0)) == []
    s.finished(1)
    assert ids(s.dispatch(T0)) == [2]


def test_global_type_limit_counts_across_tenants() -> None:
    s = make(TaskType("reindex", concurrency=1))
    s.add(Pending(1, "reindex", tenant=10))
    s.add(Pending(2, "reindex", tenant=20))
    assert ids(s.dispatch(T0)) == [1]


# -- exclusions ------------------------------------------------------------------------------


@pytest.mark.parametrize("first,second", [("import", "export"), ("export", "import")])
def test_exclusion_holds_in_both_directions(first: str, second: str) -> None:
    s = make(TaskType("import", excludes=frozenset({"export"})), TaskType("export"))
    s.add(Pending(1, first))
    assert ids(s.dispatch(T0)) == [1]
    s.add(Pending(2, second))
    assert ids(s.dispatch(T0)) == []
    assert reason(s, 2) == f"excluded by {first}[1] running"
    s.finished(1)
    assert ids(s.dispatch(T0)) == [2]


def test_exclusion_between_tasks_started_in_the_same_pass() -> None:
    s = make(TaskType("import", excludes=frozenset({"export"})), TaskType("export"))
    s.add(Pending(1, "export"))
    s.add(Pending(2, "import"))
    s.add(Pending(3, "export"))
    assert ids(s.dispatch(T0)) == [1, 3]  # export is unlimited; import waits for both


def test_exclusion_counts_within_the_tenant_when_both_types_are_per_tenant() -> None:
    s = make(
        TaskType("import", per_tenant=True, excludes=frozenset({"export"})),
        TaskType("export", per_tenant=True),
    )
    s.add(Pending(1, "export", tenant=1))
    s.add(Pending(2, "import", tenant=1))
    s.add(Pending(3, "import", tenant=2))
    assert ids(s.dispatch(T0)) == [1, 3]
    assert reason(s, 2) == "excluded by export[1] running for tenant 1"
    s.finished(3)  # another tenant's import ending frees nothing for tenant 1
    assert ids(s.dispatch(T0)) == []
    s.finished(1)
    assert ids(s.dispatch(T0)) == [2]


def test_exclusion_counts_across_tenants_when_one_type_is_not_per_tenant() -> None:
    s = make(
        TaskType("import", per_tenant=True, excludes=frozenset({"maintenance"})),
        TaskType("maintenance", concurrency=1),
    )
    s.add(Pending(1, "maintenance", tenant=1))
    s.add(Pending(2, "import", tenant=2))
    s.add(Pending(3, "import", tenant=3))
    assert ids(s.dispatch(T0)) == [1]
    s.finished(1)
    assert ids(s.dispatch(T0)) == [2, 3]


def test_a_type_excluding_itself_runs_one_at_a_time() -> None:
    s = make(TaskType("migrate", excludes=frozenset({"migrate"})))
    s.add(Pending(1, "migrate"))
    s.add(Pending(2, "migrate"))
    assert ids(s.dispatch(T0)) == [1]
    assert reason(s, 2) == "excluded by migrate[1] running"


# -- not before ------------------------------------------------------------------------------


def test_not_before_is_respected_exactly_at_the_boundary_and_never_before() -> None:
    s = make(TaskType("report"))
    s.add(Pending(1, "report", not_before=T0 + 60))
    assert s.dispatch(T0) == []
    assert s.dispatch(T0 + 59.999) == []
    assert ids(s.dispatch(T0 + 60)) == [1]


def test_a_task_not_yet_due_does_not_block_younger_tasks_of_its_type() -> None:
    s = make(TaskType("backup", concurrency=1))
    s.add(Pending(1, "backup", not_before=T0 + 60))
    s.add(Pending(2, "backup"))
    assert ids(s.dispatch(T0)) == [2]


def test_a_task_that_comes_due_joins_its_type_in_id_order() -> None:
    s = make(TaskType("backup", concurrency=1))
    s.add(Pending(1, "backup"))
    s.add(Pending(2, "backup", not_before=T0 + 60))
    s.add(Pending(3, "backup"))
    assert ids(s.dispatch(T0)) == [1]
    s.finished(1)
    assert ids(s.dispatch(T0 + 60)) == [2]  # older than 3, now due
    s.finished(2)
    assert ids(s.dispatch(T0 + 61)) == [3]


def test_next_wakeup_is_the_earliest_future_not_before() -> None:
    s = make(TaskType("report"))
    assert s.next_wakeup() is None
    s.add(Pending(1, "report", not_before=T0 + 30))
    s.add(Pending(2, "report", not_before=T0 + 10))
    s.add(Pending(3, "report"))
    assert s.next_wakeup() == T0 + 10
    s.cancel(2)
    assert s.next_wakeup() == T0 + 30
    assert ids(s.dispatch(T0 + 30)) == [1, 3]
    assert s.next_wakeup() is None


def test_add_refuses_a_nan_not_before() -> None:
    s = make(TaskType("report"))
    with pytest.raises(ValueError, match="NaN"):
        s.add(Pending(1, "report", not_before=float("nan")))


# -- ordering --------------------------------------------------------------------------------


def test_dispatch_is_oldest_first_across_types_and_tenants() -> None:
    s = make(
        TaskType("a"),
        TaskType("b", per_tenant=True, concurrency=1),
        TaskType("c", concurrency=2),
    )
    for tid, typ, tenant in [(5, "a", 1), (2, "b", 1), (9, "c", 2), (1, "c", 3), (7, "b", 2)]:
        s.add(Pending(tid, typ, tenant=tenant))
    assert ids(s.dispatch(T0)) == [1, 2, 5, 7, 9]


def test_within_a_type_tasks_start_in_id_order_even_if_added_out_of_order() -> None:
    s = make(TaskType("backup", concurrency=1))
    s.add(Pending(8, "backup"))
    s.add(Pending(3, "backup"))
    assert ids(s.dispatch(T0)) == [3]


def test_a_blocked_old_task_does_not_block_unrelated_younger_tasks() -> None:
    s = make(
        TaskType("backup", concurrency=1),
        TaskType("report"),
        TaskType("sync", per_tenant=True, concurrency=1),
    )
    s.restore_running(Pending(1, "backup"))
    s.restore_running(Pending(2, "sync", tenant=7))
    s.add(Pending(3, "backup"))  # oldest pending, blocked by 1
    s.add(Pending(4, "sync", tenant=7))  # blocked by 2 (same tenant)
    s.add(Pending(5, "report"))
    s.add(Pending(6, "sync", tenant=8))
    assert ids(s.dispatch(T0)) == [5, 6]


def test_dispatch_limit_takes_the_oldest_and_leaves_the_rest_for_the_next_pass() -> None:
    s = make(TaskType("a"), TaskType("b"))
    for i, typ in enumerate("ababa", start=1):
        s.add(Pending(i, typ))
    assert ids(s.dispatch(T0, limit=2)) == [1, 2]
    assert ids(s.dispatch(T0, limit=0)) == []
    assert ids(s.dispatch(T0)) == [3, 4, 5]
    with pytest.raises(ValueError):
        s.dispatch(T0, limit=-1)


def test_a_second_dispatch_with_nothing_changed_returns_nothing() -> None:
    s = make(TaskType("backup", concurrency=1), TaskType("report"))
    for i in range(1, 50):
        s.add(Pending(i, "backup" if i % 2 else "report", not_before=T0 + i if i > 40 else None))
    first = s.dispatch(T0)
    assert first
    assert s.dispatch(T0) == []
    assert s.dispatch(T0) == []


# -- cancel, started, finished, restore_running --------------------------------------------


def test_cancel_removes_a_pending_task_and_says_whether_it_was_pending() -> None:
    s = make(TaskType("backup", concurrency=1))
    s.add(Pending(1, "backup"))
    s.add(Pending(2, "backup"))
    s.add(Pending(3, "backup", not_before=T0 + 5))
    assert s.cancel(2) is True
    assert s.cancel(3) is True
    assert s.cancel(2) is False
    assert s.cancel(99) is False
    assert ids(s.dispatch(T0 + 10)) == [1]
    assert s.cancel(1) is False  # running, not pending: finished() ends it
    assert s.pending_count == 0
    s.finished(1)
    assert s.dispatch(T0 + 10) == []


def test_cancelling_the_waiting_head_lets_the_next_take_its_turn() -> None:
    s = make(TaskType("backup", concurrency=1))
    for i in (1, 2, 3):
        s.add(Pending(i, "backup"))
    assert ids(s.dispatch(T0)) == [1]
    s.cancel(2)
    s.finished(1)
    assert ids(s.dispatch(T0)) == [3]


def test_a_cancelled_id_may_be_added_again_without_reviving_the_old_entry() -> None:
    s = make(TaskType("report"))
    s.add(Pending(1, "report"))
    s.cancel(1)
    s.add(Pending(1, "report", not_before=T0 + 100))
    assert s.dispatch(T0) == []
    assert ids(s.dispatch(T0 + 100)) == [1]


def test_many_cancels_are_compacted_away() -> None:
    s = make(TaskType("backup", concurrency=1))
    s.restore_running(Pending(0, "backup"))
    for i in range(1, 5001):
        s.add(Pending(i, "backup", not_before=T0 + 1 if i % 2 else None))
    for i in range(1, 5000):
        assert s.cancel(i)
    assert s.pending_count == 1
    s.finished(0)
    assert ids(s.dispatch(T0 + 1)) == [5000]


def test_restore_running_counts_against_limits_and_exclusions() -> None:
    s = make(
        TaskType("backup", concurrency=1),
        TaskType("sync", per_tenant=True, concurrency=2),
        TaskType("export", excludes=frozenset({"backup"})),
    )
    s.restore_running(Pending(1, "backup"))
    s.restore_running(Pending(2, "sync", tenant=5))
    assert s.running_count == 2
    for tid, typ in [(10, "backup"), (11, "sync"), (12, "sync"), (13, "export")]:
        s.add(Pending(tid, typ, tenant=5))
    assert ids(s.dispatch(T0)) == [11]
    s.finished(1)
    assert ids(s.dispatch(T0)) == [10]  # backup took the slot before export (older)
    assert reason(s, 13) == "excluded by backup[10] running"


def test_restore_running_and_add_refuse_duplicates_and_unknown_types() -> None:
    s = make(TaskType("backup"))
    s.restore_running(Pending(1, "backup"))
    s.add(Pending(2, "backup"))
    for call in (s.add, s.restore_running):
        with pytest.raises(ValueError, match="duplicate task id 1"):
            call(Pending(1, "backup"))
        with pytest.raises(ValueError, match="duplicate task id 2"):
            call(Pending(2, "backup"))
        with pytest.raises(ValueError, match="unknown task type 'nope'"):
            call(Pending(3, "nope"))


def test_started_marks_a_pending_task_running_and_finished_ignores_repeats() -> None:
    s = make(TaskType("backup", concurrency=1))
    s.add(Pending(1, "backup"))
    s.add(Pending(2, "backup"))
    s.started(2)
    s.started(2)  # already running: nothing to do
    assert (s.pending_count, s.running_count) == (1, 1)
    assert s.dispatch(T0) == []
    with pytest.raises(ValueError):
        s.started(99)
    s.finished(2)
    s.finished(2)
    s.finished(99)
    assert ids(s.dispatch(T0)) == [1]


# -- why_waiting -----------------------------------------------------------------------------


def test_why_waiting_explains_each_kind_of_wait() -> None:
    s = make(
        TaskType("backup", concurrency=1),
        TaskType("sync", per_tenant=True, concurrency=1),
        TaskType("import", excludes=frozenset({"backup"})),
        TaskType("report", concurrency=2),
    )
    s.add(Pending(12, "backup"))
    s.add(Pending(13, "backup"))
    s.add(Pending(14, "sync", tenant=3))
    s.add(Pending(15, "sync", tenant=3))
    s.add(Pending(16, "import"))
    s.add(Pending(17, "report", not_before=T0 + 90))
    s.dispatch(T0)
    assert reason(s, 13) == "type limit 1 reached (1 running: [12])"
    assert reason(s, 15) == "type limit 1 per tenant reached for tenant 3 (1 running: [14])"
    assert reason(s, 16) == "excluded by backup[12] running"
    assert reason(s, 17) == "not before 2026-05-09T12:01:30Z (in 90 s)"
    assert reason(s, 17, now=T0 + 90) == "ready: starts at the next dispatch pass"
    assert s.why_waiting(12, T0) is None  # running
    assert s.why_waiting(99, T0) is None  # unknown


def test_why_waiting_names_every_constraint_and_the_fifo_predecessor() -> None:
    s = make(
        TaskType("import", concurrency=1, excludes=frozenset({"export"})),
        TaskType("export"),
        TaskType("report"),
    )
    s.restore_running(Pending(1, "import"))
    s.restore_running(Pending(2, "export"))
    s.restore_running(Pending(3, "export"))
    s.add(Pending(4, "import"))
    assert reason(s, 4) == (
        "type limit 1 reached (1 running: [1]); excluded by export[2], export[3] running"
    )
    s.add(Pending(5, "report"))
    s.add(Pending(6, "report"))
    assert s.why_waiting(6, T0) == Wait(
        "ready: starts at the next dispatch pass, after older report[5]"
        " (same type starts in submission order)"
    )


def test_why_waiting_shortens_long_lists_of_running_tasks() -> None:
    s = make(TaskType("scan", concurrency=12))
    for i in range(1, 14):
        s.add(Pending(i, "scan"))
    s.dispatch(T0)
    assert reason(s, 13) == (
        "type limit 12 reached (12 running: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... +2 more])"
    )


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "types,message",
    [
        ([TaskType("a"), TaskType("a")], "duplicate task type 'a'"),
        ([TaskType("a", concurrency=0)], "concurrency must be at least 1"),
        ([TaskType("a", concurrency=-2)], "concurrency must be at least 1"),
        ([TaskType("a", excludes=frozenset({"b", "c"}))], "excludes unknown types: b, c"),
        ([TaskType("a", time_limit=0)], "time_limit must be > 0"),
        ([TaskType("a", time_limit=-1.0)], "time_limit must be > 0"),
        ([TaskType("a", time_limit=float("nan"))], "time_limit must be > 0"),
        ([TaskType("")], "needs a name"),
    ],
)
def test_validate_types_refuses_bad_definitions(types: list[TaskType], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_types(types)


def test_validate_types_indexes_good_definitions_by_name() -> None:
    a = TaskType("a", excludes=frozenset({"b"}))
    b = TaskType("b", concurrency=1, per_tenant=True, scope=Scope.TENANT)
    assert validate_types([a, b]) == {"a": a, "b": b}


def test_scheduler_refuses_a_mapping_whose_keys_are_not_the_type_names() -> None:
    with pytest.raises(ValueError, match="registered as 'x'"):
        Scheduler({"x": TaskType("a")})


# -- the naive oracle ------------------------------------------------------------------------


def may_start(types: dict[str, TaskType], p: Pending, running: list[Pending]) -> bool:
    """SPEC 4 read literally against the full running list, no indexes."""
    t = types[p.type]
    if t.concurrency is not None:
        same = [
            r for r in running if r.type == p.type and (not t.per_tenant or r.tenant == p.tenant)
        ]
        if len(same) >= t.concurrency:
            return False
    for r in running:
        rt = types[r.type]
        conflict = r.type in t.excludes or p.type in rt.excludes
        both_per_tenant = t.per_tenant and rt.per_tenant
        if conflict and (not both_per_tenant or r.tenant == p.tenant):
            return False
    return True


def oracle_pass(
    types: dict[str, TaskType],
    pending: dict[int, Pending],
    running: dict[int, Pending],
    now: float,
    limit: int | None,
) -> list[int]:
    """Recompute everything from the full pending list, oldest first."""
    run = list(running.values())
    out: list[int] = []
    waiting_keys: set[tuple[str, int | None]] = set()
    for p in sorted(pending.values(), key=lambda p: p.id):
        if limit is not None and len(out) >= limit:
            break
        if p.not_before is not None and p.not_before > now:
            continue
        key = (p.type, p.tenant if types[p.type].per_tenant else None)
        if key in waiting_keys:  # FIFO within a key: an older one of the key still waits
            continue
        if may_start(types, p, run):
            out.append(p.id)
            run.append(p)
        else:
            waiting_keys.add(key)
    return out


def violations(types: dict[str, TaskType], running: list[Pending]) -> list[str]:
    out = []
    for i, p in enumerate(running):
        others = running[:i] + running[i + 1 :]
        if not may_start(types, p, others):
            out.append(f"{p} conflicts with the other running tasks")
    return out


@st.composite
def type_sets(draw: st.DrawFn) -> dict[str, TaskType]:
    n = draw(st.integers(1, 4))
    names = [f"t{i}" for i in range(n)]
    out = {}
    for name in names:
        out[name] = TaskType(
            name,
            concurrency=draw(st.none() | st.integers(1, 3)),
            per_tenant=draw(st.booleans()),
            excludes=frozenset(draw(st.lists(st.sampled_from(names), max_size=2))),
        )
    return validate_types(out.values())


class SchedulerMatchesOracle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.types: dict[str, TaskType] = {}
        self.s = Scheduler({})
        self.pending: dict[int, Pending] = {}
        self.running: dict[int, Pending] = {}
        self.now = T0
        self.next_id = 1

    @initialize(types=type_sets(), restored=st.lists(st.tuples(st.integers(0, 4), st.integers())))
    def setup(self, types: dict[str, TaskType], restored: list[tuple[int, int]]) -> None:
        self.types = types
        self.s = Scheduler(types)
        names = sorted(types)
        # Restored tasks are whatever ran before the restart; keep them valid so the
        # running set can be checked against every constraint from the start.
        for type_index, tenant in restored:
            p = Pending(self.next_id, names[type_index % len(names)], tenant=tenant % 3)
            self.next_id += 1
            if may_start(types, p, list(self.running.values())):
                self.s.restore_running(p)
                self.running[p.id] = p

    @rule(
        type_index=st.integers(0, 4),
        tenant=st.none() | st.integers(1, 2),
        delay=st.none() | st.integers(-3, 8),
        id_gap=st.integers(1, 3),
    )
    def add(self, type_index: int, tenant: int | None, delay: int | None, id_gap: int) -> None:
        names = sorted(self.types)
        self.next_id += id_gap
        nb = None if delay is None else self.now + delay
        p = Pending(self.next_id, names[type_index % len(names)], tenant=tenant, not_before=nb)
        self.s.add(p)
        self.pending[p.id] = p

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 10**6))
    def cancel(self, pick: int) -> None:
        tid = sorted(self.pending)[pick % len(self.pending)]
        assert self.s.cancel(tid) is True
        del self.pending[tid]
        assert self.s.cancel(tid) is False

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 10**6))
    def finish(self, pick: int) -> None:
        tid = sorted(self.running)[pick % len(self.running)]
        self.s.finished(tid)
        del self.running[tid]

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 10**6), limit=st.none() | st.integers(0, 3))
    def finish_then_dispatch(self, pick: int, limit: int | None) -> None:
        # The sequence that exercises which keys a finish marks for the next pass.
        self.finish(pick)
        self.dispatch(limit)

    @rule(seconds=st.sampled_from([0, 0.5, 1, 2, 5]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(limit=st.none() | st.integers(0, 3))
    def dispatch(self, limit: int | None) -> None:
        expected = oracle_pass(self.types, self.pending, self.running, self.now, limit)
        got = self.s.dispatch(self.now, limit)
        assert ids(got) == expected
        for p in got:
            assert self.pending.pop(p.id) is p
            self.running[p.id] = p
        assert violations(self.types, list(self.running.values())) == []
        if limit is None:
            assert self.s.dispatch(self.now) == []
            future = [
                p.not_before
                for p in self.pending.values()
                if p.not_before is not None and p.not_before > self.now
            ]
            assert self.s.next_wakeup() == (min(future) if future else None)
            for tid in self.pending:  # everything startable started: nobody is "ready"
                w = self.s.why_waiting(tid, self.now)
                assert w is not None
                assert not w.reason.startswith("ready"), (tid, w)

    @invariant()
    def counts_match(self) -> None:
        assert self.s.pending_count == len(self.pending)
        assert self.s.running_count == len(self.running)


SchedulerMatchesOracle.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_scheduler_dispatches_what_a_naive_oracle_dispatches = SchedulerMatchesOracle.TestCase
