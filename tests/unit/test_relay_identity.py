"""The relay's lineage of its agents' identity nonces (relay/spool.py ``check_identity``,
docs/relays.md "Copies behind a relay"): offers are kept durably (hashes only), two
copies are caught and reported until a roster shows the server's flag, a reset on the
server (the flag cleared) starts afresh, a restart keeps it all, and a computer that
leaves the relay or is re-enrolled starts a new lineage."""

from __future__ import annotations

from pathlib import Path

from taskfleet.protocol.relay import Roster, RosterEntry, relay_entry
from taskfleet.relay.spool import Spool
from tests.unit.test_relay_spool import KEY, _hash, _reply, _spool

ROTATE = 0.0  # an offer at every exchange
GRACE = 5.0


def _check(spool: Spool, cid: int, nonce: str | None, now: float) -> tuple[str | None, str | None]:
    return spool.check_identity(cid, nonce, now, rotate=ROTATE, grace=GRACE)


def _roster(version: str, *entries: tuple[int, int, bool]) -> Roster:
    return Roster(
        version,
        [
            RosterEntry(cid, gen, _hash(f"secret-{cid}"), KEY, 50124, flagged)
            for cid, gen, flagged in entries
        ],
    )


def _agent(spool: Spool, cid: int, nonce: str | None, now: float) -> str | None:
    """One exchange of a well-behaved agent: accepted, it keeps the offer."""
    refused, offer = _check(spool, cid, nonce, now)
    assert refused is None
    return offer or nonce


def test_one_agent_rotates_on_and_its_state_survives_a_restart(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7)
    nonce = _agent(spool, 7, None, 100.0)  # a lineage opens: the first offer
    assert nonce is not None
    for i in range(5):
        nonce = _agent(spool, 7, nonce, 101.0 + i)
    raw = spool.db.execute("SELECT state FROM identity WHERE computer=7").fetchone()[0]
    assert nonce not in raw  # hashes only
    spool.close()
    again = Spool(tmp_path / "relay")
    assert _agent(again, 7, nonce, 110.0) is not None
    assert again.computers[7].identity_report is None


def test_two_copies_are_refused_and_reported_until_the_server_flags_it(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7)
    shared = _agent(spool, 7, None, 100.0)
    a = b = shared
    refused = None
    for i in range(6):  # in lockstep
        a = _agent(spool, 7, a, 101.0 + 2 * i)
        refused, offer = _check(spool, 7, b, 102.0 + 2 * i)
        if refused is not None:
            break
        b = offer or b
    assert refused is not None and "two agents" in refused
    c = spool.computers[7]
    assert c.identity_report is not None and c.has_news
    entry = relay_entry(7, ack=0, have=0, messages=[], conflict=c.identity_report)
    assert "two agents" in entry["conflict"]
    # Both are refused now, the one that had it right too.
    assert _check(spool, 7, a, 120.0)[0] is not None
    # A roster built before the report arrived (not flagged) clears nothing.
    spool.apply(_reply(roster=_roster("v1", (7, 1, False))), {})
    assert _check(spool, 7, a, 121.0)[0] is not None and c.identity_report is not None
    # The server flags it: the relay stops reporting, keeps refusing; after a restart too.
    spool.apply(_reply(roster=_roster("v2", (7, 1, True))), {})
    assert c.identity_report is None and _check(spool, 7, a, 122.0)[0] is not None
    spool.close()
    spool = Spool(tmp_path / "relay")
    assert _check(spool, 7, a, 123.0)[0] is not None
    assert spool.computers[7].identity_report is None
    # An administrator's reset: the flag cleared, a new lineage for the copy left.
    spool.apply(_reply(roster=_roster("v3", (7, 1, False))), {})
    nonce = _agent(spool, 7, a, 124.0)
    for i in range(3):
        nonce = _agent(spool, 7, nonce, 125.0 + i)
    assert spool.computers[7].identity_report is None


def test_a_flag_raised_by_the_server_is_refused_at_the_relay(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7)
    nonce = _agent(spool, 7, None, 100.0)
    spool.apply(_reply(roster=_roster("v1", (7, 1, True))), {})
    refused, offer = _check(spool, 7, nonce, 101.0)
    assert refused is not None and offer is None
    assert spool.computers[7].identity_report is None  # nothing to report: the server knows


def test_a_computer_that_leaves_or_is_re_enrolled_starts_a_new_lineage(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7, 8)
    seven = _agent(spool, 7, None, 100.0)
    seven = _agent(spool, 7, seven, 101.0)
    eight = _agent(spool, 8, None, 100.0)
    eight = _agent(spool, 8, eight, 101.0)
    # 7 leaves (moved to another relay, where its agent gets other nonces), 8 is enrolled
    # again (a new generation: a new agent).
    spool.apply(_reply(roster=_roster("v1", (8, 2, False))), {})
    spool.apply(_reply(roster=_roster("v2", (7, 1, False), (8, 2, False))), {})
    seven = _agent(spool, 7, "1" * 32, 102.0)  # whatever it presents: the lineage opens
    eight = _agent(spool, 8, "2" * 32, 102.0)
    for cid, nonce in ((7, seven), (8, eight)):
        nonce = _agent(spool, cid, nonce, 103.0)
        # Once the new lineage runs, a nonce it never issued is caught.
        assert _check(spool, cid, "4" * 32, 104.0)[0] is not None
