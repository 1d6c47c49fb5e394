"""An operation runs once per attempt, even when the scrubber fires while it starts.

A run is "executing" for the scrubber (SPEC 5 rule 1) from the moment the agent
spawns it, not only once its process exists: starting a process awaits, and a
scrubber run in that gap saw a Working record with nothing running, continued
it and ran the script a second time (seen as a flaky end-to-end test). The
agent here is real and in process, with its own state folder; nothing is sent.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from taskfleet.agent import state as st
from taskfleet.agent.main import Agent, AgentConfig
from taskfleet.protocol.signing import Signer, Verifier, new_signing_seed


def _agent(tmp_path: Path) -> Agent:
    agent = Agent(AgentConfig(server="http://127.0.0.1:9", state_dir=tmp_path / "agent"))
    key = Signer(new_signing_seed()).public_key_hex
    agent.ident = st.Identity("http://127.0.0.1:9", 1, "secret", 1, b"k" * 32, key)
    agent.ops.bind(agent.ident, Verifier(key))  # the unsigned test payload is refused: no process
    return agent


def _receive(agent: Agent, op: int) -> st.Operation:
    body = json.dumps({"type": "operation", "op": op})
    agent.state.receive([st.NewOperation(op, op, "execute-script", body, True)], [], op)
    got = agent.state.operation(op)
    assert got is not None
    return got


async def test_an_operation_is_never_spawned_twice(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    try:
        op = _receive(agent, 1)
        agent.ops.spawn_now(op.op)
        agent.ops.spawn_now(op.op)  # a second trigger (scrub loop, tickle) before it runs
        assert len(agent.ops.tasks) == 1 and agent.ops.owned == {1}
        await asyncio.gather(*agent.ops.tasks)
        assert agent.ops.owned == set()
    finally:
        agent.state.close()


async def test_a_scrubber_run_while_a_run_starts_skips_instead_of_continuing_it(
    tmp_path: Path,
) -> None:
    agent = _agent(tmp_path)
    try:
        op = _receive(agent, 1)
        agent.ops.spawn_now(op.op)  # its task has not run yet: no process exists
        agent.state.start(op.op)  # the record says Working, as it does while a process starts
        agent.scrub_pass()
        record = agent.state.operation(op.op)
        assert record is not None and record.status == st.WORKING and record.attempts == 1
        assert len(agent.ops.tasks) == 1  # not continued: no second run spawned
        await asyncio.gather(*agent.ops.tasks)
    finally:
        agent.state.close()
