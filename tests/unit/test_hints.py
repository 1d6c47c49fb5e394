"""Hints between server processes (server/hints.py): ids split under NOTIFY's payload
limit and parsed back; the fleet tells ``on_work`` unless the ids came from a hint, and
``on_reach`` when a computer's wake-ups go elsewhere, unless a hint said so."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from taskfleet.server.fleet import ComputerState, Fleet, RelayState, reach_entry
from taskfleet.server.hints import ALL, parse_entries, parse_ids, split_entries, split_ids


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


def test_entries_are_split_under_the_payload_limit_and_parsed_back() -> None:
    entries = [orjson.dumps([i, "10.0.0.1", 50124]) for i in range(300)]
    bodies = split_entries(entries, limit=200)
    assert all(len(b) <= 200 for b in bodies) and len(bodies) > 1
    assert [e[0] for b in bodies for e in parse_entries(b)] == list(range(300))
    assert split_entries([b"[" + b"1," * 200 + b"1]"], limit=200) == []  # too long alone
    assert parse_entries("not json") == [] and parse_entries('{"a": 1}') == []


def test_a_changed_reach_is_told_once_and_applied_elsewhere_without_telling_again() -> None:
    here, there = Fleet(), Fleet()
    told: list[list[Any]] = []
    here.on_reach = lambda cs: told.append(reach_entry(cs))
    there.on_reach = lambda cs: pytest.fail("a reach heard from a hint is not told again")
    for fleet in (here, there):
        fleet.put(ComputerState(1, 1, "00" * 32, 2, address="10.0.0.1", tickle_port=50124))
    cs = here.computers[1]
    here.reach(cs, "10.0.0.1", 50124, False)  # unchanged: nothing told
    assert told == []
    here.reach(cs, "10.0.0.9", 60000, True)  # behind no relay: not through one
    assert told == [[1, 2, "10.0.0.9", 60000, False]]
    bad = [[1, 2, "x", 70000, False], [1, 2, 5, 1, False], "junk", [1, 2, "y", 1, "no"]]
    there.reached([[1, 1, "stale-generation", 1, False], *bad, *told, [99, 1, "z", 1, False]])
    other = there.computers[1]
    assert (other.address, other.tickle_port, other.via_relay) == ("10.0.0.9", 60000, False)


def test_a_relays_new_address_is_told_and_applied_elsewhere() -> None:
    here, there = Fleet(), Fleet()
    told: list[list[Any]] = []
    here.on_reach = lambda rs: told.append(reach_entry(rs))
    for fleet in (here, there):
        fleet.put_relay(RelayState(4, 1, "r", "00" * 32, 3, address="10.0.0.1", tickle_port=9))
    here.reach_relay(here.relays[4], "10.0.0.1")
    here.reach_relay(here.relays[4], "10.0.0.2")
    assert told == [["relay", 4, 3, "10.0.0.2"]]
    there.reached([["relay", 4, 2, "stale"], ["relay", 4, 3, 7], ["relay", "4", 3, "x"], *told])
    assert there.relays[4].address == "10.0.0.2"


def test_computers_served_here_lately_are_found_by_their_own_or_their_relays_exchange() -> None:
    fleet = Fleet()
    fleet.put_relay(RelayState(4, 1, "r", "00" * 32, 1))
    direct, behind, idle = (ComputerState(i, 1, "00" * 32, 1) for i in (1, 2, 3))
    fleet.put(direct)
    fleet.put(behind, 4)  # speaks through relay 4 (as loaded)
    fleet.put(idle)
    direct.served_at = 100.0
    behind.served_at = 100.0  # not what counts: its relay's exchange does
    fleet.relays[4].served_at = 50.0
    assert fleet.served_since([direct, behind, idle], 90.0) == [direct]
    fleet.relays[4].served_at = 95.0
    assert fleet.served_since([direct, behind, idle], 90.0) == [direct, behind]
