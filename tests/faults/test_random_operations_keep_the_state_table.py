"""Random sequences of operations against the real server never break the state table.

Hypothesis drives create (plain, scheduled, chained, approval, rollout),
approve, reject, cancel, resume, deliver, report, maintenance windows, cron
schedules and time passing against an
in-process server on a fake clock. After every step the recorded history of
every activity must chain and follow SPEC 2.1 exactly, the current state must
be the last recorded one, and the lifecycle promises must hold (nothing handed
out before its time, before its approval or outside its window). No operation may fail with a
server error: refusals are 4xx with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from taskfleet.domain.policy import RunWindow
from taskfleet.domain.states import CLIENT_TRANSITIONS, State
from tests.conftest import fresh_database
from tests.inproc import FakeClock, Harness, SimAgent, inproc_server, manual_lifecycle

KINDS = ["plain", "at", "after", "approval", "approval+after", "rollout", "separation"]


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        self.stack = contextlib.AsyncExitStack()
        # The selected backend (TASKFLEET_TEST_DB): SQLite, or a fresh PostgreSQL
        # database per example.
        self.db = contextlib.ExitStack()
        url = self.db.enter_context(fresh_database(Path(self.tmp.name)))
        self.clock = FakeClock()
        self.h: Harness = self._await(
            self.stack.enter_async_context(
                inproc_server(
                    url,
                    Path(self.tmp.name),
                    self.clock,
                    lifecycle_interval=3600,
                    reaper_interval=3600,
                )
            )
        )
        # Lifecycle and reaper passes run only as steps (tick), so each step and
        # check sees a settled store and a failing sequence replays exactly (a
        # background reaper once failed an activity between the two reads of a
        # check, and the shrinker could not replay it).
        assert self.h.rt.lifecycle is not None
        self._await(manual_lifecycle(self.h))
        self.agents: list[SimAgent] = self._await(self.h.enroll(2))
        self._await(self.h.ok("POST", "/groups", {"name": "night"}))
        self.agents += self._await(self.h.enroll(2, group="night"))
        self.window: RunWindow | None = None  # the "night" group's, in UTC
        self.other = self._await(self.h.token("admin", "second-admin"))
        self.requests: list[int] = []
        self.held: dict[int, list[int]] = {}  # agent index -> ops it holds

    def _await(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        async def close():
            try:
                await asyncio.wait_for(self.stack.aclose(), 10)
            except TimeoutError:
                for t in asyncio.all_tasks():
                    t.print_stack()
                raise

        try:
            self._await(close())
        finally:
            self.loop.close()
            self.db.close()
            self.tmp.cleanup()

    def _check(self, r: Any) -> Any:
        assert r.status_code < 500, r.text
        return r

    # -- operations ------------------------------------------------------------------

    @rule(kind=st.sampled_from(KINDS), n=st.integers(1, 4))
    def create(self, kind: str, n: int) -> None:
        ids = ",".join(str(a.computer_id) for a in self.agents[:n])
        body: dict[str, Any] = {"target": f"computer:{ids}", "params": {"argv": ["true"]}}
        if kind == "at":
            body["at"] = self.clock() + 600
        if "after" in kind and self.requests:
            body["after"] = {"request": self.requests[-1], "metric": "finished", "percent": 50}
        if kind.startswith("approval") or kind == "separation":
            body["approval"] = {"separation": kind == "separation", "expires_in": 1800}
        if kind == "rollout":
            body["rollout"] = {"canary": 1, "size": 1, "success": 100, "max_failures": 30}
        r = self._check(self._await(self.h.call("POST", "/requests", body)))
        if r.status_code == 201:
            self.requests.append(r.json()["id"])

    @precondition(lambda self: self.requests)
    @rule(i=st.integers(0, 50), other=st.booleans())
    def approve(self, i: int, other: bool) -> None:
        rid = self.requests[i % len(self.requests)]
        self._check(
            self._await(
                self.h.call("POST", f"/requests/{rid}/approve", token=self.other if other else None)
            )
        )

    @precondition(lambda self: self.requests)
    @rule(i=st.integers(0, 50))
    def reject(self, i: int) -> None:
        rid = self.requests[i % len(self.requests)]
        self._check(self._await(self.h.call("POST", f"/requests/{rid}/reject")))

    @precondition(lambda self: self.requests)
    @rule(i=st.integers(0, 50))
    def cancel(self, i: int) -> None:
        rid = self.requests[i % len(self.requests)]
        self._check(self._await(self.h.call("POST", f"/requests/{rid}/cancel")))

    @precondition(lambda self: self.requests)
    @rule(i=st.integers(0, 50))
    def resume(self, i: int) -> None:
        rid = self.requests[i % len(self.requests)]
        self._check(self._await(self.h.call("POST", f"/requests/{rid}/resume")))

    @rule(i=st.integers(0, 3))
    def deliver(self, i: int) -> None:
        got = self._await(self.agents[i].exchange())
        minute = (self.clock() % 86400) / 60
        if i >= 2 and self.window is not None and not self.window.contains(minute):
            assert got == [], f"handed out {got} outside the window {self.window}"
        self.held.setdefault(i, []).extend(got)

    @rule(window=st.sampled_from([None, "00:00-06:00", "22:00-02:00", "12:00-12:30"]))
    def set_window(self, window: str | None) -> None:
        if window is None:
            self._await(self.h.ok("DELETE", "/groups/night/window"))
            self.window = None
        else:
            self._await(self.h.ok("PUT", "/groups/night/window", {"window": window}))
            self.window = RunWindow.parse(window)

    @rule()
    def schedule(self) -> None:
        body = {"cron": "*/30 * * * *", "request": {"target": "all", "params": {"argv": ["true"]}}}
        self._check(self._await(self.h.call("POST", "/schedules", body)))

    @precondition(lambda self: any(self.held.values()))
    @rule(i=st.integers(0, 3), ok=st.booleans())
    def report(self, i: int, ok: bool) -> None:
        holders = [k for k, v in self.held.items() if v]
        k = holders[i % len(holders)]
        self._await(self.agents[k].report(self.held[k].pop(0), ok))

    @rule(seconds=st.sampled_from([1, 300, 600, 1800, 3600]))
    def time_passes(self, seconds: int) -> None:
        self.clock.advance(seconds)
        self._await(self.h.tick())

    @rule()
    def lifecycle_pass(self) -> None:
        self._await(self.h.tick())

    # -- what must always hold --------------------------------------------------------

    @invariant()
    def history_follows_the_table(self) -> None:
        self._await(self._history())

    async def _history(self) -> None:
        async with self.h.rt.read.connect() as conn:
            events = list(
                await conn.execute(
                    sa.text(
                        "SELECT activity_id, from_state, to_state FROM activity_events "
                        "ORDER BY activity_id, id"
                    )
                )
            )
            rows = list(
                await conn.execute(
                    sa.text(
                        "SELECT a.id, a.state, a.delivered_at, a.not_before, r.approval "
                        "FROM activities a JOIN requests r ON r.id = a.request_id"
                    )
                )
            )
        last: dict[int, str | None] = {}
        for aid, frm, to in events:
            assert frm == last.get(aid), f"activity {aid}: {frm} after {last.get(aid)}"
            if frm is not None:
                assert State(to) in CLIENT_TRANSITIONS[State(frm)], f"{aid}: {frm} -> {to}"
            last[aid] = to
        for aid, state, delivered, not_before, approval in rows:
            assert last[aid] == state
            if delivered is not None and not_before is not None:
                assert delivered >= not_before, f"activity {aid} handed out before its time"
            a = json.loads(approval) if isinstance(approval, str) else approval
            if a is not None and a.get("decision") is None:
                assert state in ("blocked", "canceled"), f"{aid} {state} before approval"
            if a is not None and a.get("decision") in ("rejected", "expired"):
                assert delivered is None, f"{aid} delivered though not approved"


TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = settings(
    max_examples=int(os.environ.get("TASKFLEET_STATEFUL_EXAMPLES", "12")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
