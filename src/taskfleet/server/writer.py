"""The single writer: every database write of a server process goes through here.

Contract:
* ``run(fn)`` runs ``fn(conn)`` in its own write transaction and returns its
  result after the commit; ``after`` callbacks run only once it committed.
  Function jobs queued at the same moment share one transaction (one commit);
  a failing one is rolled back alone (a savepoint each on the retry).
* ``batch(job)`` queues a job of a kind registered with ``register``: jobs
  of one kind queued at the same moment go to its handler together, which
  applies them (``begin``, ``committed``) and settles each ``job.fut``. The
  exchange (``server/exchange.py``) is such a kind: 10,000 agents reporting at
  once cost a few transactions, not 10,000.
* Jobs run in the order queued (consecutive jobs of one kind go together).
* ``run_sync(fn)`` is ``run`` for a synchronous ``fn(conn)`` over a sync
  ``Connection``: the hot transactions (a worker's claims and results, a batch of
  submits) run whole as one function. On SQLite it runs in the writer's own
  database thread on a second, synchronous connection to the same file (same
  pragmas, BEGIN IMMEDIATE): one hand-over between the event loop and that thread
  per transaction, where the async driver makes 3-4 per statement, each waiting
  for the event loop's current turn. The two connections never contend: the
  writer runs one transaction at a time. On PostgreSQL: ``AsyncConnection.run_sync``.
* ``on_finished`` is called after each commit with the activities that
  transaction moved to a final state (``store.activities`` records them).
A single writer per process also means SQLite never returns "database is
locked" to a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from taskfleet.server import metrics
from taskfleet.settings import WRITE_BATCH_MAX
from taskfleet.store import db
from taskfleet.store.activities import FINISHED
from taskfleet.store.unavailable import log_failure

log = logging.getLogger("taskfleet.writer")
_STOP = object()  # put by stop(): the loop ends after the jobs queued before it
T = TypeVar("T")


class BatchJob(Protocol):
    """A job for ``Writer.batch``: its handler settles ``fut``."""

    fut: asyncio.Future[Any]


@dataclass
class _FnJob:
    fn: Callable[[AsyncConnection], Awaitable[Any]]
    fut: asyncio.Future[Any]
    after: Callable[[Any], None] | None = None


@dataclass
class _SyncJob:
    fn: Callable[[sa.Connection], Any]
    fut: asyncio.Future[Any]
    after: Callable[[Any], None] | None = None


def _apply(
    conn: sa.Connection, fns: list[Callable[[sa.Connection], Any]], savepoints: bool
) -> list[tuple[bool, Any]]:
    """Run sync jobs in the caller's transaction: without savepoints, the first
    failure propagates (the transaction rolls back); with, each failure undoes only
    its own job's writes and is returned as its outcome."""
    if not savepoints:
        return [(True, fn(conn)) for fn in fns]
    outcomes: list[tuple[bool, Any]] = []
    for fn in fns:
        savepoint = conn.begin_nested()
        try:
            result = fn(conn)
        except Exception as exc:  # the caller gets it; the others go on
            savepoint.rollback()
            outcomes.append((False, exc))
        else:
            savepoint.commit()
            outcomes.append((True, result))
    return outcomes


class _Unran(Exception):
    """A job raised inside the transaction (not at commit): ``exc`` is what it raised."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


class Writer:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # Called after each commit with the activities it moved to a final
        # state (the lifecycle engine releases what waited on them).
        self.on_finished: Callable[[set[int]], None] | None = None
        self._done_ids: set[int] = set()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()  # jobs, or _STOP
        self._task: asyncio.Task[None] | None = None
        self.pg = engine.dialect.name == "postgresql"
        # job type -> what applies a list of them
        self._handlers: dict[type, Callable[[list[Any]], Awaitable[None]]] = {
            _FnJob: self._fns,
            _SyncJob: self._syncs,
        }
        # SQLite: ``run_sync`` jobs run on this engine, in this one thread (start()).
        self._sync_engine: sa.Engine | None = None
        self._thread: ThreadPoolExecutor | None = None

    def register(self, kind: type, handler: Callable[[list[Any]], Awaitable[None]]) -> None:
        """Jobs of type ``kind`` (see ``batch``) are applied by ``handler``, in batches."""
        self._handlers[kind] = handler

    def start(self) -> None:
        metrics.WRITER_QUEUED.set_function(self._queue.qsize)
        if self.engine.dialect.name == "sqlite" and self._sync_engine is None:
            self._sync_engine = db.sync_writer_engine(self.engine)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="writer-sqlite")
        self._task = asyncio.create_task(self._loop(), name="writer")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Finish what is queued, then end; cancel only if that takes too long."""
        task = self._task
        if task is None or task.done():
            return
        self._queue.put_nowait(_STOP)
        try:
            await asyncio.wait_for(asyncio.shield(task), 10.0)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        engine, thread, self._sync_engine, self._thread = (
            self._sync_engine,
            self._thread,
            None,
            None,
        )
        if engine is not None and thread is not None:
            # In its thread: a transaction still running there (after a cancel) ends first.
            await asyncio.get_running_loop().run_in_executor(thread, engine.dispose)
            thread.shutdown(wait=False)

    async def run(
        self,
        fn: Callable[[AsyncConnection], Awaitable[T]],
        after: Callable[[T], None] | None = None,
    ) -> T:
        """Run ``fn`` in its own transaction; ``after(result)`` runs right after the
        commit, before any other write, so in-memory state follows the database."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_FnJob(fn, fut, after))
        return await fut

    async def run_sync(
        self,
        fn: Callable[[sa.Connection], T],
        after: Callable[[T], None] | None = None,
    ) -> T:
        """``run`` for a synchronous ``fn`` (see the module's contract): the whole
        transaction without a hand-over per statement."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_SyncJob(fn, fut, after))
        return await fut

    async def batch(self, job: BatchJob) -> Any:
        """Queue ``job`` for the handler of its type; its result once applied."""
        self.defer(job)
        return await job.fut

    def defer(self, job: BatchJob) -> None:
        """Queue ``job`` (again): a handler puts back what this batch cannot take."""
        self._queue.put_nowait(job)

    async def _loop(self) -> None:
        while True:
            first = await self._queue.get()
            batch: list[Any] = []
            stopping = first is _STOP
            if not stopping:
                batch.append(first)
            while len(batch) < WRITE_BATCH_MAX and not self._queue.empty() and not stopping:
                job = self._queue.get_nowait()
                if job is _STOP:
                    stopping = True
                else:
                    batch.append(job)
            # Keep FIFO order: consecutive jobs of one kind go together.
            run: list[Any] = []
            for job in batch:
                if run and type(job) is not type(run[0]):
                    await self._handlers[type(run[0])](run)
                    run = []
                run.append(job)
            if run:
                await self._handlers[type(run[0])](run)
            if stopping:
                return

    async def _fns(self, jobs: list[_FnJob]) -> None:
        """Run function jobs in one transaction: one commit for the batch.

        Optimistic first: the whole batch without savepoints (they cost a round
        trip each). If any job fails, the batch is rolled back and run again with
        one savepoint per job, so a failing job undoes only its own writes. A
        batch of one needs no savepoint: its transaction is its own."""
        if len(jobs) == 1:
            await self._one_fn(jobs[0])
            return
        try:
            async with self.begin() as conn:
                results = [await job.fn(conn) for job in jobs]
        except Exception:
            pass  # someone's bad input: find out whose, below
        else:
            self.committed()
            self._settle(jobs, [(True, r) for r in results])
            return
        outcomes: list[tuple[bool, Any]] = []
        try:
            async with self.begin() as conn:
                for job in jobs:
                    savepoint = await conn.begin_nested()
                    try:
                        result = await job.fn(conn)
                    except Exception as exc:  # the caller gets it; the others go on
                        await savepoint.rollback()
                        outcomes.append((False, exc))
                    else:
                        await savepoint.commit()
                        outcomes.append((True, result))
        except Exception as exc:
            log_failure(log, exc, "write batch of %d jobs failed at commit", len(jobs))
            for job in jobs:
                if not job.fut.done():
                    job.fut.set_exception(exc)
            return
        self.committed()
        self._settle(jobs, outcomes)

    async def _one_fn(self, job: _FnJob) -> None:
        ran = False
        try:
            async with self.begin() as conn:
                result = await job.fn(conn)
                ran = True
        except Exception as exc:
            if ran:
                log_failure(log, exc, "write batch of 1 job failed at commit")
            if not job.fut.done():
                job.fut.set_exception(exc)
            return
        self.committed()
        self._settle([job], [(True, result)])

    async def _syncs(self, jobs: list[_SyncJob]) -> None:
        """Sync jobs in one transaction, as ``_fns`` does function jobs: optimistic
        first, then (several jobs, one failed) again with a savepoint per job."""
        fns = [job.fn for job in jobs]
        try:
            outcomes = await self._sync_transaction(fns, savepoints=False)
        except _Unran as unran:
            if len(jobs) == 1:
                self._settle(jobs, [(False, unran.exc)])
                return
        except Exception as exc:
            self._fail_commit(jobs, exc)
            return
        else:
            self.committed()
            self._settle(jobs, outcomes)
            return
        try:
            outcomes = await self._sync_transaction(fns, savepoints=True)
        except Exception as exc:
            self._fail_commit(jobs, exc.exc if isinstance(exc, _Unran) else exc)
            return
        self.committed()
        self._settle(jobs, outcomes)

    async def _sync_transaction(
        self, fns: list[Callable[[sa.Connection], Any]], savepoints: bool
    ) -> list[tuple[bool, Any]]:
        """One write transaction running ``fns``; a job's exception comes as ``_Unran``,
        one at commit as it is."""
        done: set[int] = set()
        self._done_ids = done

        def body(conn: sa.Connection) -> list[tuple[bool, Any]]:
            try:
                return _apply(conn, fns, savepoints)
            except Exception as exc:
                raise _Unran(exc) from exc

        engine, thread = self._sync_engine, self._thread
        if engine is None or thread is None:  # PostgreSQL: one greenlet for the whole body
            async with self.begin() as aconn:
                return await aconn.run_sync(body)

        def in_thread() -> list[tuple[bool, Any]]:
            with engine.begin() as conn:
                conn.info[FINISHED] = done
                try:
                    return body(conn)
                finally:
                    conn.info.pop(FINISHED, None)

        return await asyncio.get_running_loop().run_in_executor(thread, in_thread)

    def _fail_commit(self, jobs: list[_SyncJob], exc: Exception) -> None:
        log_failure(log, exc, "write batch of %d jobs failed at commit", len(jobs))
        for job in jobs:
            if not job.fut.done():
                job.fut.set_exception(exc)

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction that records what it finishes (for ``committed``)."""
        self._done_ids = set()
        async with self.engine.begin() as conn:
            # Per transaction: the pooled connection's info outlives it.
            conn.info[FINISHED] = self._done_ids
            try:
                yield conn
            finally:
                conn.info.pop(FINISHED, None)

    def committed(self) -> None:
        """After a commit: tell the lifecycle engine what that transaction finished."""
        ids, self._done_ids = self._done_ids, set()
        if ids and self.on_finished is not None:
            try:
                self.on_finished(ids)
            except Exception:
                log.exception("after-commit finished hook failed")

    def _settle(self, jobs: Sequence[_FnJob | _SyncJob], outcomes: list[tuple[bool, Any]]) -> None:
        for job, (ok, value) in zip(jobs, outcomes, strict=True):
            if ok and job.after is not None:
                try:
                    job.after(value)
                except Exception:
                    log.exception("after-commit step failed")
            if job.fut.done():
                continue
            if ok:
                job.fut.set_result(value)
            else:
                job.fut.set_exception(value)
