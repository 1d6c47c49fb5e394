"""Identities that cannot be cloned (issue 15, docs/reliability.md): real server and
agent processes. A copied state folder is caught within a few exchanges, the computer
is flagged and gets no work until an administrator resets it; an agent whose replies
are lost is never flagged; a removed or re-enrolled computer's old identity never
regains rights."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import Agent, Server, enroll_token, request_done, run_request, wait_until
from tests.raw_agent import enrolled, exchange


def _computer(server: Server, cid: int) -> dict[str, Any]:
    with server.api() as api:
        r = api.get(f"/computers/{cid}")
        assert r.status_code == 200, r.text
        return dict(r.json())


def _refused(server: Server) -> float:
    return server.metric("taskfleet_exchange_errors_total", 'reason="identity-conflict"') or 0.0


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskfleet", *args, "--server", server.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TASKFLEET_TOKEN": server.admin_token},
    )


def _dashboard_page(server: Server, path: str) -> str:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        form = client.get("/ui/login").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf
        r = client.post("/ui/login", data={"csrf": csrf.group(1), "token": server.admin_token})
        assert r.status_code == 303, r.text
        page = client.get(path)
        assert page.status_code == 200, page.text
        return page.text


def test_a_copied_state_folder_is_caught_and_gets_no_work_until_reset(
    start_server: Callable[..., Server], start_agent: Callable[..., Agent]
) -> None:
    server = start_server("--identity-rotate", "0", "--lost-grace", "2")
    a = start_agent(server, enroll_token(server), "--poll-interval", "0.3")
    cid = a.computer_id
    req = run_request(server, f"computer:{cid}", {"argv": ["true"]})
    assert request_done(server, req["id"])["progress"]["succeeded"] == 1

    # The copy: the state folder as it is on disk (the agent stopped to copy it whole).
    a.proc.stop()
    copy = a.state_dir.parent / "copy"
    shutil.copytree(a.state_dir, copy)
    a = start_agent(server, None, "--poll-interval", "0.3", state_dir=a.state_dir, name="a")
    # Same UDP port on another loopback address: the server's wake-ups reach ``a``
    # whichever of the two told it its port last.
    b = start_agent(
        server,
        None,
        "--poll-interval",
        "0.3",
        "--tickle-bind",
        "127.0.0.2",
        state_dir=copy,
        name="b",
        tickle_port=a.tickle_port,
    )

    flagged = wait_until(lambda: _computer(server, cid)["identity_conflict"], 30, "the flag")
    assert "two agents" in flagged["reason"]
    for agent in (a, b):
        wait_until(lambda ag=agent: "IDENTITY CONFLICT" in ag.proc.text(), 30, "a loud log")
    listed = {c["id"]: c for c in server.api().get("/computers").json()}
    assert listed[cid]["identity_conflict"]["at"] == flagged["at"]
    out = _cli(server, "computer", "show", str(cid))
    assert "IDENTITY CONFLICT" in out.stdout, out.stderr
    assert 'id="identity-conflict"' in _dashboard_page(server, f"/ui/computers/{cid}")

    # Work for it is not handed to either: it stays Queued (truthfully not delivered)
    # while both are refused.
    refused = _refused(server)
    held = run_request(server, f"computer:{cid}", {"argv": ["true"]})
    wait_until(lambda: _refused(server) >= refused + 2, 30, "more refused exchanges")
    with server.api() as api:
        acts = api.get("/activities", params={"request_id": held["id"]}).json()
    assert [x["state"] for x in acts] == ["queued"], acts

    # The administrator stops the copy and decides: reset. The agent left carries on.
    b.proc.stop()
    out = _cli(server, "computer", "identity-reset", str(cid), "--yes")
    assert out.returncode == 0 and "identity reset" in out.stdout, out.stdout + out.stderr
    assert request_done(server, held["id"])["progress"]["succeeded"] == 1
    assert _computer(server, cid)["identity_conflict"] is None
    assert 'id="identity-conflict"' not in _dashboard_page(server, f"/ui/computers/{cid}")
    with server.api() as api:
        audit = api.get("/audit", params={"object": f"computer:{cid}"}).json()
    actions = {e["action"] for e in audit}
    assert {"computer.identity_conflict", "computer.identity_reset"} <= actions
    for _ in range(3):  # alone, it rotates on without being flagged
        again = run_request(server, f"computer:{cid}", {"argv": ["true"]})
        assert request_done(server, again["id"])["progress"]["succeeded"] == 1
    assert _computer(server, cid)["identity_conflict"] is None


def test_lost_replies_never_flag_an_agent(start_server: Callable[..., Server]) -> None:
    """A raw agent that drops every other reply (its offer never kept) and repeats
    requests it already sent: always answered, never flagged."""
    server = start_server("--identity-rotate", "0")
    token = enroll_token(server)
    r = httpx.post(
        server.url + "/agent/v1/enroll",
        json={"token": token, "hostname": "lossy", "machine_id": "m-lossy"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    cid, secret, nonce = r.json()["computer_id"], r.json()["secret"], r.json()["identity"]
    for i in range(12):
        reply = exchange(server, cid, secret, {"ack": 0, "identity": nonce})
        assert reply.status_code == 200, reply.text
        offer = reply.json().get("identity")
        if i % 3 == 0 and offer is not None:
            # Lost on its way (or the agent crashed before keeping it): the same
            # request comes again, presenting the nonce the agent still holds.
            again = exchange(server, cid, secret, {"ack": 0, "identity": nonce})
            assert again.status_code == 200, again.text
            continue
        if i % 3 == 1 and offer is not None:
            # Kept; and a copy of the request sent before arrives late.
            late = exchange(server, cid, secret, {"ack": 0, "identity": nonce})
            assert late.status_code == 200, late.text
        nonce = offer or nonce
    assert _computer(server, cid)["identity_conflict"] is None
    # A nonce this computer's agent never held is caught.
    stranger = exchange(server, cid, secret, {"ack": 0, "identity": "0" * 32})
    assert stranger.status_code == 409 and stranger.json()["code"] == "identity-conflict"
    # Flagged, it gets no content either (a job's Download phase), not even its tenant's.
    with server.api() as api:
        up = api.post("/content", params={"name": "payload"}, content=b"secret payload")
        assert up.status_code == 201, up.text
    fetch = httpx.get(
        f"{server.url}/agent/v1/content/{up.json()['sha256']}",
        headers={"x-taskfleet-computer": str(cid), "authorization": f"Bearer {secret}"},
        timeout=30,
    )
    assert fetch.status_code == 409 and "flagged" in fetch.text, fetch.text
    assert b"secret payload" not in fetch.content


def test_an_old_identity_never_regains_rights(start_server: Callable[..., Server]) -> None:
    server = start_server()
    token = enroll_token(server, max_uses=5)
    cid, old = enrolled(server, token, "rebuilt")
    assert exchange(server, cid, old).status_code == 200
    # Enrolled again (a rebuilt machine): the old secret is refused.
    cid2, new = enrolled(server, token, "rebuilt")
    assert cid2 == cid
    assert exchange(server, cid, old).status_code == 401
    assert exchange(server, cid, new).status_code == 200
    # Removed: neither works, and enrolling again gives a third identity.
    with server.api() as api:
        assert api.delete(f"/computers/{cid}").status_code == 200
    assert exchange(server, cid, new).status_code == 401
    cid3, third = enrolled(server, token, "rebuilt")
    assert exchange(server, cid3, third).status_code == 200
    for secret in (old, new):
        assert exchange(server, cid3, secret).status_code == 401
