"""The relay requests the relay builds from its spool (relay/upstream.py ``build``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from taskfleet.protocol.exchange import operation_result
from taskfleet.protocol.relay import ComputerReply, RelayReply, parse_relay_request
from taskfleet.relay import upstream as upstream_module
from taskfleet.relay.spool import RelayIdentity, Spool, encode
from taskfleet.relay.upstream import Upstream, UpstreamConfig


def _spool(tmp_path: Path, n: int) -> Spool:
    spool = Spool(tmp_path / "relay")
    spool.save_identity(RelayIdentity("http://s", 1, "tfr_x", 1, bytes(32), "00" * 32), {})
    for cid in range(1, n + 1):
        spool.enrolled(cid, 1, hashlib.sha256(b"s").hexdigest(), bytes(32), None)
    return spool


def _upstream(spool: Spool) -> Upstream:
    return Upstream(spool, UpstreamConfig("http://s", None, "r", None, 0))


def _message(seq: int, stdout: str = "") -> tuple[int, str]:
    msg = {**operation_result(7, "succeeded", "ok", stdout=stdout), "seq": seq}
    return seq, encode(msg)  # as the relay spools what an agent sent


def test_a_request_carries_each_computer_with_news_and_its_messages_verbatim(
    tmp_path: Path,
) -> None:
    spool = _spool(tmp_path, 3)
    text = "caf\u00e9 \ud800 \x00"  # any text, even an unpaired surrogate and a NUL
    spool.receive(1, ack=0, messages=[_message(1, text)], agent_info=None, address="a", now=1.0)
    spool.receive(2, ack=0, messages=[], agent_info='{"version":"9"}', address="b", now=2.0)
    req = _upstream(spool).build()
    body = json.loads(req.body)
    parsed = parse_relay_request(body)
    assert [e.id for e in parsed.entries] == [1, 2] and req.complete  # 3 has nothing to say
    assert body["resync"] is True  # the first request after a start
    assert body["computers"][0]["messages"][0]["stdout"] == text
    assert parsed.entries[1].request.agent is not None
    assert parsed.entries[1].request.agent.version == "9"
    assert body["stats"]["spool"] == 1 and body["roster"] == ""  # as relay list reads it


def test_a_computer_whose_news_the_server_took_is_left_out(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 1)
    spool.receive(1, ack=0, messages=[_message(1)], agent_info=None, address="a", now=1.0)
    up = _upstream(spool)
    req = up.build()
    spool.apply(RelayReply([ComputerReply(1, 1, [])], [], None, 1.0, {}, {}), req.sent)
    assert json.loads(up.build().body)["computers"] == []


def test_requests_are_split_at_the_computer_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_module, "MAX_RELAY_COMPUTERS", 2)
    spool = _spool(tmp_path, 5)
    for cid in range(1, 6):
        spool.receive(cid, ack=0, messages=[_message(1)], agent_info=None, address="a", now=1.0)
    req = _upstream(spool).build()
    assert len(json.loads(req.body)["computers"]) == 2 and not req.complete


def test_requests_are_split_at_the_byte_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_module, "RELAY_SEND_BUDGET", 10_000)
    spool = _spool(tmp_path, 2)
    big = [_message(s, "x" * 3000) for s in range(1, 6)]
    spool.receive(1, ack=0, messages=big, agent_info=None, address="a", now=1.0)
    spool.receive(2, ack=0, messages=big, agent_info=None, address="a", now=1.0)
    req = _upstream(spool).build()
    body = json.loads(req.body)
    assert len(req.body) < 2 * 10_000 and not req.complete
    assert [len(e["messages"]) for e in body["computers"]] == [3]
