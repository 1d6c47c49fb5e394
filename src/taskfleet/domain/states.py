"""Activity states and the one transition function (SPEC 2.1).

Contract: ``CLIENT_TRANSITIONS`` and ``SERVER_TRANSITIONS`` are the exact state
table of SPEC 2.1. ``transition`` is the only way any code moves an activity:
it checks the table and returns the :class:`Transition` event to record
(cause, actor, time, reason), or raises :class:`IllegalTransition` and nothing
changes. Pure: no I/O, the caller passes the time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ActivityKind(enum.StrEnum):
    CLIENT = "client"  # runs on an agent
    SERVER = "server"  # runs on a worker


class State(enum.StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    WAITING = "waiting"
    BLOCKED = "blocked"
    IN_PROGRESS = "in_progress"
    FAILED = "failed"
    SUCCEEDED = "succeeded"
    CANCELED = "canceled"

    @property
    def label(self) -> str:
        return self.value.replace("_", " ").title()


INITIAL_STATES: frozenset[State] = frozenset(
    {State.QUEUED, State.SCHEDULED, State.WAITING, State.BLOCKED}
)
FINAL_STATES: frozenset[State] = frozenset({State.FAILED, State.SUCCEEDED, State.CANCELED})

_Q, _S, _W, _B = State.QUEUED, State.SCHEDULED, State.WAITING, State.BLOCKED
_IP, _F, _OK, _C = State.IN_PROGRESS, State.FAILED, State.SUCCEEDED, State.CANCELED

# SPEC 2.1, row by row. Client "Canceled: see below" has no outgoing
# transition: the agent's late report is recorded on the activity, the state
# stays Canceled.
CLIENT_TRANSITIONS: dict[State, frozenset[State]] = {
    _Q: frozenset({_IP, _C, _B}),
    _S: frozenset({_IP, _C}),
    _W: frozenset({_Q, _IP, _C}),
    _B: frozenset({_Q, _C, _W}),
    _IP: frozenset({_F, _OK, _C}),
    _F: frozenset(),
    _OK: frozenset(),
    _C: frozenset(),
}
SERVER_TRANSITIONS: dict[State, frozenset[State]] = {
    _Q: frozenset({_IP, _C, _B}),
    _S: frozenset({_Q, _IP, _C}),
    _W: frozenset({_Q, _IP, _C}),
    _B: frozenset({_Q, _C, _W}),
    _IP: frozenset({_F, _OK, _C}),
    _F: frozenset(),
    _OK: frozenset(),
    _C: frozenset(),
}
TABLES: dict[ActivityKind, dict[State, frozenset[State]]] = {
    ActivityKind.CLIENT: CLIENT_TRANSITIONS,
    ActivityKind.SERVER: SERVER_TRANSITIONS,
}


class Cause(enum.StrEnum):
    """What made a transition happen; recorded with every event."""

    CREATED = "created"
    ADMIN = "admin"  # an administrator's request (cancel, approve, ...)
    DELIVERED = "delivered"  # handed to the agent in an exchange
    AGENT_REPORT = "agent-report"  # the agent's operation-result
    AGENT_STATUS = "agent-status"  # a failed attempt to be retried: recorded, no state change
    TIMEOUT = "timeout"  # the server's own deadline (lost)
    REENROLLED = "re-enrolled"  # the computer's identity changed
    SYSTEM = "system"


class IllegalTransition(ValueError):
    """A transition the state table does not allow; nothing was changed."""

    def __init__(self, kind: ActivityKind, current: State, target: State) -> None:
        allowed = ", ".join(sorted(s.label for s in TABLES[kind][current])) or "nothing (final)"
        super().__init__(
            f"illegal transition for a {kind.value} activity: {current.label} -> "
            f"{target.label} (allowed from {current.label}: {allowed})"
        )
        self.kind = kind
        self.current = current
        self.target = target


@dataclass(frozen=True)
class Transition:
    """One recorded state change: the event row of an activity's history."""

    from_state: State | None  # None for the creation event
    to_state: State
    cause: Cause
    actor: str  # who: "token:3", "computer:17", "server"
    at: float  # epoch seconds
    reason: str


def may_transition(kind: ActivityKind, current: State, target: State) -> bool:
    return target in TABLES[kind][current]


def transition(
    kind: ActivityKind,
    current: State,
    target: State,
    *,
    cause: Cause,
    actor: str,
    at: float,
    reason: str = "",
) -> Transition:
    """Check ``current -> target`` against the table and return the event to record."""
    if not may_transition(kind, current, target):
        raise IllegalTransition(kind, current, target)
    return Transition(current, target, cause, actor, at, reason)


def creation(state: State, *, actor: str, at: float, reason: str = "") -> Transition:
    """The first event of an activity: it must start in an initial state."""
    if state not in INITIAL_STATES:
        raise ValueError(f"an activity cannot start in state {state.label}")
    return Transition(None, state, Cause.CREATED, actor, at, reason)
