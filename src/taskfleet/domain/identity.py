"""Identities that cannot be cloned: the rule of a computer's rotating identity nonce.

Contract (pure: no I/O, no clock, no randomness; ``server/identity.py`` stores and
applies it, docs/reliability.md "Identities that cannot be cloned" explains it):

A computer's secret says *who* it is; the nonce says *which copy* it is. The server
keeps, per computer, the ``confirmed`` nonce (the one its agent last proved it
holds), the ``previous`` confirmed one, and at most one outstanding ``offered``
nonce (sent in a reply, not yet presented back). Values are hashes of the nonces
(``hash_nonce``). ``decide`` takes that state, the nonce an exchange presents and
the time, and returns what to answer and the new state:

* presented == offered: it is the copy the offer reached: confirmed := offered.
* presented == confirmed with no offer outstanding: accepted.
* presented == confirmed with an offer outstanding: the reply carrying the offer
  was lost (or the agent crashed before keeping it), or another copy is speaking.
  Accepted; once the offer is ``grace`` old it is superseded by a fresh one (a
  copy that kept the superseded one can never present it again without being
  caught). Within ``grace`` no fresh offer is made: a request delayed on its way
  (sent before the agent got the offer) must not supersede the offer the agent
  keeps, or the agent itself would be flagged.
* presented == previous, within ``grace`` of the confirmation: a request of the
  agent's sent before it presented the new nonce, arriving late: accepted, nothing
  changes.
* anything else (a superseded offer, an older nonce, one never issued, none while
  one is confirmed): two holders of this identity. ``CONFLICT``: the computer is
  flagged and every exchange of it is refused until an administrator decides.

A fresh offer is made when none is outstanding and the confirmed nonce is
``rotate`` seconds old (0: at every exchange). Only one copy can present each
offer; the other is left holding a nonce that falls out of the window (confirmed,
then previous, then neither) as the first rotates on: two copies exchanging in
lockstep are caught within three exchanges of each once rotations are due, a
copy that stays behind at the latest ``grace`` after the other's confirmation.

``confirmed`` None is the lineage of an agent that never held a nonce (enrolled
before this rule, or an agent that does not speak it): presenting none is
accepted, offers are made (a new agent takes them and starts its lineage; one
that does not is offered again only after ``legacy``).
``confirmed`` ``OPEN`` is the state an administrator's reset leaves: the next
nonce presented is accepted, whatever it is, and the next offer confirmed starts
a new lineage.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, replace
from enum import Enum

OPEN = "*"  # confirmed after an administrator's reset: any nonce starts a new lineage
SUPERSEDED_KEPT = 8  # superseded offers remembered (only to say why a conflict is one)
LEGACY_REOFFER = 86400.0  # an offer an agent presenting no nonce never took: replaced daily


def hash_nonce(nonce: str) -> str:
    """The stored form of a nonce (128 random bits: a plain SHA-256 is enough)."""
    return hashlib.sha256(nonce.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Nonces:
    """A computer's identity state (hashes of nonces; times in seconds)."""

    confirmed: str | None = None
    confirmed_at: float | None = None
    previous: str | None = None
    offered: str | None = None
    offered_at: float | None = None
    superseded: tuple[str, ...] = ()
    conflict_at: float | None = None
    conflict_reason: str | None = None


class Verdict(Enum):
    ACCEPT = "accept"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    state: Nonces
    offer: bool = False  # make a fresh offer (the caller draws it: ``with_offer``)
    changed: bool = False  # ``state`` differs from the one given (store it)
    reason: str = ""  # why a conflict is one


def _same(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return hmac.compare_digest(a, b)


def decide(
    state: Nonces,
    presented: str | None,
    now: float,
    *,
    rotate: float,
    grace: float,
    legacy: float = LEGACY_REOFFER,
) -> Decision:
    """What to do with an exchange presenting the nonce whose hash is ``presented``
    (None: it presents none). An offer to an agent presenting none is replaced only
    when ``legacy`` old: an agent that does not speak nonces never takes it, and a
    write per ``grace`` for each would be wasted."""
    if state.conflict_at is not None:
        return Decision(Verdict.CONFLICT, state, reason=state.conflict_reason or "")
    if state.offered is not None and presented is not None and _same(presented, state.offered):
        confirmed = replace(
            state,
            confirmed=state.offered,
            confirmed_at=now,
            previous=state.confirmed,
            offered=None,
            offered_at=None,
        )
        return Decision(Verdict.ACCEPT, confirmed, offer=rotate <= 0, changed=True)
    if state.confirmed == OPEN:
        # After a reset: this copy starts the new lineage (the first offer it confirms).
        fresh = state.offered is None or _old(state.offered_at, now, grace)
        return _accept(state, now, offer=fresh, supersede=state.offered is not None and fresh)
    if _same(presented, state.confirmed):
        if state.offered is not None:
            late = _old(state.offered_at, now, grace if presented is not None else legacy)
            return _accept(state, now, offer=late, supersede=late)
        return _accept(state, now, offer=_old(state.confirmed_at, now, rotate))
    if (
        presented is not None
        and state.previous is not None
        and _same(presented, state.previous)
        and not _old(state.confirmed_at, now, grace)
    ):
        return Decision(Verdict.ACCEPT, state)  # a request of the agent's that arrived late
    if presented is not None and any(_same(presented, s) for s in state.superseded):
        reason = "it presented an identity nonce that was superseded: another copy holds it"
    elif presented is None:
        reason = "it presented no identity nonce, but this computer's agent holds one"
    elif state.previous is not None and _same(presented, state.previous):
        reason = "it presented an identity nonce its agent replaced long ago"
    else:
        reason = "it presented an identity nonce that is not this computer's current one"
    reason = "two agents use this computer's identity (a copied state folder?): " + reason
    flagged = replace(state, conflict_at=now, conflict_reason=reason)
    return Decision(Verdict.CONFLICT, flagged, changed=True, reason=reason)


def flag(state: Nonces, reason: str, now: float) -> Nonces:
    """``state`` flagged for ``reason`` (a conflict found elsewhere: by a relay)."""
    return replace(state, conflict_at=now, conflict_reason=reason)


def with_offer(state: Nonces, offered: str, now: float) -> Nonces:
    """``state`` with the fresh offer whose hash is ``offered`` outstanding."""
    return replace(state, offered=offered, offered_at=now)


def reset(now: float) -> Nonces:
    """An administrator's reset: the flag and the nonces cleared; the next exchange
    presenting the computer's secret starts a new lineage."""
    return Nonces(confirmed=OPEN, confirmed_at=now)


def _accept(state: Nonces, now: float, *, offer: bool, supersede: bool = False) -> Decision:
    if not offer:
        return Decision(Verdict.ACCEPT, state)
    if supersede and state.offered is not None:
        kept = (state.offered, *state.superseded)[:SUPERSEDED_KEPT]
        state = replace(state, superseded=kept, offered=None, offered_at=None)
    return Decision(Verdict.ACCEPT, state, offer=True, changed=True)


def _old(at: float | None, now: float, age: float) -> bool:
    return at is None or now - at >= age
