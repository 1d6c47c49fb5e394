"""PostgreSQL restarted under a steady load (issue 15): the server reconnects by
itself; API calls while the database is down get a clear 503 ("the database is
unreachable"), never a 500; the leader lock is taken again; and every acknowledged
request ends in its true state (here: succeeded on every computer, each activity
once, each history one chain), its sequence numbers only going up.

A private PostgreSQL cluster of the test's own (tests/private_services.py): the
machine's shared one is never restarted. It is restarted twice: ``pg_ctl restart -m
fast``, then stopped ``-m immediate`` (a crash: the server's connections die without a
goodbye) and started again after a look at the API while it is down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Agent, Server, enroll_token, wait_until
from tests.fault_checks import (
    RequestLoad,
    check_requests,
    check_sequences,
    start_server_on,
    wait_requests_end,
)
from tests.private_services import PrivatePostgres, private_postgres


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[PrivatePostgres]:
    with private_postgres(tmp_path) as pg:
        yield pg


def _leader(server: Server) -> dict | None:
    try:
        with server.api() as api:
            r = api.get("/servers")
    except httpx.HTTPError:
        return None
    return r.json()["leader"] if r.status_code == 200 else None


def _leads(server: Server, epoch: int) -> Callable[[], dict | None]:
    """The server leads again, in a newer epoch (its lock was taken again)."""

    def check() -> dict | None:
        lead = _leader(server)
        return lead if lead and lead["epoch"] > epoch else None

    return check


def test_a_postgresql_restart_under_load_loses_nothing_and_the_lead_is_taken_again(
    pg: PrivatePostgres, tmp_path: Path, start_agent: Callable[..., Agent]
) -> None:
    server = start_server_on(
        tmp_path / "server",
        pg.url,
        *("--lost-grace", "2", "--reaper-interval", "0.2", "--cluster-heartbeat", "0.5"),
    )
    try:
        token = enroll_token(server)
        agents = [start_agent(server, token, name=f"pg-{i}") for i in range(2)]
        lead = wait_until(lambda: _leader(server), 10, "a leader")
        with RequestLoad(server, every=0.3) as load:
            wait_until(lambda: len(load.acknowledged) >= 3, 20, "a first stretch of load")
            seqs = check_sequences(server, agents)
            pg.restart("fast")
            lead = wait_until(_leads(server, lead["epoch"]), 20, "the lead taken again")
            n = len(load.acknowledged)
            wait_until(lambda: len(load.acknowledged) >= n + 3, 20, "writes to resume")

            pg.stop("immediate")
            with server.api() as api:
                r = api.post("/tokens", json={"kind": "enroll", "name": "while-down"})
                assert r.status_code == 503, r.text
                assert r.json()["error"].startswith("the database is unreachable"), r.text
                assert r.headers["Retry-After"]
                assert api.get("/requests").status_code == 503
            wait_until(lambda: load.refused[503], 10, "the load refused")
            assert server.proc.alive()
            pg.start()
            lead = wait_until(_leads(server, lead["epoch"]), 20, "the lead taken again")
            n = len(load.acknowledged)
            wait_until(lambda: len(load.acknowledged) >= n + 3, 20, "writes to resume")
        assert 500 not in load.refused and "down" not in load.refused, load.refused
        assert any("database is unreachable" in e for e in load.errors), load.errors
        wait_requests_end(server, load.acknowledged, 60)
        check_requests(server, load.acknowledged, agents, all_succeed=True)
        check_sequences(server, agents, seqs)
        with server.api() as api:
            (me,) = [p for p in api.get("/servers").json()["processes"] if p["me"]]
        assert me["leader"] and me["state"] == "running", me
    finally:
        server.proc.stop()
