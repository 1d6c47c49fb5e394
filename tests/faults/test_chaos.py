"""Kill -9 at random points under a steady load (issue 15): the server, an agent, the
relay, one after another in a seeded random order, while requests keep arriving. Then
the invariants, for every request the API acknowledged (201):

* it ends, and each of its activities ends exactly once (one end in its history);
* the server tells the truth: an activity is Succeeded exactly when the agent that ran
  it recorded success (a run cut short by a kill is Failed, never Succeeded);
* nothing ran twice on a computer (the agent's records: one per operation);
* each activity's history is one chain through the state table, in time order.

Real processes on loopback: one server, one relay with two agents behind it, two agents
direct. Bounded: ``KILLS`` kills at most, the whole test within a few minutes.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable

import httpx

from tests.conftest import Agent, Server, activities_of, enroll_token, wait_until
from tests.relay_proc import Relay, start_relay, start_server_again

__all__ = ["start_relay"]  # the fixture, used by name

SEED = 20261130
KILLS = 6
SCRIPT = ["sh", "-c", "sleep 0.3; echo ran"]
SUCCESS = 4  # agent/state.py: the agent's record of a run that succeeded


def _history(server: Server, aid: int) -> list[dict]:
    with server.api() as api:
        return list(api.get(f"/activities/{aid}").json()["history"])


class Load:
    """Requests for every computer, one every ``every`` seconds, from a thread; only
    those the server acknowledged (201) are kept."""

    def __init__(self, server: Server, every: float = 0.4) -> None:
        self.server, self.every = server, every
        self.acknowledged: list[int] = []
        self.refused = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"type": "execute-script", "target": "all", "params": {"argv": SCRIPT}}
        while not self.stop.is_set():
            try:
                r = httpx.post(
                    self.server.url + "/api/v1/requests",
                    json={**body, "timeout": 60},
                    headers={"Authorization": f"Bearer {self.server.admin_token}"},
                    timeout=10,
                )
                if r.status_code == 201:
                    self.acknowledged.append(int(r.json()["id"]))
                else:
                    self.refused += 1
            except httpx.HTTPError:
                self.refused += 1  # the server is down: not acknowledged, nothing owed
            self.stop.wait(self.every)


def test_random_kill_9s_under_load_keep_every_acknowledged_request_true(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    rng = random.Random(SEED)
    token = enroll_token(server)
    relay = start_relay(server, "--poll-interval", "1")
    agents = [start_agent(relay.url, token, name=f"branch-{i}") for i in range(2)]
    agents += [start_agent(server, token, name=f"direct-{i}") for i in range(2)]
    urls = [relay.url, relay.url, server.url, server.url]
    restarts = iter(range(1000))
    load = Load(server)
    load.thread.start()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.5, 2.5))  # a random point of the load, not a wait
            victim = rng.choice(["server", "relay", "agent"])
            if victim == "server":
                server.proc.kill9()
                start_server_again(server)
            elif victim == "relay":
                relay.proc.kill9()
                relay.restart()
            else:
                i = rng.randrange(len(agents))
                agents[i].proc.kill9()
                agents[i] = start_agent(
                    urls[i], None, name=f"again-{next(restarts)}", state_dir=agents[i].state_dir
                )
        time.sleep(1.0)  # a last stretch of load with everything up
    finally:
        load.stop.set()
        load.thread.join(30)
    assert len(load.acknowledged) >= 10, "the load did not get through"

    def all_ended() -> bool:
        with server.api() as api:
            return all(
                api.get(f"/requests/{rid}").json()["progress"]["done"] for rid in load.acknowledged
            )

    wait_until(all_ended, 180, "every acknowledged request to end")
    ran: dict[int, int] = {}  # operation -> the agent's status of it
    for agent in agents:
        records = agent.status()["records"]
        ops = [r["op"] for r in records]
        assert len(ops) == len(set(ops)), f"an operation ran twice on {agent.state_dir.name}"
        ran.update({r["op"]: r["status"] for r in records if r["finished"]})
    for rid in load.acknowledged:
        rows = activities_of(server, rid)
        assert len(rows) == len(agents), (rid, rows)
        for a in rows:
            history = _history(server, a["id"])
            ends = [h for h in history if h["to_state"] in ("succeeded", "failed", "canceled")]
            assert len(ends) == 1, (a["id"], history)
            # One chain through the state table: each move starts where the last ended.
            assert history[0]["from_state"] is None, history
            for before, after in itertools.pairwise(history):
                assert after["from_state"] == before["to_state"], (a["id"], history)
                assert after["at"] >= before["at"], (a["id"], history)
            if a["state"] == "succeeded":
                assert ran.get(a["id"]) == SUCCESS, (a, ran.get(a["id"]))
                assert a["stdout"] == "ran\n"
            elif ran.get(a["id"]) == SUCCESS:
                # The agent succeeded: the server must have been told (it was up at the end).
                raise AssertionError(f"activity {a['id']} succeeded on its computer: {a}")
