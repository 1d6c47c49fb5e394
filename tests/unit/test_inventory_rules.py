"""The inventory's pure rules: Debian version order, deltas, the message and targets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskfleet.domain import inventory as inv
from taskfleet.domain.targets import Target, TargetError, TargetKind, parse_target
from taskfleet.domain.versions import compare, satisfies, valid_version
from taskfleet.protocol.exchange import parse_agent_request, parse_server_reply
from taskfleet.protocol.inventory import (
    MAX_INVENTORY_BYTES,
    InventoryReport,
    inventory_message,
    parse_inventory,
)

# -- Debian versions: dpkg's own rules (deb-version(7), dpkg's test suite) ----------

ORDERED = [  # each sorts strictly before the next
    ("1.0~rc1", "1.0"),  # ~ before anything, even the end
    ("1.0~~", "1.0~~a"),
    ("1.0~~a", "1.0~"),
    ("1.0~", "1.0"),
    ("1.0", "1.0a"),  # the end before a letter
    ("1.0a", "1.0+"),  # letters before non-letters
    ("1.0+", "1.0.1"),
    ("1.2", "1.10"),  # digits numerically
    ("1.0-1", "1.0-2"),
    ("1.0-9", "1.0-10"),
    ("2.0", "1:0.1"),  # the epoch first
    ("3.0.11-1~deb12u2", "3.0.13-1~deb12u1"),
    ("3.0.13-1~deb12u1", "3.0.13-1"),
    ("1.0", "1.0-0.1"),
    ("0:1.0", "1.0-1"),
]
EQUAL = [("1.0", "1.0"), ("0:1.0", "1.0"), ("1.00", "1.0"), ("1.0-0", "1.0"), ("01", "1")]


@pytest.mark.parametrize(("a", "b"), ORDERED)
def test_version_order(a: str, b: str) -> None:
    assert compare(a, b) < 0 < compare(b, a)


@pytest.mark.parametrize(("a", "b"), EQUAL)
def test_version_equal(a: str, b: str) -> None:
    assert compare(a, b) == 0


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("1.0", True),
        ("1:2.3-4", True),
        ("3.0.13-1~deb12u1", True),
        ("2.36-9+deb12u4", True),
        ("1.0-1-1", True),  # upstream may hold - when there is a revision
        ("a1.0", False),  # upstream starts with a digit
        ("1.0 ", False),
        ("1:2:3", True),
        ("x:1.0", False),
        ("1.0;rm", False),
        ("--force", False),
        ("", False),
        ("1" * 300, False),
    ],
)
def test_version_syntax(version: str, ok: bool) -> None:
    assert valid_version(version) is ok


def test_satisfies() -> None:
    assert satisfies("3.0.11-1~deb12u2", "<", "3.0.13")
    assert satisfies("3.0.13-1~deb12u1", ">=", "3.0.13")  # a revision sorts after none
    assert not satisfies("3.0.13~rc1", ">=", "3.0.13")  # ~ sorts before the end
    assert satisfies("3.0.13", "=", "3.0.13-0")
    assert satisfies("3.0.13", "<=", "3.0.13") and satisfies("3.1", ">", "3.0.13")


# -- deltas ---------------------------------------------------------------------------

_key = st.text("abcxyz", min_size=1, max_size=3)
_entry = st.fixed_dictionaries({"version": st.sampled_from(["1", "2", "1:3"])})
_keyed = st.dictionaries(_key, _entry, max_size=6)
_small = st.one_of(st.none(), st.integers(0, 3), st.lists(st.integers(0, 3), max_size=3))


@st.composite
def snapshots(draw: Any) -> inv.Snapshot:
    snap: inv.Snapshot = {}
    for name in ("os", "disks", "missing"):
        value = draw(_small)
        if value is not None:
            snap[name] = value
    for name in ("packages", "upgrades", "users"):
        if draw(st.booleans()):
            snap[name] = draw(_keyed)
    return snap


@settings(max_examples=300)
@given(snapshots(), snapshots())
def test_apply_delta_gives_the_new_snapshot_and_is_idempotent(old: Any, new: Any) -> None:
    d = inv.delta(old, new)
    assert inv.apply(old, d) == new
    assert inv.apply(inv.apply(old, d), d) == new  # a resent delta changes nothing
    assert (d == {}) == (old == new)
    assert json.loads(json.dumps(d)) == d  # it travels as JSON


@settings(max_examples=300)
@given(snapshots(), snapshots(), snapshots())
def test_compose_is_one_delta_doing_both(a: Any, b: Any, c: Any) -> None:
    d1, d2 = inv.delta(a, b), inv.delta(b, c)
    assert inv.apply(a, inv.compose(d1, d2)) == c
    assert inv.apply(inv.apply(a, d1), d2) == c


def test_a_delta_carries_only_what_changed() -> None:
    old = {"packages": {f"p{i}:amd64": {"version": "1"} for i in range(1000)}, "os": {"id": "x"}}
    new = {**old, "packages": {**old["packages"], "new:amd64": {"version": "2"}}}
    del new["packages"]["p7:amd64"]
    assert inv.delta(old, new) == {
        "packages": {"set": {"new:amd64": {"version": "2"}}, "remove": ["p7:amd64"]}
    }
    assert inv.delta(old, {**old, "packages": {}}) == {
        "packages": {"set": {}, "remove": sorted(old["packages"])}
    }
    assert inv.delta({"upgrades": {}}, {}) == {"upgrades": None}  # known empty -> unknown
    assert inv.delta({}, {"upgrades": {}}) == {"upgrades": {"set": {}, "remove": []}}


# -- the wire message ------------------------------------------------------------------

D1, D2 = "a" * 32, "b" * 32


def msg(**kw: Any) -> dict[str, Any]:
    base = inventory_message(True, "", D1, {"os": {"id": "debian", "version_id": "12"}})
    return {**base, "seq": 1, **kw}


def test_a_good_message_parses() -> None:
    r = parse_inventory(msg())
    assert r == InventoryReport(1, True, "", D1, {"os": {"id": "debian", "version_id": "12"}})
    delta = {"packages": {"set": {"openssl:amd64": {"version": "3.0.13-1~deb12u1"}}, "remove": []}}
    r = parse_inventory(msg(full=False, base=D1, digest=D2, sections=delta))
    assert r.problem is None and r.sections == delta and r.base == D1
    req = parse_agent_request({"ack": 0, "messages": [msg()]})
    assert isinstance(req.messages[0], InventoryReport)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"full": "yes"}, "'full'"),
        ({"digest": "nope"}, "'digest'"),
        ({"full": False, "base": 5}, "'base'"),
        ({"sections": []}, "'sections'"),
        ({"sections": {"secrets": {}}}, "unknown section"),
        ({"sections": {"packages": {"x y:amd64": {"version": "1"}}}}, "NAME:ARCH"),
        ({"sections": {"packages": {"a:amd64": {"version": "1;rm -rf /"}}}}, "Debian version"),
        ({"sections": {"packages": {"a:amd64": {"version": 1}}}}, "Debian version"),
        ({"sections": {"users": {"root": "x"}}}, "must be an object"),
        ({"sections": {"os": {"id": "x" * 2000}}}, "limit"),
        ({"sections": {"os": {"n": float("inf")}}}, "finite"),
        ({"sections": {"os": {"n": 2**70}}}, "range"),
        ({"sections": {"os": [[[[["deep"]]]]]}}, "nests"),
        (
            {"sections": {"users": {f"u{i}": {"home": "h" * 1000} for i in range(1200)}}},
            "over 1048576 bytes",
        ),
    ],
)
def test_a_bad_message_is_a_problem_not_a_refused_exchange(change: Any, problem: str) -> None:
    r = parse_inventory(msg(**change))
    assert r.seq == 1 and r.problem is not None and problem in r.problem, r.problem
    assert r.sections == {}
    req = parse_agent_request({"ack": 0, "messages": [msg(**change)]})  # the rest goes on
    assert req.messages[0].seq == 1


def test_text_is_cleaned() -> None:
    r = parse_inventory(msg(sections={"os": {"pretty_name": "De\x00bian \ud800"}}))
    assert r.sections["os"]["pretty_name"] == "De\u2400bian \ufffd"


def test_the_size_limit_is_about_the_json_size() -> None:
    users = {f"u{i:05}": {"home": "/home/" + "h" * 80} for i in range(9000)}
    assert len(json.dumps(users)) < MAX_INVENTORY_BYTES
    assert parse_inventory(msg(sections={"users": users})).problem is None


def test_the_reply_asks_for_the_whole_inventory() -> None:
    assert parse_server_reply({"ack": 0, "inventory": "full"}).inventory == "full"
    assert parse_server_reply({"ack": 0}).inventory is None
    assert parse_server_reply({"ack": 0, "inventory": "later"}).inventory is None


# -- targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        ("package:openssl<3.0.13", Target(TargetKind.PACKAGE, "openssl", "3.0.13", op="<")),
        ("package:openssl", Target(TargetKind.PACKAGE, "openssl")),
        ("package:libc6>=2.36-9", Target(TargetKind.PACKAGE, "libc6", "2.36-9", op=">=")),
        ("package:g++ = 4:12.2.0-3", Target(TargetKind.PACKAGE, "g++", "4:12.2.0-3", op="=")),
        ("os:debian-12", Target(TargetKind.OS, "debian", "12")),
        ("os:ubuntu-22.04", Target(TargetKind.OS, "ubuntu", "22.04")),
        ("os:opensuse-leap-15.5", Target(TargetKind.OS, "opensuse-leap", "15.5")),
        ("os:debian", Target(TargetKind.OS, "debian")),
    ],
)
def test_inventory_targets_parse(spec: str, target: Target) -> None:
    assert parse_target(spec) == target
    assert parse_target(str(target)) == target


@pytest.mark.parametrize(
    "spec",
    [
        "package:",
        "package:Open;SSL",
        "package:openssl<",
        "package:openssl<x1",
        "package:a<<1",
        "package:openssl<1;rm",
        "os:",
        "os:Debian-12",
        "os:debian-12 13",
        "os:-12",
    ],
)
def test_bad_inventory_targets(spec: str) -> None:
    with pytest.raises(TargetError):
        parse_target(spec)
