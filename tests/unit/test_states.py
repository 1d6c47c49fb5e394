"""The state table of SPEC 2.1, checked cell by cell, and the transition function."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskfleet.domain.states import (
    CLIENT_TRANSITIONS,
    FINAL_STATES,
    INITIAL_STATES,
    SERVER_TRANSITIONS,
    ActivityKind,
    Cause,
    IllegalTransition,
    State,
    creation,
    may_transition,
    transition,
)

Q, S, W, B = State.QUEUED, State.SCHEDULED, State.WAITING, State.BLOCKED
IP, F, OK, C = State.IN_PROGRESS, State.FAILED, State.SUCCEEDED, State.CANCELED

# Copied by hand from SPEC.md 2.1, independent of the implementation's table.
SPEC_CLIENT = {
    Q: {IP, C, B},
    S: {IP, C},
    W: {Q, IP, C},
    B: {Q, C, W},
    IP: {F, OK, C},
    F: set(),
    OK: set(),
    C: set(),
}
SPEC_SERVER = {**SPEC_CLIENT, S: {Q, IP, C}}


@pytest.mark.parametrize(
    ("kind", "spec"), [(ActivityKind.CLIENT, SPEC_CLIENT), (ActivityKind.SERVER, SPEC_SERVER)]
)
def test_every_cell_of_the_table_matches_the_spec(kind, spec):
    for current, target in itertools.product(State, State):
        assert may_transition(kind, current, target) == (target in spec[current]), (
            kind,
            current,
            target,
        )


def test_tables_cover_every_state():
    assert set(CLIENT_TRANSITIONS) == set(State) == set(SERVER_TRANSITIONS)


def test_initial_and_final_states_are_as_specified():
    assert {Q, S, W, B} == INITIAL_STATES
    assert {F, OK, C} == FINAL_STATES
    for final in FINAL_STATES:
        assert not CLIENT_TRANSITIONS[final] and not SERVER_TRANSITIONS[final]


def test_scheduled_client_work_cannot_be_queued_but_server_work_can():
    assert not may_transition(ActivityKind.CLIENT, S, Q)
    assert may_transition(ActivityKind.SERVER, S, Q)


def test_transition_records_cause_actor_time_and_reason():
    t = transition(
        ActivityKind.CLIENT, Q, IP, cause=Cause.DELIVERED, actor="server", at=12.5, reason="r"
    )
    assert (t.from_state, t.to_state, t.cause, t.actor, t.at, t.reason) == (
        Q,
        IP,
        Cause.DELIVERED,
        "server",
        12.5,
        "r",
    )


def test_illegal_transition_names_both_states_and_what_is_allowed():
    with pytest.raises(IllegalTransition) as exc:
        transition(ActivityKind.CLIENT, OK, C, cause=Cause.ADMIN, actor="token:1", at=0)
    assert "Succeeded -> Canceled" in str(exc.value)
    assert "nothing (final)" in str(exc.value)


def test_creation_only_in_initial_states():
    assert creation(Q, actor="a", at=1).from_state is None
    for state in set(State) - INITIAL_STATES:
        with pytest.raises(ValueError):
            creation(state, actor="a", at=1)


@given(
    kind=st.sampled_from(ActivityKind),
    start=st.sampled_from(sorted(INITIAL_STATES)),
    steps=st.lists(st.sampled_from(State), max_size=20),
)
def test_random_walks_only_ever_take_table_edges(kind, start, steps):
    table = SPEC_CLIENT if kind is ActivityKind.CLIENT else SPEC_SERVER
    state = start
    for target in steps:
        try:
            t = transition(kind, state, target, cause=Cause.SYSTEM, actor="x", at=0)
        except IllegalTransition:
            assert target not in table[state]
            continue
        assert target in table[state]
        assert t.from_state == state
        state = target
