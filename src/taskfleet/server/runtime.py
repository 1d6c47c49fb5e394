"""The server process at run time: its configuration, start and stop, background loops.

Contract: ``start(config)`` migrates the database, bootstraps the default
tenant, keys and first admin token, loads the fleet (computers and relays) into
memory and starts the single writer, the tickler, the lifecycle engine, the server-task manager (and
the embedded worker), the timeout reaper (lost work, expiry, a terminated job's deadline) and the
last-seen flusher; the cluster runs the lifecycle timers, the server-task scheduler and the
reaper only while this process leads (on SQLite from start), their writes fenced by the epoch;
``stop(rt)`` stops each on its own, the writer last. On PostgreSQL it also starts
the hints between server processes (``server/hints.py``): work hinted by another
process marks those computers has-work and tickles them, a changed computer or
relay is reloaded (``server/fleet_load.py``), and every listener (re)connect makes
every computer look once. Every time the server
reads comes from ``ServerConfig.clock`` (``Runtime.now``): tests inject a
fake clock and move it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from taskfleet.dispatch import open_queue
from taskfleet.protocol.signing import Signer
from taskfleet.server import fleet_load, jobs, metrics, relays, requests, schedules, tokens
from taskfleet.server.cluster import Cluster, Deposed
from taskfleet.server.content import ContentStore
from taskfleet.server.exchange import Exchange
from taskfleet.server.fleet import Fleet, reach_entry
from taskfleet.server.fleet_load import FleetLoader
from taskfleet.server.hints import (
    REACH,
    TASK_CANCEL,
    TASKS,
    TICKLE,
    WINDOWS,
    WORK,
    Hints,
    PgHints,
    parse_entries,
    parse_ids,
)
from taskfleet.server.kernel import token_hash
from taskfleet.server.lifecycle import Lifecycle
from taskfleet.server.tasks import TaskManager
from taskfleet.server.tickler import Tickler
from taskfleet.server.timeouts import reap_expired, reap_lost
from taskfleet.server.writer import Writer
from taskfleet.settings import (
    AUTH_FAILURE_LIMIT,
    ENROLL_FAILURE_LIMIT,
    IDENTITY_GRACE,
    IDENTITY_ROTATE,
    LAST_SEEN_FLUSH,
    LEADER_CATCH_UP,
    LOST_GRACE,
    POLL_INTERVAL,
    REAPER_INTERVAL,
    RELAY_POLL_INTERVAL,
    RETICKLE_WINDOW,
    SERVER_HEARTBEAT,
    TICKLE_MIN_INTERVAL,
    TICKLE_RATE,
    WORKER_CONCURRENCY,
    WORKER_HEARTBEAT_INTERVAL,
    WORKER_HEARTBEAT_TIMEOUT,
)
from taskfleet.store import db
from taskfleet.store.schema import api_tokens, computers
from taskfleet.store.tasks.heartbeats import embedded_id
from taskfleet.store.unavailable import log_failure
from taskfleet.task_type_file import load_task_types
from taskfleet.worker.builtin import BUILTINS
from taskfleet.worker.runner import Worker

log = logging.getLogger("taskfleet.server")


@dataclass
class ServerConfig:
    database_url: str
    data_dir: Path
    tickle_rate: float = TICKLE_RATE
    tickle_min_interval: float = TICKLE_MIN_INTERVAL
    lost_grace: float = LOST_GRACE
    # Identity nonces (domain/identity.py): rotated when this old (0: every exchange).
    identity_rotate: float = IDENTITY_ROTATE
    identity_grace: float = IDENTITY_GRACE
    poll_interval: float = POLL_INTERVAL
    reaper_interval: float = REAPER_INTERVAL
    public_url: str = ""  # shown to humans; set by the CLI
    tickles: bool = True  # off: agents rely on their polls (benchmarks compare both)
    task_types: Path | None = None  # TOML declarations of server task types (SPEC 4)
    queue: str = "embedded"  # or amqp://... (workers then run as `taskfleet worker`)
    workers: int = WORKER_CONCURRENCY  # embedded: tasks run at once by the in-process worker
    heartbeat_timeout: float = (
        WORKER_HEARTBEAT_TIMEOUT  # SPEC 4.6: then a silent worker's tasks fail
    )
    worker_heartbeat: float = WORKER_HEARTBEAT_INTERVAL
    # Every time-driven rule (schedules, expiry, approvals, windows) reads this;
    # tests inject a fake clock and move it instead of sleeping.
    clock: Callable[[], float] = time.time
    lifecycle_interval: float = 1.0  # seconds between lifecycle passes at most
    relay_poll_interval: float = RELAY_POLL_INTERVAL  # relays exchange at least this often
    # Failed tokens / enrollments per address within AUTH_FAILURE_WINDOW (server/abuse.py).
    auth_failure_limit: int = AUTH_FAILURE_LIMIT
    enroll_failure_limit: int = ENROLL_FAILURE_LIMIT
    cluster_heartbeat: float = SERVER_HEARTBEAT  # server processes' beat (server/cluster.py)
    leader_catch_up: float = LEADER_CATCH_UP  # the leader's scan for others' work


@dataclass
class Runtime:
    config: ServerConfig
    read: Any
    writer: Writer
    exchange: Exchange
    fleet: Fleet
    tickler: Tickler
    signer: Signer
    tickle_master: bytes
    settings_json: bytes
    relay_settings_json: bytes = b"{}"  # relay_settings of relay exchanges (docs/relays.md)
    manager: TaskManager | None = None
    lifecycle: Lifecycle | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    content: ContentStore | None = None  # content by hash under the data folder
    # Hints to and from the other server processes (PostgreSQL; server/hints.py) and
    # what reloads what they changed (server/fleet_load.py; None on SQLite).
    hints: Hints = field(default_factory=Hints)
    loader: FleetLoader | None = None
    cluster: Cluster | None = None  # the server processes on this database, the leader

    def now(self) -> float:
        """The server's clock (``ServerConfig.clock``): every route and loop reads it."""
        return self.config.clock()

    @property
    def lifecycle_engine(self) -> Lifecycle:
        assert self.lifecycle is not None
        return self.lifecycle

    @property
    def content_store(self) -> ContentStore:
        assert self.content is not None
        return self.content

    @property
    def task_manager(self) -> TaskManager:
        assert self.manager is not None
        return self.manager


def give_work(rt: Runtime, computer_ids: Iterable[int]) -> None:
    """After a commit that gave these computers work: they look at their next exchange
    (in every server process: the has-work hint), and the leader tickles them."""
    rt.tickler.wake(rt.fleet.mark_work(computer_ids), hinted=True)


def wake_targets(rt: Runtime, created: requests.Created) -> None:
    """After a request commits: its computers have work; tickle them."""
    give_work(rt, created.computer_ids)
    rt.lifecycle_engine.watch(created.request)


def queued_orders(rt: Runtime, last: dict[int, int]) -> None:
    """After a transaction that queued orders commits (``Outbox.last()``: computer id ->
    the last seq it used): memory takes those counters, and the computers are woken."""
    for cid, seq in last.items():
        cs = rt.fleet.get(cid)
        if cs is not None:
            cs.out_seq = max(cs.out_seq, seq)
    give_work(rt, last)


async def windows_changed(rt: Runtime, computer_ids: set[int]) -> None:
    """A reload here found these computers' maintenance windows changed: the other
    server processes reload theirs (PostgreSQL), the running jobs are told."""
    rt.hints.publish(WINDOWS, "")
    await send_job_windows(rt, computer_ids)


async def send_job_windows(rt: Runtime, computer_ids: set[int]) -> None:
    """These computers' maintenance windows changed: tell their running jobs."""

    def seq_of(cid: int) -> int:
        cs = rt.fleet.get(cid)
        return cs.out_seq if cs is not None else 0

    await rt.writer.run(
        lambda c: jobs.send_windows(
            c, rt.now(), seq_of, rt.signer, rt.lifecycle_engine.job_windows, computer_ids
        ),
        after=lambda appended: queued_orders(rt, appended),
    )


async def start(config: ServerConfig) -> Runtime:
    """Migrate, bootstrap, load the fleet into memory, start the writer and every loop."""
    db.secure_data_dir(config.data_dir)
    db.prepare_sqlite(config.database_url)  # raises InsecureFileError: refuse to start
    await db.upgrade(config.database_url)
    write_engine = db.create_engine(config.database_url, writer=True)
    read_engine = (
        write_engine
        if not db.is_sqlite(config.database_url)
        else db.create_engine(config.database_url)
    )
    async with write_engine.begin() as conn:
        keys, token = await tokens.bootstrap(conn, config.clock())
    if token is not None:
        path = write_token_file(config.data_dir, token)
        log.warning("bootstrap admin token written to %s (readable by this user only)", path)
    fleet = Fleet()
    async with read_engine.connect() as conn:
        await fleet_load.load_all(conn, fleet)  # the flagged identities too
    metrics.COMPUTERS.set(len(fleet.computers))
    metrics.RELAYS.set(sum(1 for rs in fleet.relays.values() if not rs.revoked))
    signer = Signer(keys["signing_seed"])
    writer = Writer(write_engine)
    exchange = Exchange(writer, fleet, signer, lost_grace=config.lost_grace, clock=config.clock)
    writer.start()
    tickler = Tickler(
        keys["tickle_master"],
        rate=config.tickle_rate,
        min_interval=config.tickle_min_interval,
        enabled=config.tickles,
        leading=False,  # until its duty starts (server/cluster.py)
    )
    tickler.start()
    rt = Runtime(
        config=config,
        read=read_engine,
        writer=writer,
        exchange=exchange,
        fleet=fleet,
        tickler=tickler,
        signer=signer,
        tickle_master=keys["tickle_master"],
        settings_json=orjson.dumps({"poll_interval": config.poll_interval}),
        relay_settings_json=orjson.dumps(
            {
                "poll_interval": config.relay_poll_interval,
                # How the relay paces the tickles it sends its agents: as the server does.
                "tickle_rate": config.tickle_rate,
                "tickle_min_interval": config.tickle_min_interval,
                # Its agents' identity nonces rotate as the server's (docs/relays.md).
                "identity_rotate": config.identity_rotate,
                "identity_grace": config.identity_grace,
            }
        ),
    )
    await _start_hints(rt)
    rt.content = ContentStore(config.data_dir)
    rt.content.prepare()
    rt.cluster = Cluster(
        writer,
        read_engine,
        None if db.is_sqlite(config.database_url) else db.create_engine(config.database_url),
        url=config.public_url,
        clock=config.clock,
        heartbeat=config.cluster_heartbeat,
    )
    rt.lifecycle = Lifecycle(
        rt.cluster.fenced(writer.run),
        read_engine,
        lambda cids: give_work(rt, cids),
        clock=config.clock,
        interval=config.lifecycle_interval,
        fire=lambda sid: fire_schedule(rt, sid),
        catch_up_every=config.leader_catch_up,
    )
    writer.on_finished = rt.lifecycle.on_finished
    exchange.window_closed = rt.lifecycle.window_closed
    exchange.job_windows = rt.lifecycle.job_windows
    rt.lifecycle.windows_changed = lambda cids: windows_changed(rt, cids)
    await rt.lifecycle.reload_windows(tell=False)  # every process's exchanges read them
    rt.tasks.append(asyncio.create_task(_flush_seen(rt), name="last-seen"))
    await _start_tasks(rt, config)
    # The leader's duties (issue 16): started when this process gains the lead (on
    # SQLite at once, in cluster.start), canceled when it loses it. The tickler's first:
    # the work the others find as they start is tickled. It tickles every relay as it
    # starts: a relay backs off while the server is away (up to RELAY_RETRY_MAX), and
    # hearing it is back brings their spooled results home within seconds.
    rt.cluster.duty("tickler", lambda ready: tickler.lead(ready, fleet.relays.values()))
    rt.cluster.duty("lifecycle", rt.lifecycle.lead)
    rt.cluster.duty("scheduler", rt.task_manager.lead)
    rt.cluster.duty("reaper", lambda ready: _reaper(rt, ready))
    await rt.cluster.start()
    rt.tasks.append(asyncio.create_task(rt.cluster.run(), name="cluster"))
    _start_embedded_worker(rt, config)
    log.info(
        "server ready: %d computers, database %s",
        len(fleet.computers),
        db.database_url(config.database_url).split("@")[-1],
    )
    return rt


async def _start_hints(rt: Runtime) -> None:
    """PostgreSQL: hints to and from the other server processes (server/hints.py);
    what another process changed is reloaded (server/fleet_load.py)."""
    if db.is_sqlite(rt.config.database_url):
        return  # one process: memory is the truth, nobody to tell
    fleet, tickler = rt.fleet, rt.tickler
    hints = rt.hints = PgHints(rt.config.database_url)
    loader = rt.loader = FleetLoader(rt.read, fleet)

    def work(body: str) -> Awaitable[None] | None:
        ids = parse_ids(body)
        if ids is None:
            fleet.look_all()
            return None
        woken = fleet.mark_work(ids, hint=False)
        if not tickler.leading:
            # The leader may have tickled them before this hint came, and they may have
            # been answered "nothing" here meanwhile: tickle them again (the leader does).
            tickler.wake(fleet.served_since(woken, rt.now() - RETICKLE_WINDOW))
            return None
        tickler.wake(woken, hinted=True)
        unknown = [i for i in ids if fleet.get(i) is None]
        return tickle_unknown(unknown) if unknown else None

    async def tickle_unknown(ids: list[int]) -> None:
        # Enrolled through another process and never seen here: the leader loads them
        # (with their address and port as stored) to tickle them.
        await loader.computers(ids)
        tickler.wake((cs for i in ids if (cs := fleet.get(i)) is not None), hinted=True)

    async def changed_computers(body: str) -> None:
        await loader.computers(parse_ids(body) or [])

    async def changed_relays(body: str) -> None:
        await loader.relays(parse_ids(body) or [])

    async def changed_windows(_body: str) -> None:
        # The process that changed them told the running jobs (send_job_windows);
        # here the exchanges (and the leader's window timers) read them again.
        if rt.lifecycle is not None:
            await rt.lifecycle.reload_windows(tell=False)

    async def task_cancel(body: str) -> None:
        # Only an embedded worker needs this: RabbitMQ carries cancels to every worker.
        ids = parse_ids(body)
        if ids and rt.config.queue == "embedded" and rt.manager is not None:
            await rt.manager.queue.cancel(ids)

    def reconnected() -> None:
        fleet.look_all()
        # (a windows hint may have been missed too; keep a reference: tasks are weak)
        rt.tasks.append(asyncio.get_running_loop().create_task(changed_windows("")))

    hints.subscribe(WORK, work)
    hints.subscribe(TICKLE, tickler.forwarded)
    hints.subscribe(REACH, lambda body: fleet.reached(parse_entries(body)))
    hints.subscribe("computers", changed_computers)
    hints.subscribe("relays", changed_relays)
    hints.subscribe(WINDOWS, changed_windows)
    hints.subscribe(TASK_CANCEL, task_cancel)
    hints.subscribe(TASKS, lambda body: rt.manager.hinted(parse_ids(body)) if rt.manager else None)
    hints.on_connect(reconnected)
    fleet.on_work = hints.work
    fleet.on_reach = lambda cs: hints.publish_entries(REACH, {str(cs.id): reach_entry(cs)})
    tickler.forward = lambda targets: hints.publish_entries(
        TICKLE, {f"{int(t.relay)} {t.id}": t.entry() for t in targets}
    )
    await hints.start()


def fleet_changed(
    rt: Runtime, computer_ids: Iterable[int] = (), relay_ids: Iterable[int] = ()
) -> None:
    """After a commit that enrolled, removed, revoked or moved computers or relays: the
    other server processes reload them (PostgreSQL; nothing on SQLite)."""
    rt.hints.publish_ids("computers", computer_ids)
    rt.hints.publish_ids("relays", relay_ids)


def write_token_file(data_dir: Path, token: str) -> Path:
    """Write ``DATA_DIR/admin-token`` readable by this user only (even if it existed wider)."""
    path = data_dir / "admin-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


async def mint_admin_token(
    data_dir: Path, database_url: str, *, tenant: str, actor: str
) -> tuple[int, Path]:
    """Mint a new admin token straight in the database and write it to the data folder.

    The way back in when every admin token is lost or revoked: it needs the
    server's data folder and database, not the API, and works whether or not the
    server runs (a running server reads tokens from the database on each call).
    """
    db.secure_data_dir(data_dir)
    db.prepare_sqlite(database_url)
    await db.upgrade(database_url)
    engine = db.create_engine(database_url, writer=True)
    try:
        async with engine.begin() as conn:
            now = time.time()
            _, unseen = await tokens.bootstrap(conn, now)  # a fresh database: tenant, keys
            if unseen is not None:  # nobody will ever see this one: the minted token replaces it
                await conn.execute(
                    api_tokens.update()
                    .where(api_tokens.c.token_hash == token_hash(unseen))
                    .values(revoked=True)
                )
            token_id, token = await tokens.mint_admin_token(conn, now, tenant=tenant, actor=actor)
    finally:
        await engine.dispose()
    return token_id, write_token_file(data_dir, token)


async def _start_tasks(rt: Runtime, config: ServerConfig) -> None:
    specs = load_task_types(config.task_types, builtins=BUILTINS)
    queue = open_queue(config.queue)
    rt.manager = TaskManager(
        rt.writer,
        rt.read,
        specs,
        queue,
        config.heartbeat_timeout,
        reap_interval=min(5.0, max(0.2, config.heartbeat_timeout / 4)),
        # In-process workers report through on_finished; only remote ones need watching.
        watch_remote=config.queue != "embedded",
        clock=config.clock,
        fence=rt.cluster.fence if rt.cluster is not None else None,
        alive=rt.cluster.alive if rt.cluster is not None else None,
        catch_up_every=config.leader_catch_up,
    )
    rt.manager.tell_cancel = lambda ids: rt.hints.publish_ids(TASK_CANCEL, ids)
    rt.manager.tell_leader = lambda ids: rt.hints.publish_ids(TASKS, ids)
    await rt.manager.start()


def _start_embedded_worker(rt: Runtime, config: ServerConfig) -> None:
    """After the lead is settled: a lead gained at start reaps the embedded workers
    of earlier processes first, and this one's must not be among them."""
    queue, specs = rt.task_manager.queue, rt.task_manager.specs
    pg = not db.is_sqlite(config.database_url)
    rt.task_manager.embedded_started = True
    if config.queue == "embedded" and config.workers > 0:
        worker = Worker(
            queue=queue,
            types=specs,
            run_tx=rt.writer.run,
            run_sync=rt.writer.run_sync,
            pg=pg,
            concurrency=config.workers,
            heartbeat_interval=config.worker_heartbeat,
            on_finished=rt.task_manager.finished,
            context={"run_tx": rt.writer.run},
            name="embedded",
            # Tied to this process: the leader fails its tasks once the process is gone.
            worker_id=embedded_id(rt.cluster.id) if rt.cluster is not None else None,
        )
        rt.tasks.append(asyncio.create_task(worker.run(), name="embedded-worker"))


async def stop(rt: Runtime) -> None:
    for task in rt.tasks:
        task.cancel()
    for task in rt.tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # Each part stops on its own: one failing to stop must not leave the writer running.
    parts = [rt.tickler.stop, rt.hints.stop]
    if rt.cluster is not None:
        parts.append(rt.cluster.stop)
    if rt.lifecycle is not None:
        parts.append(rt.lifecycle.stop)
    if rt.manager is not None:
        parts.append(rt.manager.stop)
    for stop in parts:
        try:
            await stop()
        except Exception:
            log.exception("stopping %s failed", getattr(stop, "__qualname__", stop))
    await rt.writer.stop()
    with contextlib.suppress(Exception):
        await _flush_once(rt)
    await rt.writer.engine.dispose()
    if rt.read is not rt.writer.engine:
        await rt.read.dispose()


async def fire_schedule(rt: Runtime, sid: int) -> float | None:
    """A cron schedule is due: create its run (a request of its own); the next time or None."""

    async def fn(conn: Any) -> tuple[requests.Created | None, float | None]:
        if rt.cluster is not None:  # refused unless this process leads at its epoch
            await rt.cluster.fence(conn)
        return await schedules.fire_schedule(conn, rt.now(), sid)

    def after(res: tuple[requests.Created | None, float | None]) -> None:
        if res[0] is not None:
            wake_targets(rt, res[0])

    created, next_at = await rt.writer.run(fn, after=after)
    if created is not None:
        metrics.REQUESTS.inc()
        log.info("schedule %d fired: request %d", sid, created.request["id"])
    return next_at


async def reap_once(rt: Runtime) -> None:
    """One pass of the timeout reaper: lost activities fail, expired work is canceled,
    computers a terminated job waited for past its deadline are "unreachable"."""
    run = rt.writer.run if rt.cluster is None else rt.cluster.fenced(rt.writer.run)
    lost = await run(lambda c: reap_lost(c, rt.now()))
    expired = await run(lambda c: reap_expired(c, rt.now()))
    unreachable = await run(lambda c: jobs.reap_terminations(c, rt.now()))
    if unreachable:
        log.warning(
            "%d job activities canceled, unreachable at termination: %s",
            len(unreachable),
            unreachable[:20],
        )
    if lost:
        metrics.LOST.inc(len(lost))
        log.warning("%d activities failed as lost: %s", len(lost), lost[:20])
    if expired:
        log.info("%d queued activities expired: %s", len(expired), expired[:20])


async def _reaper(rt: Runtime, ready: Callable[[], None]) -> None:
    ready()  # it keeps no state: the database is its state
    while True:
        await asyncio.sleep(rt.config.reaper_interval)
        try:
            await reap_once(rt)
        except Deposed:
            raise
        except Exception as exc:
            log_failure(log, exc, "lost-activity reaper failed; retrying next interval")


async def _flush_once(rt: Runtime) -> None:
    dirty = rt.fleet.take_dirty()
    dirty_relays = rt.fleet.take_dirty_relays()
    if not dirty and not dirty_relays:
        return

    async def fn(conn: Any) -> None:
        if dirty:
            await conn.execute(
                computers.update()
                .where(computers.c.id == sa.bindparam("b_id"))
                .values(last_seen_at=sa.bindparam("seen"), address=sa.bindparam("addr")),
                [{"b_id": cs.id, "seen": cs.last_seen, "addr": cs.address} for cs in dirty],
            )
        if dirty_relays:
            await relays.flush_seen(conn, dirty_relays)

    if rt.writer.running:
        await rt.writer.run(fn)
    else:
        async with rt.writer.engine.begin() as conn:
            await fn(conn)


async def _flush_seen(rt: Runtime) -> None:
    # Last-seen times live in memory and reach the database in one batch per
    # interval, so idle exchanges stay off the database.
    while True:
        await asyncio.sleep(LAST_SEEN_FLUSH)
        try:
            await _flush_once(rt)
        except Exception as exc:
            log_failure(log, exc, "last-seen flush failed")
