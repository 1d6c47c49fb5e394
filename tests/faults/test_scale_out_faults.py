"""Issue 16's scale-out faults, in one run of real processes under a steady load.

A private PostgreSQL and a private RabbitMQ node (tests/private_services.py: both are
restarted here, the machine's shared ones never are); on them two ``taskfleet
server`` processes (one database, one task queue), two ``taskfleet worker``
processes, one relay, and five agents split between the servers (two direct on A,
one direct on B, two behind the relay on B), as a load balancer would spread them.
A steady load of script requests (posted to B) and server tasks (posted to A, of a
type that is not retry-safe and one that is) runs throughout, and cron schedules are
made due around each fault (cron is minute-grained: the test moves a schedule's next
firing into the coming second, as time passing would; the leader's catch-up reads it).

Then, in this order (no randomness: each fault at a known point): kill -9 of the
leader (the other leads within 10 s; the killed one is started again), kill -9 of
the other server (the same), kill -9 of a worker (a new one started), the broker
stopped and started again, every hints listener's session ended with
``pg_terminate_backend``, PostgreSQL restarted. After each, the system must make
progress again: both loads acknowledged anew, tasks run, schedules fired.

At the end (not after each step: a full check of every activity's history takes
seconds, times six), the invariants of tests/fault_checks.py for everything
acknowledged: every request and scheduled run ends on every computer in its true
state, each activity once, each history one chain; every task ends, none of a type
not retry-safe ran twice; each schedule fired exactly once (one run, one request)
across the handovers; each agent stored its server's last sequence number, and the
numbers only went up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from taskfleet.settings import HINTS_APPLICATION
from tests.acceptance.test_servers import _status
from tests.conftest import BACKEND, Agent, Proc, Server, enroll_token, spawn_worker, wait_until
from tests.fault_checks import (
    SCRIPT,
    RequestLoad,
    TaskLoad,
    check_requests,
    check_sequences,
    check_tasks,
    start_server_on,
    wait_requests_end,
)
from tests.private_services import PrivatePostgres, PrivateRabbit, private_postgres, private_rabbit
from tests.relay_proc import Relay, start_relay, start_server_again

__all__ = ["start_relay"]  # the fixture, used by name

pytestmark = pytest.mark.skipif(
    BACKEND != "postgresql", reason="several servers share PostgreSQL only"
)

YEARLY = "0 0 1 1 *"  # fires once in the test: its next firing is months away
TYPES = """
[types.once]
scope = "none"
command = "sh -c 'sleep 0.8; echo {{n}} >> {marks}'"
retry_safe = false
time_limit = 30
[types.once.params]
n = "int"

[types.again]
scope = "none"
command = "sh -c 'sleep 0.8; echo {{n}} >> {marks}'"
retry_safe = true
time_limit = 30
[types.again.params]
n = "int"
"""


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[PrivatePostgres]:
    with private_postgres(tmp_path) as pg:
        yield pg


@pytest.fixture
def rabbit(tmp_path: Path) -> Iterator[PrivateRabbit]:
    with private_rabbit(tmp_path) as node:
        yield node


def _leading(server: Server) -> dict[str, Any] | None:
    """The leadership as ``server`` sees it, if it is up and it leads."""
    try:
        s = _status(server)
    except (httpx.HTTPError, AssertionError):  # down, or its database is (503)
        return None
    me = [p for p in s["processes"] if p["me"]]
    return s["leader"] if me and me[0]["leader"] and me[0]["state"] == "running" else None


def _leader_of(a: Server, b: Server) -> tuple[Server, Server]:
    def one() -> tuple[Server, Server] | None:
        if _leading(a):
            return a, b
        return (b, a) if _leading(b) else None

    return wait_until(one, 20, "one of the servers to lead")


class Schedules:
    """Cron schedules made due one by one around the faults; each must fire once."""

    def __init__(self, server: Server, n: int) -> None:
        self.url = server.database_url
        self.ids: list[int] = []
        self.armed: list[int] = []
        body = {
            "cron": YEARLY,
            "request": {"target": "all", "params": {"argv": SCRIPT}, "timeout": 60},
        }
        with server.api() as api:
            for _ in range(n):
                r = api.post("/schedules", json=body)
                assert r.status_code == 201, r.text
                self.ids.append(int(r.json()["id"]))

    def arm(self, *delays: float) -> None:
        """The next schedules fire ``delays`` seconds from now."""
        now = time.time()
        with psycopg.connect(self.url, autocommit=True) as conn:
            for delay in delays:
                sid = self.ids[len(self.armed)]
                conn.execute("UPDATE schedules SET next_at = %s WHERE id = %s", (now + delay, sid))
                self.armed.append(sid)

    def runs(self) -> dict[int, int]:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT id, runs FROM schedules WHERE id = ANY(%s)", (self.armed,)
            ).fetchall()
        return {int(sid): int(n) for sid, n in rows}

    def requests(self) -> dict[int, list[int]]:
        """schedule id -> the requests it made."""
        out: dict[int, list[int]] = {sid: [] for sid in self.armed}
        with psycopg.connect(self.url, autocommit=True) as conn:
            for rid, sid in conn.execute(
                "SELECT id, schedule_id FROM requests WHERE schedule_id = ANY(%s)", (self.armed,)
            ).fetchall():
                out[int(sid)].append(int(rid))
        return out


def _listeners(url: str) -> list[int]:
    """The hints listeners' sessions (``taskfleet-hints PID``) in pg_stat_activity."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s",
            (HINTS_APPLICATION + " %",),
        ).fetchall()
    return sorted(int(r[0]) for r in rows)


def _running_once(url: str, pids: list[int]) -> int | None:
    """The pid of a worker of ``pids`` that has just claimed a task of type ``once``."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT w.pid FROM server_tasks t JOIN workers w ON w.id = t.claimed_by"
            " JOIN activities a ON a.id = t.activity_id"
            " WHERE t.type = 'once' AND a.state = 'in_progress' AND w.pid = ANY(%s)"
            " AND t.claimed_at > %s LIMIT 1",
            (pids, time.time() - 0.4),
        ).fetchone()
    return None if row is None else int(row[0])


def test_kill_9s_a_broker_bounce_a_lost_listen_and_a_postgresql_restart_lose_nothing(
    pg: PrivatePostgres,
    rabbit: PrivateRabbit,
    tmp_path: Path,
    start_agent: Callable[..., Agent],
    start_relay: Callable[..., Relay],
) -> None:
    marks = tmp_path / "marks"
    types = tmp_path / "types.toml"
    types.write_text(TYPES.format(marks=marks))
    queue = rabbit.url + "?queue=tf_scale_out"
    args = (
        *("--task-types", str(types), "--queue", queue, "--heartbeat-timeout", "2"),
        *("--cluster-heartbeat", "0.5", "--reaper-interval", "0.2", "--lost-grace", "2"),
    )
    data = tmp_path / "server"  # shared, as by the processes of one deployment
    a = start_server_on(data, pg.url, *args)
    servers = [a]
    workers: list[Proc] = []
    count = iter(range(100))

    def worker() -> Proc:
        log = tmp_path / f"worker-{next(count)}.log"
        return spawn_worker(
            queue, pg.url, types, log, "--heartbeat-interval", "0.4", "--concurrency", "4"
        )

    try:
        b = start_server_on(data, pg.url, *args)
        servers.append(b)
        workers += [worker(), worker()]
        token = enroll_token(a)
        relay = start_relay(b, "--poll-interval", "1")
        agents = [start_agent(a, token, name=f"direct-a-{i}") for i in range(2)]
        agents.append(start_agent(b, token, name="direct-b"))
        agents += [start_agent(relay.url, token, name=f"branch-{i}") for i in range(2)]
        seqs = check_sequences(a, agents)
        schedules = Schedules(b, 12)

        requests = RequestLoad(b, every=0.8)
        tasks = TaskLoad(a, types=("once", "again"), every=0.3)

        def ran() -> int:
            # The first task writes the file 0.8 s after it starts: none may exist yet.
            return len(marks.read_text().split()) if marks.exists() else 0

        def progress(what: str) -> None:
            """Both loads acknowledged anew and tasks ran: the system works again."""
            r, t, m = len(requests.acknowledged), len(tasks.acknowledged), ran()
            wait_until(
                lambda: (
                    len(requests.acknowledged) >= r + 2
                    and len(tasks.acknowledged) >= t + 3
                    and ran() >= m + 3
                ),
                40,
                f"the loads to go on after {what}",
            )

        with requests, tasks:
            progress("the start")

            # 1. kill -9 of the leader: the other leads within 10 s.
            leader, other = _leader_of(a, b)
            schedules.arm(0.2, 1.0)
            leader.proc.kill9()
            wait_until(lambda: _leading(other), 10, "the other server to take the lead")
            start_server_again(leader)
            progress("the leader's kill -9")

            # 2. kill -9 of the other server (now the leader): the first leads again.
            schedules.arm(0.2, 1.0)
            other.proc.kill9()
            wait_until(lambda: _leading(leader), 10, "the restarted server to take the lead")
            start_server_again(other)
            progress("the other server's kill -9")

            # 3. kill -9 of a worker while it runs a task that is not retry-safe.
            schedules.arm(0.5)
            pids = [w.popen.pid for w in workers]
            pid = wait_until(lambda: _running_once(pg.url, pids), 20, "a worker running `once`")
            i = pids.index(pid)
            workers[i].kill9()
            workers[i] = worker()
            progress("a worker's kill -9")

            # 4. the broker stopped and started again.
            schedules.arm(0.5)
            rabbit.stop_app()
            n = len(tasks.acknowledged)
            wait_until(lambda: len(tasks.acknowledged) >= n + 3, 15, "submits while it is down")
            rabbit.start_app()
            progress("the broker's bounce")

            # 5. every hints listener's session ended: they reconnect.
            schedules.arm(0.5, 1.5)
            first = wait_until(lambda: len(p := _listeners(pg.url)) == 2 and p, 10, "listeners")
            with psycopg.connect(pg.url, autocommit=True) as conn:
                for pid in first:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_until(
                lambda: len(p := _listeners(pg.url)) == 2 and not set(p) & set(first),
                20,
                "both listeners to reconnect",
            )
            progress("the listeners' sessions ended")

            # 6. PostgreSQL restarted: the lead is taken again, one epoch further.
            schedules.arm(0.5, 1.5)
            leader, other = _leader_of(a, b)
            epoch = int(_status(leader)["leader"]["epoch"])
            pg.restart("fast")

            def led_again() -> bool:
                return any((lead := _leading(s)) and lead["epoch"] > epoch for s in (a, b))

            wait_until(led_again, 20, "the lead taken again")
            progress("PostgreSQL's restart")

        assert len(requests.acknowledged) >= 10 and len(tasks.acknowledged) >= 30, "no load"
        for s in servers:
            assert s.proc.alive(), s.proc.text()[-3000:]
        for w in workers:
            assert w.alive(), w.text()[-3000:]
        assert 500 not in requests.refused and 500 not in tasks.refused, (
            requests.refused,
            tasks.refused,
            requests.errors,
            tasks.errors,
        )

        # Each schedule fired once across the handovers: one run, one request.
        fired = wait_until(
            lambda: (r := schedules.runs()) and all(n >= 1 for n in r.values()) and r,
            30,
            "every armed schedule to fire",
        )
        assert set(fired.values()) == {1}, fired
        made = schedules.requests()
        assert all(len(rids) == 1 for rids in made.values()), made
        scheduled = [rid for rids in made.values() for rid in rids]

        ids = requests.acknowledged + scheduled
        wait_requests_end(b, ids, 120)
        check_requests(b, ids, agents)
        ended = check_tasks(a, tasks, marks, retry_safe=frozenset({"again"}), lost_ok=True)
        lost = [t for t in ended.values() if t["result_line"] == "worker heartbeat lost"]
        assert lost, "the worker's kill -9 landed on no running task: it proves nothing"
        check_sequences(a, agents, seqs)
    finally:
        for w in workers:
            w.stop()
        for s in servers:
            s.proc.stop()
