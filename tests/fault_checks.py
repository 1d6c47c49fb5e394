"""The steady loads and the invariants the fault tests (tests/faults/) share.

``RequestLoad`` posts a script request for every computer, ``TaskLoad`` a server task,
each from a thread at a steady pace; only what the server acknowledged (201) is kept,
refusals are counted by status. ``check_requests`` and ``check_tasks`` then assert the
invariants of issue 15 for everything acknowledged:

* it ends, and each of its activities ends exactly once (one end in its history);
* the server tells the truth: an activity is Succeeded exactly when the agent that ran
  it recorded success; a task is Succeeded exactly when its command ran;
* nothing ran twice (the agents' records: one per operation; the tasks' marks file:
  one line per run) unless the type is retry-safe;
* each history is one chain through the state table, in time order;
* the server's sequence numbers per computer never go back, and every message sent
  was stored by its agent (``check_sequences``).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import (
    Agent,
    Server,
    _start_server_proc,
    free_port,
    wait_until,
)

SCRIPT = ["sh", "-c", "sleep 0.3; echo ran"]
SUCCESS = 4  # agent/state.py: the agent's record of a run that succeeded
ENDS = ("succeeded", "failed", "canceled")


def start_server_on(data_dir: Path, database_url: str, *args: str) -> Server:
    """A server process on ``database_url`` (a database of the test's own making:
    a private PostgreSQL, a file on a small disk); the caller stops ``proc``."""
    port = free_port()
    server = Server(
        url=f"http://127.0.0.1:{port}",
        port=port,
        data_dir=data_dir,
        database_url=database_url,
        proc=None,  # type: ignore[arg-type]
        args=list(args),
    )
    server.proc = _start_server_proc(server)
    token_file = data_dir / "admin-token"
    server.admin_token = wait_until(
        lambda: token_file.exists() and token_file.read_text().strip(), 10, "admin token"
    )
    return server


class _Load:
    """POSTs ``body()`` to ``path`` every ``every`` seconds from a thread."""

    path = ""

    def __init__(self, server: Server, every: float = 0.4) -> None:
        self.server, self.every = server, every
        self.acknowledged: list[int] = []
        self.refused: Counter[int | str] = Counter()  # status (or "down") -> count
        self.errors: list[str] = []  # the refusals' messages
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.n = 0

    def body(self) -> dict[str, Any]:
        raise NotImplementedError

    def acknowledged_id(self, reply: dict[str, Any]) -> int:
        return int(reply["id"])

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                r = httpx.post(
                    self.server.url + "/api/v1" + self.path,
                    json=self.body(),
                    headers={"Authorization": f"Bearer {self.server.admin_token}"},
                    timeout=10,
                )
                if r.status_code == 201:
                    self.acknowledged.append(self.acknowledged_id(r.json()))
                    self.n += 1
                else:
                    self.refused[r.status_code] += 1
                    with contextlib.suppress(ValueError):
                        self.errors.append(str(r.json().get("error")))
            except httpx.HTTPError:
                self.refused["down"] += 1  # not acknowledged: nothing owed
            self.stop.wait(self.every)

    def __enter__(self) -> _Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)

    def count_now(self) -> int:
        return len(self.acknowledged)


class RequestLoad(_Load):
    """A request for every computer running ``SCRIPT``."""

    path = "/requests"

    def body(self) -> dict[str, Any]:
        params = {"argv": SCRIPT}
        return {"type": "execute-script", "target": "all", "params": params, "timeout": 60}


class TaskLoad(_Load):
    """Server tasks of ``types`` in turn (``mark`` by default), the n-th with params
    ``{"n": n}``: a type that appends n to a marks file counts its runs."""

    path = "/tasks"

    def __init__(
        self, server: Server, types: tuple[str, ...] = ("mark",), every: float = 0.2
    ) -> None:
        super().__init__(server, every)
        self.types = types
        self.numbers: dict[int, int] = {}  # task id -> its n

    def type_of(self, n: int) -> str:
        return self.types[n % len(self.types)]

    def body(self) -> dict[str, Any]:
        return {"type": self.type_of(self.n), "params": {"n": self.n}}

    def acknowledged_id(self, reply: dict[str, Any]) -> int:
        tid = int(reply["task"]["id"])
        self.numbers[tid] = self.n
        return tid


def _history(server: Server, aid: int, api: httpx.Client | None = None) -> list[dict[str, Any]]:
    if api is None:
        with server.api() as api:
            return _history(server, aid, api)
    return list(api.get(f"/activities/{aid}").json()["history"])


def check_chain(aid: int, history: list[dict[str, Any]]) -> None:
    """One end, and one chain through the state table: each move starts where the
    last ended, in time order."""
    ends = [h for h in history if h["to_state"] in ENDS]
    assert len(ends) == 1, (aid, history)
    assert history[0]["from_state"] is None, history
    for before, after in itertools.pairwise(history):
        assert after["from_state"] == before["to_state"], (aid, history)
        assert after["at"] >= before["at"], (aid, history)


def wait_requests_end(server: Server, ids: list[int], timeout: float = 180) -> None:
    def all_ended() -> bool:
        with server.api() as api:
            return all(api.get(f"/requests/{rid}").json()["progress"]["done"] for rid in ids)

    wait_until(all_ended, timeout, "every acknowledged request to end")


def check_requests(
    server: Server, ids: list[int], agents: list[Agent], *, all_succeed: bool = False
) -> None:
    """The invariants for the acknowledged requests ``ids`` (each for every computer)."""
    ran: dict[int, int] = {}  # operation -> the agent's status of it
    for agent in agents:
        records = agent.status()["records"]
        ops = [r["op"] for r in records]
        assert len(ops) == len(set(ops)), f"an operation ran twice on {agent.state_dir.name}"
        ran.update({r["op"]: r["status"] for r in records if r["finished"]})
    with server.api() as api:  # one client: a new one per call costs a TLS context
        rows = api.get("/activities", params={"output": True, "limit": 10000}).json()
        by_request: dict[int, list[dict[str, Any]]] = {}
        for a in rows:
            by_request.setdefault(a["request_id"], []).append(a)
        histories = {a["id"]: _history(server, a["id"], api) for a in rows}
    for rid in ids:
        rows = by_request.get(rid, [])
        assert len(rows) == len(agents), (rid, rows)
        for a in rows:
            check_chain(a["id"], histories[a["id"]])
            if a["state"] == "succeeded":
                assert ran.get(a["id"]) == SUCCESS, (a, ran.get(a["id"]))
                assert a["stdout"] == "ran\n"
            elif ran.get(a["id"]) == SUCCESS:
                # The agent succeeded: the server must have been told (it was up at the end).
                raise AssertionError(f"activity {a['id']} succeeded on its computer: {a}")
            elif all_succeed:
                raise AssertionError(f"activity {a['id']} did not succeed: {a}")


def _out_seqs(server: Server) -> dict[int, int]:
    """computer id -> the last sequence number its server used, from the database."""
    url = server.database_url
    if url.startswith("sqlite"):
        import sqlite3

        path = url.split(":///", 1)[1]
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            return dict(conn.execute("SELECT id, out_seq FROM computers").fetchall())
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        return dict(conn.execute("SELECT id, out_seq FROM computers").fetchall())


def check_sequences(
    server: Server, agents: list[Agent], before: dict[int, int] | None = None
) -> dict[int, int]:
    """Each agent stores every message its server sends, in order: its ``server_seq``
    reaches the computer's last sequence number in the server's database; and, against
    ``before`` (an earlier result of this), the numbers only went up (a restart or an
    outage never reuses one). Returns computer id -> server_seq."""
    now: dict[int, int] = {}

    def caught_up() -> bool:
        for agent in agents:
            status = agent.status()
            now[int(status["computer_id"])] = int(status["server_seq"])
        used = _out_seqs(server)
        return all(used[cid] == seq for cid, seq in now.items())

    wait_until(caught_up, 30, "each agent to store its server's last message")
    for cid, seq in (before or {}).items():
        assert now[cid] > seq, f"computer {cid}: sequence number did not go up {seq} -> {now[cid]}"
    return now


def wait_tasks_end(server: Server, ids: list[int], timeout: float = 60) -> dict[int, dict]:
    ended: dict[int, dict] = {}

    def all_ended() -> bool:
        with server.api() as api:
            for tid in ids:
                if tid in ended:
                    continue
                t = api.get(f"/tasks/{tid}").json()
                if t["state"] in ENDS:
                    ended[tid] = t
        return len(ended) == len(ids)

    wait_until(all_ended, timeout, "every acknowledged task to end")
    return ended


def check_tasks(
    server: Server,
    load: TaskLoad,
    marks: Path,
    *,
    retry_safe: frozenset[str] = frozenset(),
    lost_ok: bool = False,
) -> dict[int, dict]:
    """Every acknowledged task ended once, each history one chain; Succeeded exactly
    when its command left its mark; none of a type not in ``retry_safe`` ran twice.
    With ``lost_ok`` (workers were killed) a task may have failed with "worker
    heartbeat lost": then, of a retry-safe type, it was submitted again and that retry
    ended (succeeded, unless its worker was killed too); of another type, it was not.
    Returns the ended tasks (retries included) by id."""
    ended = wait_tasks_end(server, load.acknowledged)
    with server.api() as api:
        everything = api.get("/tasks", params={"limit": 10000}).json()
        retries = {t["retry_of"]: t["id"] for t in everything if t.get("retry_of")}
        more = wait_tasks_end(server, list(retries.values()))
        histories = {tid: _history(server, tid, api) for tid in [*ended, *more]}
    runs = Counter(int(x) for x in marks.read_text().split()) if marks.exists() else Counter()
    for tid in ended:
        n = load.numbers[tid]
        safe = load.type_of(n) in retry_safe
        assert runs[n] <= 1 or safe, f"task {tid} (n={n}, not retry-safe) ran {runs[n]} times"
        chain = [tid]
        while chain[-1] in retries:
            chain.append(retries[chain[-1]])
        for one in chain:
            check_chain(one, histories[one])
        if len(chain) > 1:
            assert safe, f"task {tid} of a type not retry-safe was submitted again: {chain}"
        final = more.get(chain[-1]) or ended[chain[-1]]
        for one in chain[:-1]:
            lost = more.get(one) or ended[one]
            assert (lost["state"], lost["result_line"]) == ("failed", "worker heartbeat lost")
        if final["state"] == "succeeded":
            assert runs[n] >= 1, (final, "succeeded but never ran")
        else:
            assert lost_ok and final["result_line"] == "worker heartbeat lost", final
            assert not safe, (final, "a retry-safe task lost and not submitted again")
    return {**ended, **more}
