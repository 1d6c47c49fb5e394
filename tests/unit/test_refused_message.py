"""The agent -> server ``refused`` message: built and parsed in protocol/exchange.py."""

from __future__ import annotations

from typing import Any

import pytest

from taskfleet.protocol.exchange import (
    MAX_TEXT_CHARS,
    REFUSAL_REASONS,
    ProtocolError,
    RefusedMessage,
    parse_agent_request,
    refused_message,
)
from taskfleet.settings import INT64_MAX


def _msg(seq: int = 1, **kw: Any) -> dict[str, Any]:
    return {**refused_message(7, 121, "wrong-computer", "for computer 18"), "seq": seq, **kw}


def test_a_refusal_parses_with_or_without_an_operation() -> None:
    req = parse_agent_request({"ack": 0, "messages": [_msg(1), _msg(2, op=None)]})
    assert req.messages == [
        RefusedMessage(1, 7, 121, "wrong-computer", "for computer 18"),
        RefusedMessage(2, 7, None, "wrong-computer", "for computer 18"),
    ]


@pytest.mark.parametrize("reason", sorted(REFUSAL_REASONS))
def test_every_reason_round_trips(reason: str) -> None:
    message = {**refused_message(INT64_MAX, INT64_MAX, reason, "x\x00"), "seq": INT64_MAX}
    (m,) = parse_agent_request({"ack": 0, "messages": [message]}).messages
    assert isinstance(m, RefusedMessage) and m.reason == reason and m.text == "x\u2400"


def test_the_builder_keeps_texts_within_the_limit_and_knows_its_reasons() -> None:
    long = refused_message(1, None, "malformed", "y" * (MAX_TEXT_CHARS + 50))
    assert len(long["text"]) == MAX_TEXT_CHARS
    parse_agent_request({"ack": 0, "messages": [{**long, "seq": 1}]})
    with pytest.raises(ValueError, match="unknown reason"):
        refused_message(1, None, "bored", "")


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (_msg(reason="bored"), "'reason'"),
        (_msg(reason=None), "'reason'"),
        (_msg(server_seq=0), "'server_seq'"),
        (_msg(server_seq="7"), "'server_seq'"),
        (_msg(server_seq=INT64_MAX + 1), "limit"),
        (_msg(op=0), "'op'"),
        (_msg(op=INT64_MAX + 1), "limit"),
        (_msg(text=5), "'text'"),
        (_msg(text="z" * (MAX_TEXT_CHARS + 1)), "limit"),
    ],
)
def test_a_bad_refusal_is_refused_whole(message: dict[str, Any], error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        parse_agent_request({"ack": 0, "messages": [message]})
