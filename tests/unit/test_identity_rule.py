"""The rotating identity nonce (domain/identity.py): lost replies, crashes before the
nonce is kept, late requests and lockstep clones, each walked through to its end."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskfleet.domain.identity import (
    OPEN,
    Nonces,
    Verdict,
    decide,
    hash_nonce,
    reset,
    with_offer,
)

GRACE = 120.0


class Server:
    """The rule applied as ``server/identity.py`` applies it (without the database)."""

    def __init__(self, rotate: float = 0.0) -> None:
        self.rotate = rotate
        self.now = 1000.0
        self.count = itertools.count(1)
        first = self.fresh()
        self.state = Nonces(offered=hash_nonce(first), offered_at=self.now)
        self.first = first

    def fresh(self) -> str:
        return f"{next(self.count):032x}"

    def exchange(self, presented: str | None) -> tuple[Verdict, str | None]:
        h = None if presented is None else hash_nonce(presented)
        d = decide(self.state, h, self.now, rotate=self.rotate, grace=GRACE)
        self.state, offer = d.state, None
        if d.offer:
            offer = self.fresh()
            self.state = with_offer(self.state, hash_nonce(offer), self.now)
        return d.verdict, offer


class Agent:
    def __init__(self, nonce: str | None) -> None:
        self.nonce = nonce

    def exchange(self, server: Server, *, lose_reply: bool = False) -> Verdict:
        verdict, offer = server.exchange(self.nonce)
        if offer is not None and not lose_reply:
            self.nonce = offer
        return verdict


def test_one_agent_rotates_and_is_never_flagged() -> None:
    s = Server()
    a = Agent(s.first)
    seen = set()
    for _ in range(20):
        assert a.exchange(s) is Verdict.ACCEPT
        seen.add(a.nonce)
        s.now += 1
    assert len(seen) == 20  # a new nonce at every exchange (rotate 0)


@pytest.mark.parametrize("lost_in_a_row", [1, 2, 5])
def test_lost_replies_are_not_a_clone(lost_in_a_row: int) -> None:
    """A reply carrying an offer is lost (or the agent crashed before keeping it): the
    agent presents the nonce it has; after the grace a fresh offer supersedes the lost
    one and the agent goes on. Never flagged, always served."""
    s = Server()
    a = Agent(s.first)
    a.exchange(s)
    for _ in range(lost_in_a_row):
        before = a.nonce
        assert a.exchange(s, lose_reply=True) is Verdict.ACCEPT
        assert a.nonce == before
        s.now += 10
        assert a.exchange(s, lose_reply=True) is Verdict.ACCEPT  # within grace: no offer
        s.now += GRACE
    for _ in range(5):
        assert a.exchange(s) is Verdict.ACCEPT
        s.now += 1
    assert s.state.conflict_at is None


def test_a_late_request_of_the_agent_is_not_a_clone() -> None:
    """A request sent before the agent presented its new nonce, arriving after it:
    accepted within the grace, changing nothing; later it is what a copy would send."""
    s = Server()
    a = Agent(s.first)
    a.exchange(s)
    late = a.nonce
    a.exchange(s)  # confirms ``late``'s successor: ``late`` is the previous one
    state = s.state
    assert s.exchange(late) == (Verdict.ACCEPT, None)
    assert s.state == state
    assert a.exchange(s) is Verdict.ACCEPT
    s.now += GRACE
    assert s.exchange(late)[0] is Verdict.CONFLICT  # two rotations back, and late


def test_a_late_request_does_not_supersede_the_offer_the_agent_keeps() -> None:
    s = Server()
    a = Agent(s.first)
    a.exchange(s)
    a.exchange(s)
    before = s.state.confirmed
    late = a.nonce
    assert s.state.offered == hash_nonce(late)
    s.now += 10
    # ``a`` sent one presenting the confirmed nonce, delayed: no new offer, ``a``'s kept.
    state = s.state
    d = decide(state, before, s.now, rotate=0, grace=GRACE)
    assert d.verdict is Verdict.ACCEPT and not d.offer and not d.changed
    assert a.exchange(s) is Verdict.ACCEPT


def test_lockstep_clones_are_caught_and_stay_refused() -> None:
    s = Server()
    a = Agent(s.first)
    a.exchange(s)
    b = Agent(a.nonce)  # the state folder copied
    verdicts = []
    for _ in range(4):
        s.now += 1
        verdicts.append(a.exchange(s))
        s.now += 1
        verdicts.append(b.exchange(s))
    # The copy left behind holds the confirmed nonce, then the previous one, then one
    # that is neither: caught at its third exchange.
    assert verdicts[:6] == [Verdict.ACCEPT] * 5 + [Verdict.CONFLICT]
    assert s.state.conflict_at is not None and "two agents" in (s.state.conflict_reason or "")
    # Both refused from then on, whatever they present, until an administrator decides.
    for agent in (a, b):
        assert agent.exchange(s) is Verdict.CONFLICT


def test_clones_with_slow_rotation_are_caught_after_the_grace() -> None:
    s = Server(rotate=60)
    a = Agent(s.first)
    a.exchange(s)
    b = Agent(a.nonce)
    for _ in range(20):
        s.now += 15
        a.exchange(s)
        s.now += 15
        if b.exchange(s) is Verdict.CONFLICT:
            break
    assert s.state.conflict_at is not None
    assert s.now < 1000 + 60 + 2 * GRACE + 60


def test_a_superseded_offer_presented_is_a_conflict() -> None:
    s = Server()
    a = Agent(s.first)
    a.exchange(s)
    b = Agent(a.nonce)
    a.exchange(s)  # a holds an offer
    s.now += GRACE  # b presents the confirmed one after the grace: a fresh offer for b
    assert b.exchange(s) is Verdict.ACCEPT
    assert a.exchange(s) is Verdict.CONFLICT
    assert "superseded" in (s.state.conflict_reason or "")


def test_no_nonce_once_one_is_confirmed_is_a_conflict() -> None:
    s = Server()
    a = Agent(s.first)
    a.exchange(s)
    assert Agent(None).exchange(s) is Verdict.CONFLICT


def test_an_agent_without_nonces_keeps_working() -> None:
    """Enrolled before nonces (nothing stored), or an agent that never takes an offer."""
    s = Server()
    s.state = Nonces()
    old = Agent(None)
    offers = []
    for _ in range(5):
        before = s.state.offered
        assert old.exchange(s, lose_reply=True) is Verdict.ACCEPT
        offers.append(s.state.offered != before)
        s.now += GRACE
    assert offers == [True, False, False, False, False]  # not a write per grace for it
    s.now += 86400
    new = Agent(None)  # an upgraded agent: takes the next offer and starts its lineage
    new.exchange(s)
    assert new.nonce is not None
    new.exchange(s)
    assert s.state.confirmed is not None  # its lineage began: no nonce is now a copy
    assert new.exchange(s) is Verdict.ACCEPT
    assert old.exchange(s) is Verdict.CONFLICT


def test_reset_starts_a_new_lineage_and_a_clone_is_caught_again() -> None:
    s = Server()
    a = Agent(s.first)
    a.exchange(s)
    b = Agent(a.nonce)
    for agent in (a, b, a, b, a, b):
        agent.exchange(s)
    assert s.state.conflict_at is not None
    s.state = reset(s.now)
    assert s.state.confirmed == OPEN
    a.exchange(s)  # whatever it holds: accepted, an offer
    for _ in range(3):
        assert a.exchange(s) is Verdict.ACCEPT  # alone: carries on
    assert s.state.conflict_at is None
    s.state = reset(s.now)
    for agent in (a, b, a, b, a, b, a, b):  # the clone still runs: caught again
        agent.exchange(s)
    assert s.state.conflict_at is not None


@settings(max_examples=200, derandomize=True)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 300)), max_size=40))
def test_one_agent_is_never_flagged_whatever_is_lost(steps: list[tuple[bool, float]]) -> None:
    """Any sequence of lost replies and pauses: a single agent is never refused."""
    s = Server(rotate=30)
    a = Agent(s.first)
    for lose, pause in steps:
        assert a.exchange(s, lose_reply=lose) is Verdict.ACCEPT
        s.now += pause


@pytest.mark.parametrize("seed", range(20))
def test_two_copies_exchanging_at_random_are_caught(seed: int) -> None:
    rng = random.Random(seed)
    s = Server()
    a = Agent(s.first)
    a.exchange(s)
    b = Agent(a.nonce)
    for _ in range(40):
        rng.choice((a, b)).exchange(s)
        s.now += rng.uniform(0, 5)
    # Both exchanged at least twice in any of these 40 draws: they cannot both go on.
    assert s.state.conflict_at is not None
