"""The agent's parser of exchange replies: strict on what numbers the conversation,
tolerant of one unreadable message (acknowledged, never acted on)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from taskfleet.protocol.exchange import (
    CancelMessage,
    MalformedMessage,
    OperationMessage,
    ProtocolError,
    ServerSettings,
    loads_reply,
    operation_message,
    parse_server_reply,
)
from taskfleet.protocol.exchange import cancel_message as signed_cancel
from taskfleet.settings import INT64_MAX


def _op(seq: int = 1, **kw: Any) -> dict[str, Any]:
    return {**operation_message(seq, 7, '{"op":7}', "ab" * 64), **kw}


def cancel_message(seq: int, op: int) -> dict[str, Any]:
    return signed_cancel(seq, op, f'{{"op":{op}}}', "cd" * 64)


def _reply(*messages: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {
        "ack": 3,
        "messages": list(messages),
        "server_time": 1795300001.2,
        "settings": {"poll_interval": 1800.0},
        **kw,
    }


def test_a_valid_reply_parses_into_typed_messages() -> None:
    reply = parse_server_reply(_reply(_op(5), cancel_message(6, 118), more=True))
    assert reply.ack == 3 and reply.more is True
    assert reply.server_time == 1795300001.2
    assert reply.settings == ServerSettings(poll_interval=1800.0)
    assert reply.messages == [
        OperationMessage(5, 7, '{"op":7}', "ab" * 64),
        CancelMessage(6, 118, '{"op":118}', "cd" * 64),
    ]


def test_the_fast_path_reply_and_a_bare_ack_parse() -> None:
    raw = b'{"ack":0,"messages":[],"server_time":1795300001.200,"settings":{"poll_interval":60}}'
    assert parse_server_reply(loads_reply(raw)).messages == []
    bare = parse_server_reply({"ack": 0})
    assert bare.messages == [] and bare.server_time is None and bare.more is False
    assert bare.settings.poll_interval is None


def test_unknown_fields_are_ignored_and_signed_text_is_kept_exactly() -> None:
    body = '{"params":{"script":"echo \\u0000"}}'  # escapes that clean_text would change
    reply = parse_server_reply(
        _reply(_op(1, body=body, extra=1), settings={"poll_interval": 5, "future": "x"}, new=[])
    )
    assert reply.settings.poll_interval == 5.0
    assert isinstance(reply.messages[0], OperationMessage) and reply.messages[0].body == body


def test_the_largest_numbers_that_fit_are_taken() -> None:
    reply = parse_server_reply(_reply(_op(INT64_MAX, op=INT64_MAX), ack=INT64_MAX))
    assert reply.ack == INT64_MAX
    assert reply.messages[0].seq == INT64_MAX and reply.messages[0].op == INT64_MAX


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ([], "JSON object"),
        ({"messages": []}, "'ack'"),
        ({"ack": -1}, "'ack'"),
        ({"ack": "1"}, "'ack'"),
        ({"ack": True}, "'ack'"),
        ({"ack": 1.0}, "'ack'"),
        ({"ack": INT64_MAX + 1}, "limit"),
        ({"ack": 0, "messages": {}}, "list"),
        ({"ack": 0, "messages": [1]}, "message 0 must be an object"),
        ({"ack": 0, "messages": [{"type": "cancel", "op": 1}]}, "message 0: 'seq'"),
        ({"ack": 0, "messages": [cancel_message(0, 1)]}, "'seq'"),
        ({"ack": 0, "messages": [cancel_message(INT64_MAX + 1, 1)]}, "limit"),
        ({"ack": 0, "messages": [{**cancel_message(1, 1), "seq": "1"}]}, "'seq'"),
        ({"ack": 0, "messages": [cancel_message(2, 1), cancel_message(2, 1)]}, "increase"),
        ({"ack": 0, "messages": [cancel_message(2, 1), cancel_message(1, 1)]}, "increase"),
        ({"ack": 0, "server_time": "now"}, "server_time"),
        ({"ack": 0, "server_time": math.inf}, "finite"),
        ({"ack": 0, "server_time": math.nan}, "finite"),
        ({"ack": 0, "server_time": 10**400}, "finite"),
        ({"ack": 0, "settings": []}, "settings"),
        ({"ack": 0, "settings": {"poll_interval": 0}}, "positive"),
        ({"ack": 0, "settings": {"poll_interval": -5}}, "positive"),
        ({"ack": 0, "settings": {"poll_interval": "60"}}, "poll_interval"),
        ({"ack": 0, "settings": {"poll_interval": math.inf}}, "finite"),
        ({"ack": 0, "more": "yes"}, "more"),
        ({"ack": 0, "more": 1}, "more"),
    ],
)
def test_a_reply_that_cannot_be_trusted_as_a_whole_is_refused(reply: Any, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_server_reply(reply)


@pytest.mark.parametrize(
    ("message", "op", "error"),
    [
        ({"seq": 4, "type": "reboot", "op": 9}, 9, "unknown message type 'reboot'"),
        ({"seq": 4, "op": 9}, 9, "unknown message type"),
        ({"seq": 4, "type": "cancel"}, None, "'op'"),
        ({"seq": 4, "type": "cancel", "op": 0}, None, "'op'"),
        ({"seq": 4, "type": "cancel", "op": "9"}, None, "'op'"),
        ({"seq": 4, "type": "cancel", "op": True}, None, "'op'"),
        ({"seq": 4, "type": "cancel", "op": INT64_MAX + 1}, None, "limit"),
        ({**cancel_message(4, 9), "sig": ["x"]}, 9, "'sig' must be a string"),
        (_op(4, op=-7), None, "'op'"),
        (_op(4, body=["not", "text"]), 7, "'body' must be a string"),
        (_op(4, body=None), 7, "'body' must be a string"),
        (_op(4, sig=12), 7, "'sig' must be a string"),
        (_op(4, sig="a" * 257), 7, "'sig' is 257 characters"),
    ],
)
def test_one_unreadable_message_is_kept_apart_with_its_seq(
    message: dict[str, Any], op: int | None, error: str
) -> None:
    reply = parse_server_reply(_reply(_op(3), message, cancel_message(5, 2)))
    assert [m.seq for m in reply.messages] == [3, 4, 5]
    bad = reply.messages[1]
    assert isinstance(bad, MalformedMessage) and bad.op == op and error in bad.error
    assert isinstance(reply.messages[2], CancelMessage)


def test_an_order_without_body_or_signature_parses_as_unsigned() -> None:
    unsigned = [{"seq": 1, "type": "operation", "op": 7}, {"seq": 2, "type": "cancel", "op": 7}]
    reply = parse_server_reply(_reply(*unsigned))
    assert reply.messages == [OperationMessage(1, 7, "", ""), CancelMessage(2, 7, "", "")]


@pytest.mark.parametrize(
    "raw", [b"", b"<html>502 Bad Gateway</html>", b'{"ack":0', b'{"ack":NaN}', b"\xff\xfe"]
)
def test_a_body_that_is_not_json_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed JSON"):
        loads_reply(raw)
