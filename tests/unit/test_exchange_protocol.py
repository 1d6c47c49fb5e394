"""Parsing and limits of the exchange body, and payload signatures."""

from __future__ import annotations

import pytest

from taskfleet.protocol.exchange import (
    MAX_MESSAGES,
    MAX_OUTPUT_CHARS,
    ProtocolError,
    canonical,
    parse_agent_request,
)
from taskfleet.protocol.signing import SignatureError, Signer, Verifier, new_signing_seed


def _result(seq=1, **kw):
    return {
        "seq": seq,
        "type": "operation-result",
        "op": 7,
        "status": "succeeded",
        "exit_code": 0,
        "stdout": "",
        "stderr": "",
        "result_line": "ok",
        **kw,
    }


def test_a_valid_exchange_parses():
    req = parse_agent_request({"ack": 3, "messages": [_result(1), _result(2)], "wait": 10})
    assert req.ack == 3 and [r.seq for r in req.messages] == [1, 2] and req.wait == 10
    assert req.max_seq == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "JSON object"),
        ({"ack": -1}, "ack"),
        ({"ack": "1"}, "ack"),
        ({"ack": True}, "ack"),
        ({"ack": 0, "messages": {}}, "list"),
        ({"ack": 0, "messages": [1]}, "object"),
        ({"ack": 0, "messages": [{"type": "hello"}]}, "unknown type"),
        ({"ack": 0, "messages": [_result(status="maybe")]}, "status"),
        ({"ack": 0, "messages": [_result(exit_code="0")]}, "exit_code"),
        ({"ack": 0, "messages": [_result(2), _result(1)]}, "increase"),
        ({"ack": 0, "messages": [_result(stdout="x" * (MAX_OUTPUT_CHARS + 1))]}, "limit"),
        ({"ack": 0, "messages": [_result(i + 1) for i in range(MAX_MESSAGES + 1)]}, "limit"),
        ({"ack": 0, "wait": 10_000}, "wait"),
        ({"ack": 0, "agent": {"tickle_port": 70000}}, "tickle_port"),
    ],
)
def test_bad_exchanges_are_refused_naming_the_problem(body, message):
    with pytest.raises(ProtocolError, match=message):
        parse_agent_request(body)


def test_canonical_text_is_stable_whatever_the_key_order():
    assert canonical({"b": 1, "a": [1, "é"]}) == canonical({"a": [1, "é"], "b": 1})
    assert canonical({"a": "é"}) == '{"a":"\\u00e9"}'


def test_signatures_verify_and_any_change_is_refused():
    signer = Signer(new_signing_seed())
    text = canonical({"computer": 1, "op": 2})
    sig = signer.sign(text)
    verifier = Verifier(signer.public_key_hex)
    verifier.verify(text, sig)
    with pytest.raises(SignatureError):
        verifier.verify(text.replace('"op":2', '"op":3'), sig)
    with pytest.raises(SignatureError):
        Verifier(Signer(new_signing_seed()).public_key_hex).verify(text, sig)
    with pytest.raises(SignatureError):
        verifier.verify(text, "zz")
