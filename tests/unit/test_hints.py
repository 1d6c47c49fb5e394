"""Hints between server processes (server/hints.py): ids split under NOTIFY's payload
limit and parsed back; the fleet tells ``on_work`` unless the ids came from a hint."""

from __future__ import annotations

import asyncio

from taskfleet.server.fleet import ComputerState, Fleet
from taskfleet.server.hints import ALL, parse_ids, split_ids


def test_ids_are_split_under_the_payload_limit_and_parsed_back() -> None:
    ids = list(range(1, 5000))
    bodies = split_ids(reversed(ids), limit=100)
    assert all(len(b) <= 100 for b in bodies) and len(bodies) > 1
    assert [i for b in bodies for i in (parse_ids(b) or [])] == ids
    assert split_ids([]) == []
    assert parse_ids(ALL) is None
    assert parse_ids("3,x,,4") == [3, 4]


def test_marked_work_is_told_to_the_other_processes_unless_it_came_from_them() -> None:
    fleet = Fleet()
    told: list[list[int]] = []
    fleet.on_work = told.append
    cs = ComputerState(1, 1, "00" * 32, 1)
    fleet.put(cs)
    cs.has_work = False
    assert fleet.mark_work(iter([1, 2])) == [cs] and cs.has_work
    assert told == [[1, 2]]  # 2 is not known here: another process may know it
    cs.has_work = False
    fleet.mark_work([1], hint=False)
    assert cs.has_work and told == [[1, 2]]


def test_the_catch_up_makes_every_computer_look_once_and_ends_long_polls() -> None:
    fleet = Fleet()
    cs = ComputerState(1, 1, "00" * 32, 1)
    fleet.put(cs)
    cs.has_work = False
    cs.waiter = asyncio.Event()
    fleet.look_all()
    assert cs.has_work and cs.waiter.is_set()
