"""The agent's edges (issue 9 items 15 and 16): tickles replayed across a
restart, a UDP port that is taken, and the enrollment token kept out of `ps`."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from pathlib import Path

from taskfleet.protocol.tickle import encode_tickle
from tests.conftest import _cli, enroll_token, spawn, wait_until


def _exchanges(server) -> float:
    return server.metric("taskfleet_exchanges_total", 'path="fast"') + server.metric(
        "taskfleet_exchanges_total", 'path="slow"'
    )


def _settled(server, at_least: float) -> float:
    """Wait for the exchange count to reach ``at_least`` and stay put for a moment."""
    wait_until(lambda: _exchanges(server) >= at_least, 20, f"{at_least:g} exchanges")
    seen = [_exchanges(server)]

    def still() -> bool:
        now = _exchanges(server)
        steady = now == seen[-1] and len(seen) >= 5
        seen.append(now)
        return steady

    wait_until(still, 20, "the exchange count to settle")
    return seen[-1]


def _tickle_key(state_dir) -> tuple[int, bytes]:
    db = sqlite3.connect(state_dir / "state.db")
    try:
        (raw,) = db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
    finally:
        db.close()
    ident = json.loads(raw)
    return int(ident["computer_id"]), bytes.fromhex(ident["tickle_key"])


def _send(port: int, datagram: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(datagram, ("127.0.0.1", port))


def test_a_tickle_replayed_after_an_agent_restart_triggers_no_exchange(server, start_agent):
    agent = start_agent(server, enroll_token(server))
    cid, key = _tickle_key(agent.state_dir)
    base = _settled(server, 1)  # the start's exchange, and nothing else
    captured = encode_tickle(key, cid, time.time())
    _send(agent.tickle_port, captured)
    assert _settled(server, base + 1) == base + 1  # a real tickle: one exchange
    agent.proc.stop()
    again = start_agent(server, None, state_dir=agent.state_dir, tickle_port=agent.tickle_port)
    base = _settled(server, base + 2)  # the restarted agent's first exchange
    # Replayed within its 120 s lifetime, to an agent whose nonce cache is new.
    _send(agent.tickle_port, captured)
    wait_until(
        lambda: "tickle dropped (replayed)" in again.proc.text(), 20, "the replay to be dropped"
    )
    assert _exchanges(server) == base
    # A fresh tickle still wakes it: the replay was refused, not the channel.
    _send(agent.tickle_port, encode_tickle(key, cid, time.time()))
    assert _settled(server, base + 1) == base + 1


def _computers(server) -> list[dict]:
    with server.api() as api:
        return api.get("/computers").json()


def _uses_left(server, name: str) -> int:
    with server.api() as api:
        (tok,) = [t for t in api.get("/tokens").json() if t["name"] == name]
    return int(tok["uses_left"])


def test_an_agent_whose_udp_port_is_taken_stops_before_it_enrolls(server, start_agent, tmp_path):
    token = enroll_token(server, name="once", max_uses=1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        agent = start_agent(server, token, tickle_port=port, wait_enrolled=False)
        wait_until(lambda: not agent.proc.alive(), 30, "the agent to stop")
    assert agent.proc.popen.returncode != 0
    text = agent.proc.text()
    assert f"cannot listen for wake-ups on UDP 127.0.0.1:{port}" in text
    assert "Nothing was enrolled" in text
    assert _computers(server) == []
    assert _uses_left(server, "once") == 1
    # The port is free now: the same single-use token enrolls this agent.
    again = start_agent(server, token, state_dir=agent.state_dir, tickle_port=port)
    assert [c["id"] for c in _computers(server)] == [again.computer_id]
    assert _uses_left(server, "once") == 0


def _start(server, tmp_path, name: str, *args: str, env: dict[str, str] | None = None):
    state_dir = tmp_path / name
    proc = spawn(
        _cli(
            "agent",
            "--server",
            server.url,
            "--state-dir",
            str(state_dir),
            "--tickle-port",
            "0",
            "--hostname",
            name,
            *args,
        ),
        tmp_path / f"{name}.log",
        env={"TASKFLEET_ENROLL_TOKEN": "", **(env or {})},
    )
    return proc


def test_the_enrollment_token_can_come_from_a_file_or_the_environment(server, tmp_path):
    token = enroll_token(server)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    procs = [
        _start(server, tmp_path, "from-file", "--enroll-token-file", str(token_file)),
        _start(server, tmp_path, "from-env", env={"TASKFLEET_ENROLL_TOKEN": token}),
    ]
    try:
        for p in procs:
            wait_until(lambda p=p: "agent ready" in p.text() or not p.alive(), 30, "enrollment")
            assert p.alive(), p.text()[-2000:]
            # Not on the command line, so not in `ps` for every user to read.
            cmdline = Path(f"/proc/{p.popen.pid}/cmdline").read_bytes()
            assert token.encode() not in cmdline
        assert sorted(c["hostname"] for c in _computers(server)) == ["from-env", "from-file"]
    finally:
        for p in procs:
            p.stop()


def test_a_bad_enrollment_token_file_is_a_clear_error(server, tmp_path):
    token = enroll_token(server)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    good = tmp_path / "good"
    good.write_text(token)
    cases = [
        (("--enroll-token-file", str(empty)), {}, "is empty"),
        (("--enroll-token-file", str(tmp_path / "missing")), {}, "does not exist"),
        (("--enroll-token-file", str(good), "--enroll-token", token), {}, "give the enrollment"),
        (("--enroll-token-file", str(good)), {"TASKFLEET_ENROLL_TOKEN": token}, "give the"),
    ]
    for i, (args, env, message) in enumerate(cases):
        p = _start(server, tmp_path, f"bad-{i}", *args, env=env)
        assert p.popen.wait(30) == 2, p.text()
        assert message in p.text()
    assert _computers(server) == []
