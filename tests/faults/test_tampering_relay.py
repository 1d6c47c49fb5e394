"""A tampering man in the middle (issue 11): the agent acts on nothing forged, the server hears
of every refusal, and the conversation goes on.

Real processes over real sockets: a ``taskfleet server``, real ``taskfleet
agent`` processes that reach it only through ``tests/tamper_proxy.py`` (a
small HTTP proxy process, told per test what to do to the next reply), and
the API as an administrator reads it. For each tampering: the agent neither
runs nor cancels anything, the refusal is in the audit log (actor
``computer:ID``) and the metrics, the tampered activity's state is untouched,
and the next request on that computer succeeds (no exchange is stuck on a 400).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    Agent,
    Proc,
    Server,
    activities_of,
    enroll_token,
    free_port,
    request_done,
    run_request,
    spawn,
    wait_until,
)

PROXY = Path(__file__).resolve().parents[1] / "tamper_proxy.py"


@dataclass
class Proxy:
    url: str
    proc: Proc

    def arm(self, computer: int, action: str, **kw: Any) -> None:
        r = httpx.post(f"{self.url}/_tamper", json={"computer": computer, "action": action, **kw})
        assert r.status_code == 200, r.text

    def done(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/_tamper", timeout=10).json()["done"])


@pytest.fixture
def proxy(server: Server, tmp_path: Path) -> Iterator[Proxy]:
    port = free_port()
    proc = spawn(
        [sys.executable, str(PROXY), "--listen", str(port), "--upstream", server.url],
        tmp_path / "proxy.log",
    )
    p = Proxy(f"http://127.0.0.1:{port}", proc)

    def up() -> bool:
        if not proc.alive():
            raise AssertionError(f"proxy exited:\n{proc.text()[-3000:]}")
        try:
            return httpx.get(f"{p.url}/_tamper", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 30, "the tamper proxy")
    yield p
    proc.stop()


def _refusals(server: Server, computer: int) -> list[dict[str, Any]]:
    with server.api() as api:
        entries = api.get("/audit", params={"limit": 1000}).json()
    return [
        e
        for e in reversed(entries)
        if e["action"] == "agent.refused" and e["actor"] == f"computer:{computer}"
    ]


def _refused(server: Server, computer: int, count: int = 1) -> list[dict[str, Any]]:
    return wait_until(
        lambda: len(_refusals(server, computer)) >= count and _refusals(server, computer),
        30,
        f"{count} refusal(s) by computer {computer} in the audit log",
    )


def _activity(server: Server, request: dict[str, Any]) -> dict[str, Any]:
    (a,) = activities_of(server, request["id"])
    return a


def _keeps_exchanging(server: Server, agent: Agent, tmp_path: Path) -> None:
    """The next request on the computer succeeds: nothing is stuck on a 400."""
    mark = tmp_path / f"after-{agent.tickle_port}"
    req = run_request(server, f"computer:{agent.computer_id}", {"script": f"touch {mark}"}, 60)
    assert request_done(server, req["id"])["progress"]["succeeded"] == 1
    assert mark.exists()
    assert "exchange refused" not in agent.proc.text()
    assert server.metric("taskfleet_exchange_errors_total", 'reason="invalid"') == 0


def _start(start_agent: Callable[..., Agent], server: Server, proxy: Proxy) -> Agent:
    return start_agent(proxy.url, enroll_token(server))


def test_an_operation_with_an_altered_script_is_refused_and_never_runs(
    server: Server, proxy: Proxy, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = _start(start_agent, server, proxy)
    cid = agent.computer_id
    good, evil = tmp_path / "good", tmp_path / "evil"
    proxy.arm(cid, "alter-script", script=f"touch {evil}")
    req = run_request(server, f"computer:{cid}", {"script": f"touch {good}"}, 60)
    (r,) = _refused(server, cid)
    op = _activity(server, req)["id"]
    assert (r["detail"]["op"], r["detail"]["reason"]) == (op, "bad-signature")
    assert r["detail"]["server_seq"] == proxy.done()[0]["seq"]
    assert "does not verify" in r["detail"]["text"] and str(evil) not in r["detail"]["text"]
    assert server.metric("taskfleet_agent_refusals_total", 'reason="bad-signature"') == 1
    _keeps_exchanging(server, agent, tmp_path)
    assert not evil.exists() and not good.exists()
    assert _activity(server, req)["state"] == "in_progress"  # refused: nothing was reported


def test_an_old_operation_replayed_under_a_new_seq_is_refused_and_not_run_again(
    server: Server, proxy: Proxy, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = _start(start_agent, server, proxy)
    cid = agent.computer_id
    runs, second = tmp_path / "runs", tmp_path / "second"
    first = run_request(server, f"computer:{cid}", {"script": f"echo run >> {runs}"}, 60)
    request_done(server, first["id"])
    proxy.arm(cid, "replay")
    req = run_request(server, f"computer:{cid}", {"script": f"touch {second}"}, 60)
    (r,) = _refused(server, cid)
    assert (r["detail"]["op"], r["detail"]["reason"]) == (
        _activity(server, first)["id"],
        "replayed",
    )
    assert server.metric("taskfleet_agent_refusals_total", 'reason="replayed"') == 1
    _keeps_exchanging(server, agent, tmp_path)
    assert runs.read_text() == "run\n" and not second.exists()
    assert _activity(server, first)["state"] == "succeeded"
    assert _activity(server, req)["state"] == "in_progress"


def test_an_operation_signed_for_another_computer_is_refused_without_stalling_the_exchange(
    server: Server, proxy: Proxy, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    a = _start(start_agent, server, proxy)
    b = _start(start_agent, server, proxy)
    a_id, b_id = a.computer_id, b.computer_id
    ran = tmp_path / "ran"
    for_a = run_request(server, f"computer:{a_id}", {"script": f"echo $0 >> {ran}"}, 60)
    request_done(server, for_a["id"])
    proxy.arm(b_id, "retarget", **{"from": a_id})
    for_b = run_request(server, f"computer:{b_id}", {"script": "true"}, 60)
    (r,) = _refused(server, b_id)
    assert (r["detail"]["op"], r["detail"]["reason"]) == (
        _activity(server, for_a)["id"],
        "wrong-computer",
    )
    assert f"for computer {a_id}" in r["detail"]["text"]
    assert server.metric("taskfleet_agent_refusals_total", 'reason="wrong-computer"') == 1
    _keeps_exchanging(server, b, tmp_path)
    assert len(ran.read_text().splitlines()) == 1  # run by A only
    assert _activity(server, for_a)["state"] == "succeeded"  # A's result is untouched
    assert _activity(server, for_b)["state"] == "in_progress"
    assert _refusals(server, a_id) == []


@pytest.mark.parametrize("forgery", ["cancel-unsigned", "cancel-wrong-key"])
def test_a_forged_cancel_is_refused_and_the_work_runs_on(
    server: Server,
    proxy: Proxy,
    start_agent: Callable[..., Agent],
    tmp_path: Path,
    forgery: str,
) -> None:
    agent = _start(start_agent, server, proxy)
    cid = agent.computer_id
    go, done = tmp_path / "go", tmp_path / "done"
    script = f"while [ ! -e {go} ]; do sleep 0.05; done; touch {done}"
    long = run_request(server, f"computer:{cid}", {"script": script}, 60)
    op = _activity(server, long)["id"]
    wait_until(
        lambda: any(r["op"] == op and r["status"] == 1 for r in agent.status()["records"]),
        30,
        "the script to run",
    )
    proxy.arm(cid, forgery, op=op)
    carrier = run_request(server, f"computer:{cid}", {"script": "true"}, 60)
    (r,) = _refused(server, cid)
    assert (r["detail"]["op"], r["detail"]["reason"]) == (op, "bad-signature")
    assert server.metric("taskfleet_agent_refusals_total", 'reason="bad-signature"') == 1
    record = next(r for r in agent.status()["records"] if r["op"] == op)
    assert record["status"] == 1 and not record["cancel_requested"]
    go.touch()
    finished = request_done(server, long["id"])
    assert finished["progress"]["succeeded"] == 1 and done.exists()
    assert _activity(server, carrier)["state"] == "in_progress"
    _keeps_exchanging(server, agent, tmp_path)


def test_a_reply_that_is_not_json_is_retried_and_nothing_is_lost(
    server: Server, proxy: Proxy, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = _start(start_agent, server, proxy)
    cid = agent.computer_id
    mark = tmp_path / "mark"
    proxy.arm(cid, "garbage")
    req = run_request(server, f"computer:{cid}", {"script": f"touch {mark}"}, 60)
    assert request_done(server, req["id"])["progress"]["succeeded"] == 1
    assert mark.exists() and [d["action"] for d in proxy.done()] == ["garbage"]
    assert "sent a reply this agent cannot read" in agent.proc.text()
    assert _refusals(server, cid) == []
