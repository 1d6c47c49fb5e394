"""Issue 9 items 2-4 at the protocol edge: text as every database stores it, numbers
within their columns, the reply's byte budget."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from taskfleet.domain.scripts import (
    MAX_ARGV_CHARS,
    MAX_ENV_CHARS,
    MAX_NAME_CHARS,
    validate_script_params,
)
from taskfleet.protocol.exchange import (
    NUL_SYMBOL,
    ProtocolError,
    clean_json,
    clean_text,
    loads_body,
    parse_agent_request,
)
from taskfleet.server import exchange as writer  # REPLY_MAX_BYTES moved with the exchange
from taskfleet.server.exchange import Pending as _Pending
from taskfleet.settings import INT32_MAX, INT64_MAX


def _result(**kw: Any) -> dict[str, Any]:
    return {"seq": 1, "type": "operation-result", "op": 7, "status": "succeeded", **kw}


def _status(**kw: Any) -> dict[str, Any]:
    return {"seq": 1, "type": "operation-status", "op": 7, "status": "working", **kw}


def _parse(*messages: dict[str, Any], **body: Any) -> Any:
    return parse_agent_request({"ack": 0, "messages": list(messages), **body})


def test_clean_text_makes_nul_visible_and_replaces_unpaired_surrogates_only() -> None:
    assert clean_text("plain") == "plain"
    assert clean_text("é 😀 ok") == "é 😀 ok"  # real non-ASCII text is untouched
    assert clean_text("a\x00b\x00") == f"a{NUL_SYMBOL}b{NUL_SYMBOL}"
    assert clean_text("x\ud800y\udfff") == "x\ufffdy\ufffd"
    assert len(clean_text("\x00\udc80" * 10)) == 20  # one character for one: limits hold
    assert clean_json({"k\x00": ["v\ud800", 1, None, {"n": "\x00"}]}) == {
        f"k{NUL_SYMBOL}": ["v\ufffd", 1, None, {"n": NUL_SYMBOL}]
    }


def test_every_text_of_a_parsed_exchange_is_cleaned() -> None:
    req = _parse(
        _result(stdout="o\x00", stderr="e\udc80", result_line="r\x00"),
        _status(seq=2, reason="why\x00"),
        agent={"version": "v\x00", "policy": {"users": ["u"]}},
    )
    res, st = req.messages
    assert (res.stdout, res.stderr, res.result_line) == ("o␀", "e\ufffd", "r␀")
    assert st.reason == "why␀"
    assert req.agent is not None
    assert req.agent.version == "v␀"
    assert req.agent.policy == {"scripts": False, "users": ["u"], "types": [], "unsupported": {}}
    # A policy names users exactly: a name that is not plain text is refused, not cleaned.
    for user in ("u\ud800", "u\x00"):
        with pytest.raises(ProtocolError, match="invalid policy"):
            _parse(agent={"version": "v", "policy": {"users": [user]}})


def test_loads_body_takes_lone_surrogate_escapes_and_still_refuses_non_numbers() -> None:
    body = json.dumps({"ack": 0, "messages": [_result(stdout="bad \udcff name")]}).encode()
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)  # why the slow path exists
    req = parse_agent_request(loads_body(body))
    assert req.messages[0].stdout == "bad \ufffd name"  # type: ignore[union-attr]
    for bad in (b'{"ack": NaN, "x": "\\ud800"}', b'{"ack": -Infinity, "x": "\\ud800"}'):
        with pytest.raises(ProtocolError):
            loads_body(bad)
    with pytest.raises(orjson.JSONDecodeError):
        loads_body(b'{"ack": NaN}')  # no escape: orjson's own error (400 "malformed")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"ack": INT64_MAX + 1}, "'ack' is"),
        ({"messages": [_result(seq=INT64_MAX + 1)]}, "'seq' is"),
        ({"messages": [_result(seq=2**64 - 1)]}, "'seq' is 18446744073709551615"),
        ({"messages": [_result(op=INT64_MAX + 1)]}, "'op' is"),
        ({"messages": [_status(op=INT64_MAX + 1)]}, "'op' is"),
        ({"messages": [_result(exit_code=INT32_MAX + 1)]}, "'exit_code' must be"),
        ({"messages": [_result(exit_code=-(2**31) - 1)]}, "'exit_code' must be"),
        ({"messages": [_result(stdout_dropped=INT64_MAX + 1)]}, "'stdout_dropped' is"),
        ({"messages": [_result(stderr_dropped=INT64_MAX + 1)]}, "'stderr_dropped' is"),
        ({"messages": [_status(attempt=INT32_MAX + 1)]}, "'attempt' is"),
        ({"messages": [_result(started_at=float("inf"))]}, "'started_at' must be a finite"),
        ({"messages": [_result(ended_at=float("nan"))]}, "'ended_at' must be a finite"),
        ({"messages": [_result(ended_at=10**400)]}, "'ended_at' must be a finite"),
        ({"messages": [_status(until=-float("inf"))]}, "'until' must be a finite"),
        ({"wait": float("nan")}, "'wait' must be a finite"),
        ({"messages": [_status(reason="r" * 2001)]}, "'reason' is 2001 characters"),
        ({"agent": {"version": "v" * 65}}, "'version' is 65 characters"),
    ],
)
def test_numbers_beyond_their_columns_and_long_texts_are_refused(body: Any, message: str) -> None:
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(")):
        parse_agent_request({"ack": 0, **body})


def test_the_largest_values_that_fit_their_columns_are_taken() -> None:
    req = _parse(
        _result(
            seq=INT64_MAX - 1,
            op=INT64_MAX,
            exit_code=-(2**31),
            stdout_dropped=INT64_MAX,
            started_at=1.7e308,
        ),
        _status(seq=INT64_MAX, op=INT64_MAX, attempt=INT32_MAX, until=-1.7e308),
        ack=INT64_MAX,
    )
    assert req.ack == INT64_MAX and req.max_seq == INT64_MAX


def test_the_reply_budget_takes_messages_until_full_and_always_one() -> None:
    p = _Pending(0, 0, 0)
    big = "x" * (writer.REPLY_MAX_BYTES + 1)
    assert p.fits(big)  # an empty reply takes one message, however large
    p.add(big, 1)
    assert not p.fits("y")
    q = _Pending(0, 0, 0)
    half = "h" * (writer.REPLY_MAX_BYTES // 2)
    q.add(half, 1)
    assert q.fits(half)
    q.add(half, 2)
    assert q.size == 2 * len(half) <= writer.REPLY_MAX_BYTES
    assert not q.fits("z" * (writer.REPLY_MAX_BYTES - q.size + 1))
    assert q.sent == 2


def test_a_relay_reply_budget_is_shared_by_its_computers_and_takes_at_least_one() -> None:
    budget = writer.ReplyBudget(100)
    a, b = _Pending(0, 0, 0, budget), _Pending(0, 0, 0, budget)
    assert a.fits("x" * 150)  # the whole reply is empty: one message goes, however large
    a.add("x" * 60, 4)
    assert not b.fits("y" * 41)  # b's own reply is empty, but the relay's is not
    assert b.fits("y" * 40)
    b.add("y" * 40, 9)
    assert budget.used == 100 and not a.fits("z") and not b.fits("z")
    assert (a.sent, b.sent) == (4, 9)


def test_argv_env_and_names_are_bounded_like_scripts() -> None:
    def check(**params: Any) -> dict[str, Any]:
        return validate_script_params(params, default_cap=10, max_cap=10)

    check(argv=["a" * (MAX_ARGV_CHARS - 1), "b"], env={"K": "v" * (MAX_ENV_CHARS - 1)})
    with pytest.raises(ValueError, match="argv is"):
        check(argv=["a" * MAX_ARGV_CHARS, "b"])
    with pytest.raises(ValueError, match="env is"):
        check(argv=["true"], env={"K": "v" * MAX_ENV_CHARS})
    for key in ("cwd", "user"):
        check(argv=["true"], **{key: "n" * MAX_NAME_CHARS})
        with pytest.raises(ValueError, match=f"{key} is"):
            check(argv=["true"], **{key: "n" * (MAX_NAME_CHARS + 1)})
    with pytest.raises(ValueError, match="interpreter is"):
        check(script="true", interpreter="/" * (MAX_NAME_CHARS + 1))
