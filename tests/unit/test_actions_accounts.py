"""The accounts types' parameter schemas (domain/actions/accounts.py): what they accept,
normalised, and every class of bad input refused naming the field."""

from __future__ import annotations

import re
from typing import Any

import pytest

from taskfleet.domain.actions import ACTION_TYPES, FAMILIES, allowed_types, validate_action
from taskfleet.domain.actions.accounts import NAME_PATTERN, TYPES

ACCOUNT_TYPES = [
    "user-create", "user-edit", "user-delete", "user-lock", "user-unlock",
    "group-create", "group-delete", "group-add-member", "group-remove-member",
]  # fmt: skip

BAD_NAMES = [
    "-o",
    "--force",
    "-alice",
    "a;rm -rf",
    "$(x)",
    "`id`",
    "a b",
    "al ice",
    "Alice",
    "9lives",
    "élise",
    "\u0430lice",  # a Cyrillic a
    "a\nb",
    "alice\n",
    "a\x00",
    "a" * 33,
    "",
    "a$b",
    "a/b",
    "a:b",
    "a,b",
    "a.b",
    "..",
    "*",
]
WRONG_TYPES: list[Any] = [None, 1, 1.5, True, ["alice"], {"n": "alice"}]


def test_the_family_has_exactly_the_contract_s_types() -> None:
    assert [t.name for t in TYPES] == ACCOUNT_TYPES
    assert {f.name: [t.name for t in f.types] for f in FAMILIES}["accounts"] == ACCOUNT_TYPES
    assert set(ACCOUNT_TYPES) <= set(ACTION_TYPES)
    assert set(ACCOUNT_TYPES) <= set(allowed_types(["accounts"]))
    assert not set(ACCOUNT_TYPES) & set(allowed_types([]))  # they all change the system


def test_user_create_fills_every_field() -> None:
    assert validate_action("user-create", {"name": "alice"}) == {
        "name": "alice",
        "full_name": None,
        "home": None,
        "shell": None,
        "uid": None,
        "primary_group": None,
        "groups": [],
        "system": False,
        "create_home": True,
    }
    full = {
        "name": "svc_backup$",
        "full_name": "Backup service (nightly)",
        "home": "/srv/backup-2.d/home",
        "shell": "/usr/sbin/nologin",
        "uid": 999,
        "primary_group": "backup",
        "groups": ["disk", "_ssh", "disk"],
        "system": True,
        "create_home": False,
    }
    assert validate_action("user-create", full) == {**full, "groups": ["disk", "_ssh"]}
    assert validate_action("user-create", {"name": "a" * 32, "uid": 60000})["uid"] == 60000


@pytest.mark.parametrize("type_", ACCOUNT_TYPES)
@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_name_that_is_not_a_posix_portable_one_is_refused(type_: str, bad: str) -> None:
    key = "group" if type_.startswith("group-") and "member" in type_ else "name"
    params = _valid(type_) | {key: bad}
    with pytest.raises(ValueError, match=rf"{key}: .*(not a valid|at most 32)"):
        validate_action(type_, params)
    if "member" in type_:
        with pytest.raises(ValueError, match="user: "):
            validate_action(type_, _valid(type_) | {"user": bad})


@pytest.mark.parametrize("type_", ACCOUNT_TYPES)
@pytest.mark.parametrize("bad", WRONG_TYPES)
def test_a_name_of_another_json_type_is_refused(type_: str, bad: Any) -> None:
    key = "group" if "member" in type_ else "name"
    with pytest.raises(ValueError, match=f"{key}: "):
        validate_action(type_, _valid(type_) | {key: bad})


@pytest.mark.parametrize("type_", ACCOUNT_TYPES)
def test_unknown_or_missing_fields_and_a_non_object_are_refused(type_: str) -> None:
    with pytest.raises(ValueError, match=r"unknown parameter\(s\): password"):
        validate_action(type_, _valid(type_) | {"password": "$6$x"})
    with pytest.raises(ValueError, match=r"missing parameter\(s\)"):
        validate_action(type_, {})
    for raw in (["alice"], "alice", 3):
        with pytest.raises(ValueError, match="params must be an object"):
            validate_action(type_, raw)


@pytest.mark.parametrize(
    ("type_", "params"),
    [
        ("user-edit", {"name": "root", "shell": "/bin/sh"}),
        ("user-delete", {"name": "root"}),
        ("user-lock", {"name": "root"}),
        ("user-unlock", {"name": "root"}),
        ("user-create", {"name": "root"}),
        ("group-delete", {"name": "root"}),
        ("group-add-member", {"group": "root", "user": "alice"}),
        ("group-add-member", {"group": "docker", "user": "root"}),
        ("group-remove-member", {"group": "docker", "user": "root"}),
    ],
)
def test_root_is_never_changed(type_: str, params: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="'root' is never changed"):
        validate_action(type_, params)


@pytest.mark.parametrize("key", ["home", "shell"])
@pytest.mark.parametrize(
    "bad",
    [
        "relative/path",
        "/",
        "/home/../etc",
        "/home/./alice",
        "/home//alice",
        "/home/alice/",
        "/home/al ice",
        "/home/a:b",
        "/home/a,b",
        "/home/a\nb",
        "/home/a\tb",
        "/home/$(x)",
        "/home/a;b",
        "/bin/sh -c",
        "-/bin/sh",
        "/home/élise",
        "/" + "a" * 256,
        "",
        1,
        True,
        ["/bin/sh"],
    ],
)
def test_a_path_that_is_not_a_plain_absolute_one_is_refused(key: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=f"^{key} must"):
        validate_action("user-create", {"name": "alice", key: bad})
    with pytest.raises(ValueError, match=f"^{key} must"):
        validate_action("user-edit", {"name": "alice", key: bad})


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"uid": 999}, r"uid must be an integer in \[1000, 60000\]"),
        ({"uid": 60001}, r"uid must be an integer in \[1000, 60000\]"),
        ({"uid": 0}, r"uid must be an integer"),
        ({"uid": -1}, r"uid must be an integer"),
        ({"uid": 1000, "system": True}, r"uid must be an integer in \[100, 999\]"),
        ({"uid": True}, "uid must be an integer"),
        ({"uid": 1001.0}, "uid must be an integer"),
        ({"uid": "1001"}, "uid must be an integer"),
        ({"system": "yes"}, "system must be true or false"),
        ({"system": 1}, "system must be true or false"),
        ({"create_home": None}, "create_home must be true or false"),
        ({"create_home": 0}, "create_home must be true or false"),
        ({"full_name": "a:b"}, "full_name must not hold"),
        ({"full_name": "a,b"}, "full_name must not hold"),
        ({"full_name": "a\nb"}, "full_name must not hold"),
        ({"full_name": "a\x1bb"}, "full_name must not hold"),
        ({"full_name": "a" * 257}, "full_name must be a text"),
        ({"full_name": 5}, "full_name must be a text"),
        ({"groups": "sudo"}, "groups must be a list"),
        ({"groups": ["sudo", "-G"]}, "groups: '-G' is not a valid group name"),
        ({"groups": ["sudo,docker"]}, "is not a valid group name"),
        ({"groups": [1]}, "is not a valid group name"),
        ({"groups": ["a" * 33]}, "at most 32"),
        ({"groups": ["g"] * 1001}, "groups must be a list of at most 1000"),
        ({"primary_group": "--gid"}, "primary_group: '--gid' is not a valid group name"),
        ({"primary_group": 100}, "is not a valid group name"),
    ],
)
def test_user_create_refuses_each_bad_field(params: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        validate_action("user-create", {"name": "alice", **params})


def test_user_edit_changes_only_what_is_given() -> None:
    assert validate_action("user-edit", {"name": "alice", "add_groups": ["docker"]}) == {
        "name": "alice",
        "full_name": None,
        "home": None,
        "move_home": False,
        "shell": None,
        "primary_group": None,
        "groups": None,
        "add_groups": ["docker"],
        "remove_groups": [],
    }
    assert validate_action("user-edit", {"name": "alice", "groups": []})["groups"] == []
    moved = validate_action("user-edit", {"name": "alice", "home": "/srv/a", "move_home": True})
    assert moved["home"] == "/srv/a" and moved["move_home"] is True


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({}, "nothing to change"),
        ({"move_home": True}, "nothing to change"),
        ({"shell": None}, "nothing to change"),
        ({"shell": "/bin/sh", "move_home": True}, "move_home needs home"),
        ({"groups": ["a"], "add_groups": ["b"]}, "groups replaces the list"),
        ({"groups": [], "remove_groups": ["b"]}, "groups replaces the list"),
        ({"add_groups": ["a"], "remove_groups": ["a"]}, "both name a"),
        ({"add_groups": ["$(x)"]}, "add_groups: '\\$\\(x\\)' is not a valid group name"),
        ({"remove_groups": "sudo"}, "remove_groups must be a list"),
        ({"move_home": "true", "home": "/srv/a"}, "move_home must be true or false"),
        ({"uid": 1001}, r"unknown parameter\(s\): uid"),
        ({"new_name": "bob"}, r"unknown parameter\(s\): new_name"),
    ],
)
def test_user_edit_refuses_each_bad_field(params: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        validate_action("user-edit", {"name": "alice", **params})


def test_the_other_types_normalise_their_parameters() -> None:
    assert validate_action("user-delete", {"name": "alice"}) == {
        "name": "alice",
        "remove_home": False,
    }
    assert validate_action("user-lock", {"name": "alice"}) == {"name": "alice"}
    assert validate_action("user-unlock", {"name": "_alice$"}) == {"name": "_alice$"}
    assert validate_action("group-create", {"name": "docker"}) == {
        "name": "docker",
        "gid": None,
        "system": False,
    }
    assert validate_action("group-create", {"name": "d", "gid": 500, "system": True})["gid"] == 500
    assert validate_action("group-delete", {"name": "docker"}) == {"name": "docker"}
    member = {"group": "docker", "user": "alice"}
    assert validate_action("group-add-member", member) == member
    assert validate_action("group-remove-member", member) == member


@pytest.mark.parametrize(
    ("type_", "params", "says"),
    [
        ("user-delete", {"remove_home": "yes"}, "remove_home must be true or false"),
        ("user-delete", {"remove_home": 1}, "remove_home must be true or false"),
        ("group-create", {"gid": 999}, r"gid must be an integer in \[1000, 60000\]"),
        ("group-create", {"gid": 0, "system": True}, r"gid must be an integer in \[100, 999\]"),
        ("group-create", {"gid": False}, "gid must be an integer"),
        ("group-create", {"gid": 2**63}, "gid must be an integer"),
        ("group-add-member", {"members": ["a"]}, r"unknown parameter\(s\): members"),
    ],
)
def test_the_other_types_refuse_each_bad_field(
    type_: str, params: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        validate_action(type_, _valid(type_) | params)


def test_the_schemas_document_the_rules() -> None:
    for t in TYPES:
        assert t.schema["type"] == "object" and t.schema["additionalProperties"] is False
        assert "password" not in t.schema["properties"]
        assert t.tools, t.name
    name = ACTION_TYPES["user-create"].schema["properties"]["name"]
    assert name["pattern"] == f"^{NAME_PATTERN}$" and name["maxLength"] == 32
    assert name["not"] == {"enum": ["root"]}
    assert re.fullmatch(NAME_PATTERN, "alice") and not re.fullmatch(NAME_PATTERN, "-o")


def _valid(type_: str) -> dict[str, Any]:
    if type_ == "user-edit":
        return {"name": "alice", "shell": "/bin/bash"}
    if "member" in type_:
        return {"group": "docker", "user": "alice"}
    return {"name": "alice"}
