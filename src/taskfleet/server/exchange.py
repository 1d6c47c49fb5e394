"""The exchange: applying agent messages and handing out work (SPEC 3.1, docs/protocol.md).

Contract:
* ``Exchange.exchange(job)`` applies an agent exchange (results, acks, hand-out
  of queued work) through the single writer and returns the response body.
  Exchanges waiting at the same moment are applied together in ONE
  transaction with set-wise statements, so 10,000 agents reporting at once
  cost a few hundred statements and a few fsyncs, not 10,000 of each. A job
  that turns out to be bad input fails alone: the batch is retried without it;
  a batch that fails for any other reason is split in halves, each retried on
  its own, so one failing exchange fails alone and the others are applied.
* A reply carries at most ``REPLY_MAX_BYTES`` of messages (or one larger
  message); work that does not fit stays Queued and ``more`` tells the agent
  to exchange again at once. Jobs of one relay exchange (``exchange_all``)
  are applied in one batch, share a ``ReplyBudget`` for the whole reply and
  skip what the relay already holds (``have``).
* Every server -> agent message is numbered and queued by ``server/outbox.py``
  (the hand-out here, a cancel in ``server/requests.py``, a terminate in
  ``server/jobs.py``).
* ``refused`` messages (an agent did not act on a server message that was not
  genuinely for it) are recorded by ``server/refusals.py``: an audit entry in
  the same transaction, the metric and log line after it commits; they change
  no activity state.
* ``job-step`` messages (``protocol/jobs.py``) are recorded in ``job_steps`` in the
  same transaction (one upsert for the batch; a step reported again keeps its last
  report) and move the lost-deadline of the job's activity like a ``working``
  status; a step for an operation that is not a job delivered to that computer is
  ignored and logged, the rest of the exchange applied.
* ``inventory`` messages (``protocol/inventory.py``) are applied by
  ``server/computer_inventory.py`` in the same transaction (set-wise for the
  batch); a computer whose report could not be applied gets ``inventory_full``
  set after the commit, which makes its replies ask for the whole inventory
  until one is stored.
* In-memory fleet counters change only after the commit that persisted them.
* PostgreSQL (several server processes may serve one computer): the batch first
  locks its computers' rows in id order and takes their counters from there, not
  from memory (``_locked_counters``); an ack beyond the stored ``out_seq`` is bad
  input, and a computer removed or enrolled again meanwhile fails alone with
  ``ComputerGone`` (the route answers 401). SQLite: memory is the truth.

Longer than ~600 lines on purpose: applying results, acks, resends and the
hand-out are one set-wise transaction over one ``Pending`` per computer;
split, each part would need the others' private state. A relay exchange is the
same transaction over many computers (``ExchangeGroup``, a shared
``ReplyBudget``, ``have``), so it lives here too; what is relay-specific
around it (authentication, roster, which computers to add) is in
``server/relays.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.jobs import JOB
from taskfleet.domain.policy import DEFAULT_POLICY
from taskfleet.domain.states import (
    FINAL_STATES,
    ActivityKind,
    Cause,
    State,
    Transition,
    transition,
)
from taskfleet.protocol.exchange import (
    AgentRequest,
    OperationResult,
    OperationStatus,
    ProtocolError,
    RefusedMessage,
    operation_message,
)
from taskfleet.protocol.inventory import InventoryReport
from taskfleet.protocol.jobs import JobStep
from taskfleet.protocol.orders import operation_body
from taskfleet.protocol.signing import Signer
from taskfleet.server import computer_inventory, identity, metrics, refusals
from taskfleet.server.fleet import ComputerState, Fleet
from taskfleet.server.outbox import Outbox, lock_counters
from taskfleet.server.writer import Writer
from taskfleet.settings import INT32_MAX, REPLY_MAX_BYTES
from taskfleet.store.activities import Change, apply_changes, insert_events
from taskfleet.store.job_steps import upsert_steps
from taskfleet.store.schema import activities, computers, outbox, requests
from taskfleet.store.unavailable import log_failure

log = logging.getLogger("taskfleet.writer")  # its messages kept their logger

_CLIENT = ActivityKind.CLIENT
_REPORTED = (State.IN_PROGRESS, *FINAL_STATES)  # a job step is recorded in these states


class ReplyBudget:
    """Bytes of messages the replies of several jobs share (a relay exchange's reply);
    the whole reply takes at least one message."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit


@dataclass
class ExchangeJob:
    cs: ComputerState
    req: AgentRequest
    address: str | None
    # Through a relay (server/relays.py): the relay already holds the server's
    # messages up to ``have`` (they are not sent again); ``seen`` is when the agent
    # was last heard (None: now, it is speaking).
    have: int = 0
    seen: float | None = None
    budget: ReplyBudget | None = None  # shared with the other jobs of one reply
    fut: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass
class ExchangeGroup:
    """Exchange jobs that reach the writer as one job, so they are applied together
    (a relay exchange's entries). Each job settles its own ``fut``."""

    jobs: list[ExchangeJob]
    fut: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass
class Pending:
    """What a batch will change in memory once it commits."""

    in_acked: int
    out_seq: int
    out_acked: int
    budget: ReplyBudget | None = None
    messages: list[str] = field(default_factory=list)
    size: int = 0  # bytes of ``messages`` (ASCII JSON texts)
    more: bool = False  # messages left for the next exchange
    sent: int = 0  # seq of the last message in ``messages``
    refused: list[RefusedMessage] = field(default_factory=list)  # reported after the commit
    inventory: list[InventoryReport] = field(default_factory=list)
    inventory_full: bool | None = None  # after the commit: ask for the whole one (or stop)

    def fits(self, message: str) -> bool:
        """Whether the reply can take ``message``; a reply takes at least one."""
        if self.budget is not None and not self.budget.fits(len(message)):
            return False
        return not self.messages or self.size + len(message) <= REPLY_MAX_BYTES

    def add(self, message: str, seq: int) -> None:
        self.messages.append(message)
        self.size += len(message)
        self.sent = seq
        if self.budget is not None:
            self.budget.used += len(message)


class Exchange:
    def __init__(
        self,
        writer: Writer,
        fleet: Fleet,
        signer: Signer,
        *,
        lost_grace: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.writer = writer
        self.fleet = fleet
        self.signer = signer
        self.lost_grace = lost_grace
        self.clock = clock
        # computer id, now -> True while its maintenance window is closed
        self.window_closed: Callable[[int, float], bool] = lambda _cid, _now: False
        # computer id -> its windows as a job operation carries them, or None
        self.job_windows: Callable[[int], list[dict[str, Any]] | None] = lambda _cid: None
        writer.register(ExchangeJob, self.apply)
        writer.register(ExchangeGroup, self.apply_groups)

    async def exchange(self, job: ExchangeJob) -> dict[str, Any]:
        result: dict[str, Any] = await self.writer.batch(job)
        return result

    async def exchange_all(self, jobs: list[ExchangeJob]) -> list[dict[str, Any] | BaseException]:
        """Apply ``jobs`` in one writer batch; each one's reply, or what failed it alone."""
        if not jobs:
            return []
        self.writer.defer(ExchangeGroup(jobs))
        return await asyncio.gather(*(j.fut for j in jobs), return_exceptions=True)

    async def apply_groups(self, groups: list[ExchangeGroup]) -> None:
        """The writer's handler for groups of exchange jobs: one batch for them all."""
        await self.apply([job for group in groups for job in group.jobs])
        for group in groups:
            if not group.fut.done():
                group.fut.set_result(None)

    async def apply(self, jobs: list[ExchangeJob]) -> None:
        """The writer's handler for exchange jobs (``Writer.register``)."""
        # One computer may appear once per batch: its counters are per batch.
        seen: set[int] = set()
        now_jobs: list[ExchangeJob] = []
        for job in jobs:
            if job.cs.id in seen:
                self.writer.defer(job)
            else:
                seen.add(job.cs.id)
                now_jobs.append(job)
        metrics.BATCH_SIZE.observe(len(now_jobs))
        await self._exchange_batch(now_jobs)

    async def _exchange_batch(self, jobs: list[ExchangeJob]) -> None:
        """Apply ``jobs`` in one transaction, isolating a job that fails.

        A job found to be bad input (``_BadJob``) fails and the rest are retried.
        Any other failure (a value the database refuses, a trigger, a constraint)
        cannot be pinned on a job by its exception, so the batch is split in
        halves and each half retried on its own, down to the one job that fails
        alone: about 2*log2(n) extra transactions, paid only when one failed.
        A failure before the transaction began (the database is unreachable)
        fails every job at once: retrying them one by one could not help."""
        while jobs:
            had_work = [j.cs.has_work for j in jobs]
            began = False
            try:
                async with self.writer.begin() as conn:
                    began = True
                    pending = await self._apply(conn, jobs)
            except _BadJob as bad:
                _restore_has_work(jobs, had_work)
                jobs = [j for j in jobs if j is not bad.job]
                _fail(bad.job, bad.error)
                continue
            except Exception as exc:
                _restore_has_work(jobs, had_work)
                if len(jobs) > 1 and began:
                    log.warning("exchange batch of %d failed (%r); splitting it", len(jobs), exc)
                    half = len(jobs) // 2
                    await self._exchange_batch(jobs[:half])
                    await self._exchange_batch(jobs[half:])
                    return
                log_failure(log, exc, "exchange batch of %d failed", len(jobs))
                for job in jobs:
                    _fail(job, exc)
                return
            self.writer.committed()
            now = self.clock()
            for job in jobs:
                p = pending[job.cs.id]
                cs = job.cs
                refusals.report(cs.id, p.refused)
                if p.inventory_full is not None:
                    cs.inventory_full = p.inventory_full
                cs.in_acked, cs.out_seq, cs.out_acked = p.in_acked, p.out_seq, p.out_acked
                if job.req.agent is not None:
                    self.fleet.reach(cs, job.address, job.req.agent.tickle_port, cs.via_relay)
                if not job.fut.done():
                    job.fut.set_result(
                        {
                            "ack": p.in_acked,
                            "messages": p.messages,
                            "server_time": now,
                            "more": p.more,
                            "sent": p.sent,
                            "inventory_full": cs.inventory_full,
                        }
                    )
            return

    async def _apply(self, conn: AsyncConnection, jobs: list[ExchangeJob]) -> dict[int, Pending]:
        now = self.clock()
        if self.writer.pg:
            pending = await self._locked_counters(conn, jobs)
        else:  # one process: memory is the truth
            pending = {
                j.cs.id: Pending(j.cs.in_acked, j.cs.out_seq, j.cs.out_acked, j.budget)
                for j in jobs
            }
        for j in jobs:
            if j.req.ack > pending[j.cs.id].out_seq:
                raise _BadJob(
                    j,
                    ProtocolError(
                        f"ack {j.req.ack} is beyond the last message sent "
                        f"({pending[j.cs.id].out_seq})"
                    ),
                )
        await self._apply_results(conn, jobs, pending, now)

        # Acknowledgements of server messages: forget what the agent stored.
        acked = [
            {"c": j.cs.id, "s": j.req.ack} for j in jobs if j.req.ack > pending[j.cs.id].out_acked
        ]
        if acked:
            await conn.execute(
                outbox.delete()
                .where(outbox.c.computer_id == sa.bindparam("c"))
                .where(outbox.c.seq <= sa.bindparam("s")),
                acked,
            )
            for a in acked:
                pending[a["c"]].out_acked = a["s"]

        # Resend everything above the agent's ack (and above what its relay holds),
        # verbatim and in order, as far as the reply's byte budget goes; the agent
        # acks it and gets the rest next.
        floors = {j.cs.id: max(j.req.ack, j.have) for j in jobs}
        resend = [j for j in jobs if pending[j.cs.id].out_seq > floors[j.cs.id]]
        if resend:
            rows = await conn.execute(
                sa.select(outbox.c.computer_id, outbox.c.seq, outbox.c.message)
                .where(outbox.c.computer_id.in_([j.cs.id for j in resend]))
                .order_by(outbox.c.computer_id, outbox.c.seq)
            )
            for cid, seq, message in rows:
                p = pending[cid]
                if seq <= floors[cid] or p.more:
                    continue
                if p.fits(message):
                    p.add(message, seq)
                else:
                    p.more = True

        # New work goes after the resends, in what is left of the budget; none to a
        # computer flagged for a cloned identity (server/identity.py): it stays Queued.
        await self._hand_out(
            conn, [j for j in jobs if j.cs.has_work and not identity.blocked(j.cs)], pending, now
        )

        await conn.execute(
            computers.update()
            .where(computers.c.id == sa.bindparam("b_id"))
            .values(
                in_acked=sa.bindparam("in_acked"),
                out_seq=sa.bindparam("out_seq"),
                out_acked=sa.bindparam("out_acked"),
                last_seen_at=sa.bindparam("seen"),
            ),
            [
                {
                    "b_id": j.cs.id,
                    "in_acked": pending[j.cs.id].in_acked,
                    "out_seq": pending[j.cs.id].out_seq,
                    "out_acked": pending[j.cs.id].out_acked,
                    "seen": now if j.seen is None else j.seen,
                }
                for j in jobs
            ],
        )
        agent_info = [j for j in jobs if j.req.agent is not None]
        if agent_info:
            await conn.execute(
                computers.update()
                .where(computers.c.id == sa.bindparam("b_id"))
                .values(
                    tickle_port=sa.bindparam("port"),
                    agent_version=sa.bindparam("version"),
                    policy=sa.bindparam("policy"),
                    address=sa.bindparam("address"),
                ),
                [
                    {
                        "b_id": j.cs.id,
                        "port": j.req.agent.tickle_port,
                        "version": j.req.agent.version,
                        "policy": j.req.agent.policy,
                        "address": j.address,
                    }
                    for j in agent_info
                    if j.req.agent is not None
                ],
            )
        return pending

    async def _locked_counters(
        self, conn: AsyncConnection, jobs: list[ExchangeJob]
    ) -> dict[int, Pending]:
        """PostgreSQL: the computers' counters as stored, their rows locked (in id
        order) until the commit: another server process may have moved them (its
        own exchange of this computer, a cancel). Memory takes them after the commit.
        A computer removed or enrolled again meanwhile (by any process) is refused."""
        rows = await lock_counters(conn, (j.cs.id for j in jobs))
        pending: dict[int, Pending] = {}
        for j in jobs:
            row = rows.get(j.cs.id)
            if row is None or row.removed_at is not None or row.generation != j.cs.generation:
                raise _BadJob(j, ComputerGone(j.cs.id))
            pending[j.cs.id] = Pending(row.in_acked, row.out_seq, row.out_acked, j.budget)
        return pending

    async def _apply_results(
        self,
        conn: AsyncConnection,
        jobs: list[ExchangeJob],
        pending: dict[int, Pending],
        now: float,
    ) -> None:
        fresh, steps = _fresh_messages(jobs, pending)
        await refusals.record(
            conn,
            [(j.cs.id, j.cs.tenant_id, m) for j in jobs for m in pending[j.cs.id].refused],
            now,
        )
        await self._record_inventory(conn, jobs, pending, now)
        if not fresh and not steps:
            return
        ids = list({m.op for _, m in fresh} | {m.op for _, m in steps})
        query = (
            sa.select(
                activities.c.id,
                activities.c.computer_id,
                activities.c.state,
                activities.c.kind,
                activities.c.runs,
                requests.c.timeout,
                activities.c.type,
                activities.c.request_id,
                activities.c.tenant_id,
            )
            .join(requests, requests.c.id == activities.c.request_id)
            .where(activities.c.id.in_(ids))
        )
        if self.writer.pg:
            query = query.with_for_update(of=activities)
        current: dict[int, Any] = {row.id: row for row in await conn.execute(query)}
        jobs_of = {row.id: row for row in current.values() if row.type == JOB}
        changes: list[Change] = []
        reports: list[dict[str, Any]] = []
        statuses: list[dict[str, Any]] = []
        events: list[tuple[int, int, Transition]] = []
        for job, m in fresh:
            row = current.get(m.op)
            if row is None or row.computer_id != job.cs.id or row.kind != _CLIENT.value:
                raise _BadJob(
                    job,
                    ProtocolError(f"operation {m.op} does not belong to this computer"),
                )
            state = State(row.state)
            if state not in (State.IN_PROGRESS, *FINAL_STATES):
                raise _BadJob(
                    job,
                    ProtocolError(f"operation {m.op} was never delivered (state {state.label})"),
                )
            if isinstance(m, OperationStatus):
                if state is State.IN_PROGRESS:
                    statuses.append(self._status_values(m, row.timeout, now))
                    if m.status == "failed":
                        # A failed attempt that will be retried (SPEC 5): recorded in
                        # the history, the activity stays In Progress.
                        events.append((m.op, job.cs.tenant_id, _retry_event(job.cs.id, m, now)))
                continue
            values = _result_values(m)
            if state is State.IN_PROGRESS and m.recurring:
                # One run of a recurring operation: recorded, the activity goes on.
                runs = (row.runs or 0) + 1
                current[m.op] = _Row(
                    row.id, row.computer_id, row.state, row.kind, runs, row.timeout
                )
                reports.append(
                    {
                        "b_id": m.op,
                        "report": {**values, "status": m.status, "received_at": now, "run": runs},
                        "runs": runs,
                        "deadline_at": None,
                        "agent_status": "waiting",
                    }
                )
            elif state is State.IN_PROGRESS:
                target = {
                    "succeeded": State.SUCCEEDED,
                    "failed": State.FAILED,
                    "canceled": State.CANCELED,
                }[m.status]
                t = transition(
                    _CLIENT,
                    state,
                    target,
                    cause=Cause.AGENT_REPORT,
                    actor=f"computer:{job.cs.id}",
                    at=now,
                    reason=m.result_line,
                )
                changes.append(Change(m.op, job.cs.tenant_id, t, {**values, "finished_at": now}))
                current[m.op] = _Row(
                    row.id, row.computer_id, target.value, row.kind, row.runs, row.timeout
                )
            else:
                # A late report (after a cancel, or after the server declared it
                # lost): the state stays, what really happened is recorded.
                reports.append(
                    {
                        "b_id": m.op,
                        "report": {**values, "status": m.status, "received_at": now},
                        "runs": row.runs,
                        "deadline_at": None,
                        "agent_status": None,
                    }
                )
        await conn.run_sync(apply_changes, changes)
        await conn.run_sync(insert_events, events)
        if reports:
            await conn.execute(
                activities.update()
                .where(activities.c.id == sa.bindparam("b_id"))
                .values(
                    agent_report=sa.bindparam("report"),
                    runs=sa.bindparam("runs"),
                    deadline_at=sa.bindparam("deadline_at"),
                    agent_status=sa.bindparam("agent_status"),
                ),
                reports,
            )
        if statuses:
            await conn.execute(
                activities.update()
                .where(activities.c.id == sa.bindparam("b_id"))
                .values(
                    agent_status=sa.bindparam("agent_status"),
                    agent_attempt=sa.bindparam("agent_attempt"),
                    deadline_at=sa.bindparam("deadline_at"),
                    reason=sa.bindparam("reason"),
                ),
                statuses,
            )
        told = {v["b_id"]: v["deadline_at"] for v in statuses}
        await self._record_steps(conn, steps, jobs_of, current, now, told)
        metrics.RESULTS.inc(len(changes))

    async def _record_inventory(
        self,
        conn: AsyncConnection,
        jobs: list[ExchangeJob],
        pending: dict[int, Pending],
        now: float,
    ) -> None:
        reports = [(j.cs.id, j.cs.tenant_id, pending[j.cs.id].inventory) for j in jobs]
        done = await computer_inventory.record(conn, [r for r in reports if r[2]], now)
        for cid in done.got_full:
            pending[cid].inventory_full = False
        for cid in done.want_full:
            pending[cid].inventory_full = True

    async def _record_steps(
        self,
        conn: AsyncConnection,
        steps: list[tuple[int, JobStep]],
        jobs_of: dict[int, Any],
        current: dict[int, Any],
        now: float,
        told: dict[int, float | None],
    ) -> None:
        """Record job steps (``store/job_steps.py``), the last report of a step winning,
        and move the lost-deadline of a job still In Progress: each step says the
        computer is alive and working on it (SPEC 9's two timeouts, for long jobs).
        A status in the same exchange (``told``: op -> its deadline, None for none)
        is never cut short by a step: a job that reported its last Download step
        and then that it waits for its window until tomorrow is not lost tonight.
        A step that names no job operation delivered to this computer is ignored."""
        if not steps:
            return
        rows: dict[tuple[int, str, int], dict[str, Any]] = {}
        alive: dict[int, float] = {}
        for cid, m in steps:
            row = jobs_of.get(m.op)
            state = State(current[m.op].state) if row is not None else None
            if row is None or row.computer_id != cid or state is None or state not in _REPORTED:
                log.warning(
                    "computer %d: job-step for operation %d ignored: not a job delivered to it",
                    cid,
                    m.op,
                )
                continue
            rows[(m.op, m.phase, m.item)] = {
                "activity_id": m.op,
                "phase": m.phase,
                "item": m.item,
                "request_id": row.request_id,
                "tenant_id": row.tenant_id,
                "status": m.status,
                "detail": m.detail,
                "at": now if m.at is None else m.at,
            }
            if state is State.IN_PROGRESS and told.get(m.op, 0.0) is not None:
                alive[m.op] = max(now + row.timeout + self.lost_grace, told.get(m.op) or 0.0)
        await upsert_steps(conn, list(rows.values()))
        if alive:
            await conn.execute(
                activities.update()
                .where(activities.c.id == sa.bindparam("b_id"))
                .values(deadline_at=sa.bindparam("deadline_at")),
                [{"b_id": op, "deadline_at": at} for op, at in alive.items()],
            )

    def _first_deadline(self, row: Any, now: float) -> float | None:
        # A recurring operation has no end; each run's "working" status sets one.
        return None if _recurring(row.policy) else now + row.timeout + self.lost_grace

    def _status_values(self, m: OperationStatus, timeout: float, now: float) -> dict[str, Any]:
        # SPEC 9's two timeouts stay in step with what the agent says: a run
        # (or a new attempt) restarts the clock; deferred work is not lost
        # while it waits for its window.
        if m.status == "working":
            deadline: float | None = now + timeout + self.lost_grace
            # An agent may say what the run waits for (a restart: the computer's return).
            reason = m.reason or f"running on the computer (attempt {m.attempt})"
        elif m.status == "failed":
            # The retry starts at the agent's next scrubber run (``until``); it is
            # lost only if no run starts by then plus the time limit and grace.
            start = now if m.until is None else max(now, m.until)
            deadline = start + timeout + self.lost_grace
            reason = m.reason or f"failed, will retry (attempt {m.attempt})"
        else:
            deadline = None if m.until is None else m.until + timeout + self.lost_grace
            reason = f"deferred by the computer: {m.reason}"
        return {
            "b_id": m.op,
            "agent_status": m.status,
            "agent_attempt": m.attempt,
            "deadline_at": deadline,
            "reason": reason[:2000],
        }

    async def _hand_out(
        self,
        conn: AsyncConnection,
        jobs: list[ExchangeJob],
        pending: dict[int, Pending],
        now: float,
    ) -> None:
        if not jobs:
            return
        by_id = {j.cs.id: j.cs for j in jobs}
        for cs in by_id.values():
            # Cleared before the read: work committed after it sets it again.
            # Held work (a closed window, a later time) is woken by the
            # lifecycle engine when it becomes due.
            cs.has_work = False
        # A closed maintenance window holds a computer's work, except jobs: their
        # Analyze and Download run outside it and the agent holds the action until
        # the windows it is sent open (SPEC 9, issue 12).
        held = [cid for cid in by_id if self.window_closed(cid, now)]
        open_ids = [cid for cid in by_id if cid not in held]
        mine: sa.ColumnElement[bool] = activities.c.computer_id.in_(open_ids)
        if held:
            mine = sa.or_(mine, activities.c.computer_id.in_(held) & (activities.c.type == JOB))
        query = (
            sa.select(
                activities.c.id,
                activities.c.computer_id,
                activities.c.tenant_id,
                activities.c.type,
                activities.c.state,
                requests.c.params,
                requests.c.timeout,
                requests.c.policy,
            )
            .join(requests, requests.c.id == activities.c.request_id)
            .where(mine)
            .where(activities.c.state.in_([State.QUEUED.value, State.SCHEDULED.value]))
            .where(activities.c.kind == _CLIENT.value)
            # Expired work is never handed out, even before the reaper gets to it.
            .where(sa.or_(activities.c.expires_at.is_(None), activities.c.expires_at > now))
            # "Not earlier than" (SPEC 2.1): Scheduled, or Queued after an approval.
            .where(sa.or_(activities.c.not_before.is_(None), activities.c.not_before <= now))
            .order_by(activities.c.id)
        )
        if self.writer.pg:
            query = query.with_for_update(of=activities)
        rows = (await conn.execute(query)).all()
        if not rows:
            return
        changes: list[Change] = []
        box = Outbox(lambda cid: pending[cid].out_seq)
        for row in rows:
            cs = by_id[row.computer_id]
            p = pending[cs.id]
            if p.more:
                # The reply is full: the rest stays Queued (truthfully not
                # delivered, no lost-deadline running) for the next exchange.
                cs.has_work = True
                continue
            body = operation_body(
                computer=cs.id,
                generation=cs.generation,
                op=row.id,
                type=row.type,
                params=row.params,
                policy=row.policy or DEFAULT_POLICY,
                timeout=row.timeout,
                issued_at=now,
                windows=self.job_windows(cs.id) if row.type == JOB else None,
            )
            sig = self.signer.sign(body)
            op = row.id
            message = box.append(
                cs.id,
                row.tenant_id,
                lambda seq: operation_message(seq, op, body, sig),  # noqa: B023 (called at once)
                fits=p.fits,
            )
            if message is None:
                p.more = cs.has_work = True
                continue
            p.out_seq = box.last_seq(cs.id)
            p.add(message, p.out_seq)  # the very text stored in the outbox: resends are identical
            t = transition(
                _CLIENT,
                State(row.state),  # Queued, or Scheduled whose time came
                State.IN_PROGRESS,
                cause=Cause.DELIVERED,
                actor="server",
                at=now,
                reason=f"sent to computer {cs.id} as message {p.out_seq}",
            )
            changes.append(
                Change(
                    row.id,
                    row.tenant_id,
                    t,
                    {"delivered_at": now, "deadline_at": self._first_deadline(row, now)},
                )
            )
        # The computers' out_seq is stored with the exchange's other counters.
        await box.write(conn, counters=False)
        await conn.run_sync(apply_changes, changes)
        metrics.DELIVERED.inc(len(changes))


def _fresh_messages(
    jobs: list[ExchangeJob], pending: dict[int, Pending]
) -> tuple[list[tuple[ExchangeJob, OperationResult | OperationStatus]], list[tuple[int, JobStep]]]:
    """The messages not applied before, each job's ack moved past them: results and
    statuses, and job steps (computer id, step) apart; refusals go to
    ``Pending.refused``: they are about a server message, not an operation of this
    computer's (the op they name may be another computer's: that is the point)."""
    fresh: list[tuple[ExchangeJob, OperationResult | OperationStatus]] = []
    steps: list[tuple[int, JobStep]] = []
    for job in jobs:
        p = pending[job.cs.id]
        applied = p.in_acked  # as stored (PostgreSQL) or in memory (SQLite)
        for m in job.req.messages:
            if m.seq <= applied:
                continue
            p.in_acked = m.seq
            if isinstance(m, RefusedMessage):
                p.refused.append(m)
            elif isinstance(m, InventoryReport):
                p.inventory.append(m)
            elif isinstance(m, JobStep):
                steps.append((job.cs.id, m))
            else:
                fresh.append((job, m))
    return fresh, steps


def _recurring(policy: dict[str, Any] | None) -> bool:
    return policy is not None and policy.get("interval") == "recurring"


@dataclass
class _Row:
    id: int
    computer_id: int
    state: str
    kind: str
    runs: int | None
    timeout: float


def _fail(job: ExchangeJob, error: BaseException) -> None:
    if not job.fut.done():
        job.fut.set_exception(error)


def _restore_has_work(jobs: list[ExchangeJob], had_work: list[bool]) -> None:
    # A rolled-back hand-out handed nothing out: what was waiting still is.
    # Only ever set (work queued meanwhile may have set it already).
    for job, had in zip(jobs, had_work, strict=True):
        if had:
            job.cs.has_work = True


class ComputerGone(ProtocolError):
    """The computer was removed, or enrolled again, by another server process: its
    exchange is refused as an unknown computer's (401)."""

    def __init__(self, computer_id: int) -> None:
        super().__init__(f"computer {computer_id} was removed or enrolled again")
        self.computer_id = computer_id


class _BadJob(Exception):
    def __init__(self, job: ExchangeJob, error: Exception) -> None:
        super().__init__(str(error))
        self.job = job
        self.error = error


def _retry_event(computer_id: int, m: OperationStatus, now: float) -> Transition:
    # Not a transition (the state stays In Progress), so not checked against
    # the table; recorded in the same history so `activity show` tells it.
    return Transition(
        State.IN_PROGRESS,
        State.IN_PROGRESS,
        Cause.AGENT_STATUS,
        f"computer:{computer_id}",
        now,
        (m.reason or f"failed, will retry (attempt {m.attempt})")[:2000],
    )


def _result_values(r: OperationResult) -> dict[str, Any]:
    return {
        "exit_code": r.exit_code,
        "result_line": r.result_line,
        "stdout": r.stdout,
        "stderr": r.stderr,
        # INTEGER columns; a script can drop more than 2 GiB. The exact count
        # is in the output's truncation marker, written by the agent.
        "stdout_dropped": min(r.stdout_dropped, INT32_MAX),
        "stderr_dropped": min(r.stderr_dropped, INT32_MAX),
        "agent_started_at": r.started_at,
        "agent_ended_at": r.ended_at,
    }
