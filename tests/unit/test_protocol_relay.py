"""The relay exchange's parsers and builders (protocol/relay.py)."""

from __future__ import annotations

import json
import math

import pytest

from taskfleet.protocol.exchange import ProtocolError, operation_result
from taskfleet.protocol.relay import (
    MAX_RELAY_COMPUTERS,
    ComputerOut,
    EntryError,
    parse_relay_reply,
    parse_relay_request,
    relay_entry,
    relay_reply_body,
    relay_request,
    roster_body,
    roster_entry,
)
from taskfleet.settings import INT64_MAX


def _result(seq: int, op: int = 5) -> dict[str, object]:
    return {**operation_result(op, "succeeded", "ok", exit_code=0), "seq": seq}


def test_a_built_request_parses_back() -> None:
    body = relay_request(
        [
            relay_entry(12, ack=7, have=9, messages=[_result(1), _result(2)], address="10.0.0.5"),
            relay_entry(13, ack=0, have=0, messages=[], seen=1.5),
        ],
        roster="v1",
        resync=True,
        stats={"spool": 3},
    )
    req = parse_relay_request(body)
    assert req.roster == "v1" and req.resync and req.stats == {"spool": 3.0}
    assert [e.id for e in req.entries] == [12, 13]
    first = req.entries[0]
    assert first.request.ack == 7 and first.have == 9 and first.address == "10.0.0.5"
    assert [m.seq for m in first.request.messages] == [1, 2]
    assert req.entries[1].seen == 1.5 and req.errors == []


def test_one_bad_entry_is_refused_alone() -> None:
    body = relay_request(
        [
            relay_entry(12, ack=0, have=0, messages=[_result(2), _result(1)]),  # seq decrease
            relay_entry(13, ack=0, have=INT64_MAX + 1, messages=[]),
            relay_entry(14, ack=0, have=0, messages=[_result(1)]),
        ],
        roster="",
    )
    req = parse_relay_request(body)
    assert [e.id for e in req.entries] == [14]
    assert [(e.id, e.status) for e in req.errors] == [(12, 400), (13, 400)]
    assert "sequence numbers must increase" in req.errors[0].error


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([], "JSON object"),
        ({"computers": {}}, "'computers' must be a list"),
        ({"computers": [{"ack": 0}]}, "'id'"),
        ({"computers": [{"id": 0}]}, "'id'"),
        ({"computers": [{"id": 1}, {"id": 1}]}, "appears twice"),
        ({"wait": math.inf}, "finite"),
        ({"wait": 301}, "'wait'"),
        ({"resync": 1}, "'resync'"),
        ({"roster": "x" * 65}, "'roster'"),
        ({"stats": {"a": "b"}}, "number"),
        (
            {"computers": [{"id": i} for i in range(1, MAX_RELAY_COMPUTERS + 2)]},
            "the limit",
        ),
    ],
)
def test_a_request_bad_as_a_whole_is_refused(body: object, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        parse_relay_request(body)


def test_a_reply_parses() -> None:
    reply = parse_relay_reply(
        {
            "computers": [{"id": 3, "ack": 4, "messages": [{"seq": 1, "type": "cancel"}]}],
            "errors": [{"id": 9, "status": 403, "error": "not this relay's computer"}],
            "roster": {
                "version": "r2",
                "computers": [roster_entry(3, 1, "a" * 64, "b" * 64, 50124)],
            },
            "server_time": 10.0,
            "settings": {"poll_interval": 1800},
            "relay_settings": {"poll_interval": 60},
            "more": True,
        }
    )
    assert reply.computers[0].ack == 4 and reply.computers[0].messages[0]["seq"] == 1
    assert reply.errors[0].status == 403
    assert reply.roster is not None and reply.roster.computers[0].tickle_port == 50124
    assert reply.more and reply.relay_settings == {"poll_interval": 60}


@pytest.mark.parametrize(
    "bad",
    [
        {"computers": [{"id": 3, "messages": [{"type": "cancel"}]}]},
        {"errors": [{"id": 3, "status": 200}]},
        {"roster": {"version": "v", "computers": [roster_entry(3, 1, "A" * 64, "b" * 64, None)]}},
        {"roster": {"version": "v", "computers": [roster_entry(3, 1, "a" * 64, "b" * 64, 0)]}},
        {"server_time": math.nan},
    ],
)
def test_a_bad_reply_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        parse_relay_reply(bad)


def test_the_servers_reply_body_parses_back_with_its_messages_verbatim() -> None:
    stored = '{"seq":1,"type":"cancel","op":5,"note":"caf\u00e9 \u2603"}'
    body = relay_reply_body(
        [ComputerOut(3, 4, [stored], more=True), ComputerOut(4, 0, [])],
        [EntryError(9, 403, "computer 9 is not behind this relay")],
        roster_body("v2", [roster_entry(3, 1, "a" * 64, "b" * 64, None)]),
        server_time=12.5,
        settings_json=b'{"poll_interval":1800}',
        relay_settings_json=b'{"poll_interval":60}',
        more=True,
    )
    reply = parse_relay_reply(json.loads(body))
    assert [(c.id, c.ack, c.more) for c in reply.computers] == [(3, 4, True), (4, 0, False)]
    assert reply.computers[0].messages == [json.loads(stored)]
    assert stored.encode() in body  # spliced, not re-encoded
    assert reply.errors == [EntryError(9, 403, "computer 9 is not behind this relay")]
    assert reply.roster is not None and reply.roster.version == "v2"
    assert reply.server_time == 12.5 and reply.settings == {"poll_interval": 1800}
    assert reply.relay_settings == {"poll_interval": 60} and reply.more
    empty = parse_relay_reply(
        json.loads(
            relay_reply_body(
                [],
                [],
                None,
                server_time=1.0,
                settings_json=b"{}",
                relay_settings_json=b"{}",
                more=False,
            )
        )
    )
    assert empty.computers == [] and empty.roster is None and not empty.more
