"""The wire parsers fuzzed (issue 15): whatever JSON value arrives, in the places a
message can hold one, each parser returns a message or raises ProtocolError (the one
clear refusal the server and the relay answer 400 with), never anything else. Bytes
too: ``loads_body`` refuses what is not JSON with a ValueError, never a crash.

Two kinds of input: random JSON values built from the protocol's own field names (so
the fuzzer reaches deep into each message kind), and valid messages with one value
replaced at a random place. The tickle datagram is fuzzed in tests/unit/test_tickle.py.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from taskfleet.protocol.exchange import (
    loads_body,
    operation_result,
    operation_status,
    parse_agent_request,
    parse_server_reply,
    refused_message,
)
from taskfleet.protocol.fields import ProtocolError
from taskfleet.protocol.relay import (
    parse_relay_reply,
    parse_relay_request,
    relay_entry,
    relay_request,
)

FIELDS = [
    "ack", "messages", "seq", "type", "op", "status", "result_line", "exit_code",
    "stdout", "stderr", "attempt", "reason", "until", "agent", "info", "hostname",
    "version", "policy", "tickle_port", "started_at", "ended_at", "recurring",
    "stdout_dropped", "stderr_dropped", "phase", "item", "detail", "at", "base",
    "full", "sections", "packages", "computers", "id", "have", "address", "seen",
    "roster", "resync", "wait", "stats", "body", "sig", "settings", "relay", "entries",
    "generation", "secret_hash", "tickle_key", "inventory_full", "server_seq", "text",
]  # fmt: skip
TYPES = [
    "operation-result", "operation-status", "refused", "job-step", "inventory",
    "operation", "cancel", "terminate", "settings",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=20),
    st.sampled_from(TYPES),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=5)), inner, max_size=6),
    ),
    max_leaves=25,
)

PARSERS: list[Callable[[Any], Any]] = [
    parse_agent_request,
    parse_server_reply,
    parse_relay_request,
    parse_relay_reply,
]


def _refused_or_parsed(parse: Callable[[Any], Any], obj: Any) -> None:
    with contextlib.suppress(ProtocolError):  # the clear refusal
        parse(obj)


@settings(max_examples=300)
@given(st.sampled_from(PARSERS), values)
def test_any_json_value_is_parsed_or_refused_with_a_protocol_error(
    parse: Callable[[Any], Any], obj: Any
) -> None:
    _refused_or_parsed(parse, obj)


def _valid_agent_request() -> dict[str, Any]:
    return {
        "ack": 3,
        "messages": [
            {"seq": 1, **operation_result(7, "succeeded", "ok", exit_code=0, stdout="x")},
            {"seq": 2, **operation_status(8, "working", 1, None, "running")},
            {"seq": 3, **refused_message(4, 9, "bad-signature", "no")},
        ],
    }


def _valid_relay_request() -> dict[str, Any]:
    return relay_request(
        [relay_entry(5, ack=2, have=4, messages=_valid_agent_request()["messages"])],
        roster="v1",
    )


def _places(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _places(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _places(v, (*path, i))
    return out


def _replaced(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    out = copy.deepcopy(obj)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


@settings(max_examples=300)
@given(st.data(), st.sampled_from(["agent", "relay"]), values)
def test_a_valid_message_with_one_value_replaced_is_parsed_or_refused(
    data: st.DataObject, kind: str, value: Any
) -> None:
    valid = _valid_agent_request() if kind == "agent" else _valid_relay_request()
    parse = parse_agent_request if kind == "agent" else parse_relay_request
    parse(valid)  # the starting point is valid
    path = data.draw(st.sampled_from(_places(valid)))
    _refused_or_parsed(parse, _replaced(valid, path, value))


@given(st.binary(max_size=200))
def test_any_bytes_are_decoded_or_refused_with_a_value_error(body: bytes) -> None:
    with contextlib.suppress(ValueError):  # orjson's and json's decode errors are ValueErrors
        loads_body(body)
