"""An agent behind a relay (domain/peers.py): what it sends each peer, what it prunes,
when it fails over to the server and when it returns, when it moves behind the relay
the server assigned it to; and the replies as the agent parses them (``server_ack``,
``relay``)."""

from __future__ import annotations

import json

import pytest

from taskfleet.domain.peers import Failover, Peer, PeerAcks, Switch, reassigned
from taskfleet.protocol.exchange import ProtocolError, parse_server_reply, relay_field
from taskfleet.settings import INT64_MAX, RELAY_URL_MAX

# -- acks across two peers ------------------------------------------------------------


def test_a_relay_ack_is_not_a_server_ack() -> None:
    acks = PeerAcks()
    # The relay holds 1..5, the server has acknowledged 2: prune up to 2 only.
    assert acks.replied(Peer.RELAY, 5, 2) == 2
    assert acks.send_above(Peer.RELAY) == 5  # the relay gets only what it lacks
    assert acks.send_above(Peer.SERVER) == 2  # after a switch: everything above 2


def test_a_relay_reply_without_server_ack_prunes_nothing() -> None:
    acks = PeerAcks()
    assert acks.replied(Peer.RELAY, 9, None) == 0
    assert acks.send_above(Peer.SERVER) == 0


def test_a_direct_ack_is_the_server_s_and_the_relay_then_gets_only_what_is_above_it() -> None:
    acks = PeerAcks()
    acks.replied(Peer.RELAY, 4, 1)
    assert acks.replied(Peer.SERVER, 10, None) == 10  # failed over: the server has 1..10
    assert acks.send_above(Peer.RELAY) == 10  # back: the relay never needs 5..10
    # The relay still reports what the server acked through it (less): nothing moves back.
    assert acks.replied(Peer.RELAY, 4, 1) == 10
    assert acks.send_above(Peer.RELAY) == 10


def test_a_relay_that_lost_its_spool_gets_the_messages_again() -> None:
    acks = PeerAcks()
    acks.replied(Peer.RELAY, 8, 3)
    acks.replied(Peer.RELAY, 3, 3)  # a new spool: it holds only what the server has
    assert acks.send_above(Peer.RELAY) == 3


def test_the_server_ack_never_goes_back() -> None:
    acks = PeerAcks()
    acks.replied(Peer.SERVER, 7, None)
    assert acks.replied(Peer.SERVER, 5, None) == 7


# -- failover -----------------------------------------------------------------------


def test_the_relay_is_used_until_it_has_failed_for_the_failover_time() -> None:
    f = Failover(failover_after=120, probe_every=60)
    assert f.choose(0) == (Peer.RELAY, None)
    assert f.wait_limit(0) is None
    assert f.failed(Peer.RELAY, 10) is False
    assert f.wait_limit(20) == 110  # the loop is back by the failover time
    assert f.failed(Peer.RELAY, 100) is False
    assert f.choose(129) == (Peer.RELAY, None)
    assert f.choose(130) == (Peer.SERVER, Switch.FAILED_OVER)
    assert f.choose(131) == (Peer.SERVER, None)  # said once
    assert f.direct


def test_an_answer_in_between_starts_the_failover_time_again() -> None:
    f = Failover(failover_after=120, probe_every=60)
    f.failed(Peer.RELAY, 0)
    assert f.answered(Peer.RELAY) is None
    f.failed(Peer.RELAY, 100)
    assert f.choose(150) == (Peer.RELAY, None)
    assert f.failed(Peer.RELAY, 220) is True  # due now: go on at once
    assert f.choose(220) == (Peer.SERVER, Switch.FAILED_OVER)


def test_server_failures_never_move_the_agent() -> None:
    f = Failover(failover_after=0, probe_every=60)
    assert f.failed(Peer.SERVER, 0) is False
    assert f.choose(1000) == (Peer.RELAY, None)
    assert f.answered(Peer.SERVER) is None


def test_while_direct_the_relay_is_probed_and_taken_back_when_it_answers() -> None:
    f = Failover(failover_after=10, probe_every=60)
    f.failed(Peer.RELAY, 0)
    assert f.choose(10) == (Peer.SERVER, Switch.FAILED_OVER)
    assert f.wait_limit(30) == 40
    assert f.choose(69) == (Peer.SERVER, None)
    assert f.choose(70) == (Peer.RELAY, None)  # a probe
    assert f.failed(Peer.RELAY, 70) is True  # it failed: the server at once meanwhile
    assert f.choose(71) == (Peer.SERVER, None)
    assert f.choose(130) == (Peer.RELAY, None)
    assert f.answered(Peer.RELAY) is Switch.RETURNED
    assert not f.direct and f.choose(131) == (Peer.RELAY, None)
    # A later outage needs the whole failover time again.
    f.failed(Peer.RELAY, 200)
    assert f.choose(205) == (Peer.RELAY, None)


# -- the relay's reply as the agent parses it ----------------------------------------


def test_a_relay_reply_carries_the_server_ack() -> None:
    reply = parse_server_reply({"ack": 5, "server_ack": 2, "messages": []})
    assert (reply.ack, reply.server_ack) == (5, 2)
    assert parse_server_reply({"ack": 5}).server_ack is None  # the server's own reply


@pytest.mark.parametrize(
    ("server_ack", "why"),
    [
        (-1, "'server_ack' must be an integer"),
        ("2", "'server_ack' must be an integer"),
        (2.0, "'server_ack' must be an integer"),
        (True, "'server_ack' must be an integer"),
        (INT64_MAX + 1, "the limit is"),
        (6, "'server_ack' 6 is above 'ack' 5"),
    ],
)
def test_a_bad_server_ack_refuses_the_whole_reply(server_ack: object, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        parse_server_reply({"ack": 5, "server_ack": server_ack})


# -- the relay the server assigned ---------------------------------------------------

A = "http://relay-a.example:8471"
B = "https://relay-b.example:8471"


def test_a_server_reply_naming_another_relay_moves_the_agent_behind_it() -> None:
    assert reassigned(Peer.SERVER, A, B) == B
    assert reassigned(Peer.SERVER, None, B) == B  # no --relay: an admin assigned it


@pytest.mark.parametrize(
    ("peer", "current", "told"),
    [
        (Peer.SERVER, A, None),  # no assignment (or a relay without a URL): stay
        (Peer.SERVER, None, None),
        (Peer.SERVER, A, A),  # already behind it (failed over from it): stay, probe it
        (Peer.SERVER, A, "HTTP://Relay-A.example:8471/"),  # the same relay, spelled otherwise
        (Peer.RELAY, A, B),  # a relay never names another relay
    ],
)
def test_the_agent_stays_unless_the_server_names_another_relay(
    peer: Peer, current: str | None, told: str | None
) -> None:
    assert reassigned(peer, current, told) is None


def test_the_new_relay_gets_everything_the_server_has_not_acknowledged() -> None:
    acks = PeerAcks()
    acks.replied(Peer.RELAY, 7, 3)  # the old relay held up to 7
    acks.moved()
    assert acks.send_above(Peer.RELAY) == 3


def test_a_server_reply_names_the_assigned_relay() -> None:
    for url in (A, B, "http://[::1]:8471", "http://10.0.0.7", "http://r:1/prefix"):
        raw = b'{"ack":0,"messages":[],"settings":{}%s}' % relay_field(url)
        assert parse_server_reply(json.loads(raw)).relay == url
    assert relay_field(None) == relay_field("") == b""
    assert parse_server_reply({"ack": 0}).relay is None
    assert parse_server_reply({"ack": 0, "relay": None}).relay is None


@pytest.mark.parametrize(
    ("relay", "why"),
    [
        (7, "'relay' must be a string"),
        (["http://r"], "'relay' must be a string"),
        ("http://r/" + "x" * RELAY_URL_MAX, f"at most {RELAY_URL_MAX} characters"),
        ("", "is not an http"),
        ("relay-b:8471", "is not an http"),
        ("ftp://relay-b", "is not an http"),
        ("http://", "is not an http"),
        ("http://relay-b:99999", "is not an http"),
        ("http://relay-b:0", "is not an http"),
        ("http://relay-b:port", "is not an http"),
        ("http://[::1", "is not an http"),
    ],
)
def test_a_bad_relay_refuses_the_whole_reply(relay: object, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        parse_server_reply({"ack": 5, "relay": relay})


def test_a_relay_that_released_the_computer_is_left_at_once_and_probed_later() -> None:
    f = Failover(failover_after=120, probe_every=60)
    assert f.choose(0.0) == (Peer.RELAY, None)
    f.released(5.0)
    assert f.choose(5.0) == (Peer.SERVER, None)  # at once, not after 120 s
    assert f.wait_limit(5.0) == 60.0
    assert f.choose(65.0) == (Peer.RELAY, None)  # a probe, as after any failover
