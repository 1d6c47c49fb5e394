"""The agent acts only on orders genuinely meant for it, and reports every other one.

A real agent, in process, with its own state folder, is handed replies as its
exchange parses them (``parse_server_reply``), signed by a real server key:
what is refused is never stored or run, is acknowledged, and leaves a
``refused`` message in the outbox for the server, in the same transaction. An
operation that is genuine but that the computer's policy refuses is still
reported as a Failed result (unchanged). Nothing is sent.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from taskfleet.agent import state as st
from taskfleet.agent.main import Agent, AgentConfig
from taskfleet.protocol.exchange import (
    cancel_message,
    operation_message,
    parse_server_reply,
)
from taskfleet.protocol.orders import cancel_body, operation_body
from taskfleet.protocol.signing import Signer, Verifier, new_signing_seed

SERVER = Signer(new_signing_seed())
COMPUTER, GENERATION = 17, 3


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    agent = Agent(AgentConfig(server="http://127.0.0.1:9", state_dir=tmp_path / "agent"))
    ident = st.Identity(
        "http://127.0.0.1:9", COMPUTER, "secret", GENERATION, b"k" * 32, SERVER.public_key_hex
    )
    agent.state.save_identity(ident)
    agent.ident = ident
    agent.ops.bind(ident, Verifier(SERVER.public_key_hex))
    yield agent
    agent.state.close()


def _body(op: int, **kw: Any) -> str:
    fields: dict[str, Any] = {
        "computer": COMPUTER,
        "generation": GENERATION,
        "op": op,
        "type": "execute-script",
        "params": {"script": "echo hi"},
        "policy": {},
        "timeout": 30.0,
        "issued_at": 1795300000.0,
    }
    return operation_body(**{**fields, **kw})


def _op(seq: int, op: int, body: str | None = None, signer: Signer = SERVER) -> dict[str, Any]:
    body = body or _body(op)
    return operation_message(seq, op, body, signer.sign(body))


def _cancel(seq: int, op: int, signer: Signer | None = SERVER, **kw: Any) -> dict[str, Any]:
    body = cancel_body(**{"computer": COMPUTER, "generation": GENERATION, "op": op, **kw})
    return cancel_message(seq, op, body, signer.sign(body) if signer else "")


async def _receive(agent: Agent, *messages: dict[str, Any]) -> None:
    reply = parse_server_reply({"ack": 0, "messages": list(messages)})
    agent.ops.receive(reply.messages, pushed=True)
    await asyncio.gather(*agent.ops.tasks)  # what was spawned has run (and been refused)


def _outbox(agent: Agent) -> list[dict[str, Any]]:
    return [json.loads(m) for m in agent.state.pending(1000, 10**9)]


def _refusals(agent: Agent) -> list[tuple[int, int | None, str]]:
    return [
        (m["server_seq"], m["op"], m["reason"]) for m in _outbox(agent) if m["type"] == "refused"
    ]


async def test_an_altered_operation_is_refused_never_stored_and_reported(agent: Agent) -> None:
    genuine = _op(1, 101)
    altered = {**genuine, "body": genuine["body"].replace("echo hi", "rm -rf ~")}
    await _receive(agent, altered)
    assert agent.state.operation(101) is None and agent.state.server_seq == 1
    assert _refusals(agent) == [(1, 101, "bad-signature")]
    (m,) = _outbox(agent)
    assert "signature does not verify" in m["text"] and "rm -rf" not in m["text"]


async def test_an_operation_for_another_computer_or_generation_is_refused(agent: Agent) -> None:
    await _receive(
        agent,
        _op(1, 201, _body(201, computer=COMPUTER + 1)),
        _op(2, 202, _body(202, generation=GENERATION - 1)),
        _op(3, 203, signer=Signer(new_signing_seed())),
        {"seq": 4, "type": "operation", "op": 204},  # unsigned
    )
    assert all(agent.state.operation(op) is None for op in (201, 202, 203, 204))
    assert _refusals(agent) == [
        (1, 201, "wrong-computer"),
        (2, 202, "wrong-generation"),
        (3, 203, "bad-signature"),
        (4, 204, "bad-signature"),
    ]
    assert not [m for m in _outbox(agent) if m["type"] == "operation-result"]


async def test_a_replayed_operation_is_refused_and_not_run_again(agent: Agent) -> None:
    await _receive(agent, _op(1, 301))
    first = agent.state.operation(301)
    assert first is not None and first.finished  # run (refused by policy: no scripts)
    results = [m for m in _outbox(agent) if m["type"] == "operation-result"]
    assert len(results) == 1 and results[0]["status"] == "failed"  # policy: Failed, unchanged
    resent = _op(1, 301)
    await _receive(agent, resent)  # its own seq again: a resend, dropped silently
    assert _refusals(agent) == []
    await _receive(agent, {**resent, "seq": 2}, _op(3, 301, _body(301, issued_at=1.0)))
    assert _refusals(agent) == [(2, 301, "replayed"), (3, 301, "replayed")]
    texts = [m["text"] for m in _outbox(agent) if m["type"] == "refused"]
    assert "another signed text" not in texts[0] and "another signed text" in texts[1]
    assert agent.state.operation(301) == first  # the record did not move
    assert len([m for m in _outbox(agent) if m["type"] == "operation-result"]) == 1


async def test_the_same_operation_twice_in_one_reply_is_stored_once(agent: Agent) -> None:
    await _receive(agent, _op(1, 401), _op(2, 401))
    assert _refusals(agent) == [(2, 401, "replayed")]
    assert agent.state.operation(401) is not None


async def test_only_a_genuine_cancel_is_acted_on(agent: Agent) -> None:
    agent.state.receive([st.NewOperation(501, 1, "execute-script", "{}", True)], [], 1)
    stranger = Signer(new_signing_seed())
    await _receive(
        agent,
        _cancel(2, 501, signer=None),
        _cancel(3, 501, signer=stranger),
        _cancel(4, 501, computer=COMPUTER + 1),
        _cancel(5, 501, generation=GENERATION + 1),
        {**_cancel(6, 502), "op": 501},  # a genuine cancel of 502, sent as one of 501
        {**_op(7, 501), "type": "cancel"},  # a genuine operation, sent as its cancel
    )
    record = agent.state.operation(501)
    assert record is not None and not record.cancel_requested
    assert [r[2] for r in _refusals(agent)] == [
        "bad-signature",
        "bad-signature",
        "wrong-computer",
        "wrong-generation",
        "bad-signature",
        "bad-signature",
    ]
    await _receive(agent, _cancel(8, 501))
    record = agent.state.operation(501)
    assert record is not None and record.cancel_requested
    assert len(_refusals(agent)) == 6


async def test_an_unreadable_message_is_acknowledged_and_reported(agent: Agent) -> None:
    await _receive(agent, {"seq": 1, "type": "reboot", "op": 9}, {"seq": 2, "type": "cancel"})
    assert agent.state.server_seq == 2
    assert _refusals(agent) == [(1, 9, "malformed"), (2, None, "malformed")]


async def test_refusals_are_queued_in_order_with_the_results(agent: Agent) -> None:
    await _receive(agent, _op(1, 601, _body(601, computer=99)), _op(2, 602))
    seqs = [m["seq"] for m in _outbox(agent)]
    assert seqs == sorted(seqs) and len(seqs) == 2
    assert [m["type"] for m in _outbox(agent)] == ["refused", "operation-result"]
    assert agent.trigger.is_set()  # the exchange loop is told there is something to send
