"""Accounts activities: users and groups (SPEC 2.3).

Contract: see ``domain/actions/base.py``. Every type changes the system.
* Names (users and groups): POSIX portable names as Debian's ``useradd`` accepts
  by default: ``^[a-z_][a-z0-9_-]*[$]?$``, at most 32 characters (so never a
  leading ``-``, never a shell word). ``root`` is never a user an activity
  edits, deletes, locks or unlocks, nor a group it deletes or changes the
  members of; the agent refuses any account of uid 0 (and its own user) too.
* Paths (``home``, ``shell``): absolute, made of ``/``-separated components of
  ``[A-Za-z0-9._+@-]`` (no ``.``/``..`` component, no empty one, no ``:``, no
  control characters, no space), at most 256 characters.
* IDs: a regular account's uid or gid is in [1000, 60000] (Debian's
  ``UID_MIN``..``UID_MAX``), a system one's (``system: true``) in [100, 999].
* No password field: a payload is signed, not encrypted. Passwords and SSH keys
  are set by other means; lock and unlock manage access.
"""

from __future__ import annotations

import re
from typing import Any

from taskfleet.domain.actions.base import (
    ActionType,
    boolean,
    integer,
    matching,
    name_list,
    params_object,
    text,
)

USER_CREATE = "user-create"
USER_EDIT = "user-edit"
USER_DELETE = "user-delete"
USER_LOCK = "user-lock"
USER_UNLOCK = "user-unlock"
GROUP_CREATE = "group-create"
GROUP_DELETE = "group-delete"
GROUP_ADD_MEMBER = "group-add-member"
GROUP_REMOVE_MEMBER = "group-remove-member"

NAME_PATTERN = r"[a-z_][a-z0-9_-]*[$]?"
NAME = re.compile(NAME_PATTERN)
NAME_MAX = 32
# Accounts no activity changes: the superuser (the agent also refuses any uid 0).
PROTECTED = frozenset({"root"})
MAX_PATH = 256
_PATH = re.compile(r"(/[A-Za-z0-9._+@-]+)+")
ID_RANGE = (1000, 60000)  # a regular account's uid/gid (Debian's UID_MIN..UID_MAX)
SYSTEM_ID_RANGE = (100, 999)  # a system account's (SYS_UID_MIN..SYS_UID_MAX)

_NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": f"^{NAME_PATTERN}$",
    "maxLength": NAME_MAX,
    "description": "a POSIX portable user or group name",
}
_PATH_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": r"^(/[A-Za-z0-9._+@-]+)+$",
    "maxLength": MAX_PATH,
    "description": "an absolute path (no '.' or '..' component)",
}
_NAMES_SCHEMA: dict[str, Any] = {"type": "array", "items": _NAME_SCHEMA, "maxItems": 1000}
_FULL_NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "maxLength": 256,
    "description": "the GECOS field: no ':' ',' or control characters",
}
_ID_SCHEMA: dict[str, Any] = {
    "type": "integer",
    "minimum": SYSTEM_ID_RANGE[0],
    "maximum": ID_RANGE[1],
    "description": "1000..60000; 100..999 with system: true",
}


def account_name(raw: dict[str, Any], key: str, what: str = "user name") -> str:
    value = matching(raw, key, NAME, what)
    assert value is not None
    if len(value) > NAME_MAX:
        raise ValueError(f"{key}: a {what} has at most {NAME_MAX} characters")
    return value


def _not_protected(name: str, key: str) -> str:
    if name in PROTECTED:
        raise ValueError(f"{key}: {name!r} is never changed by an activity")
    return name


def _names(raw: dict[str, Any], key: str, what: str = "group name") -> list[str]:
    names = name_list(raw, key, NAME, what)
    for name in names:
        if len(name) > NAME_MAX:
            raise ValueError(f"{key}: a {what} has at most {NAME_MAX} characters")
    return names


def path(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_PATH or not _PATH.fullmatch(value):
        raise ValueError(
            f"{key} must be an absolute path of at most {MAX_PATH} characters: "
            "letters, digits and . _ + @ - between '/'"
        )
    if any(part in (".", "..") for part in value.split("/")):
        raise ValueError(f"{key} must not hold a '.' or '..' component")
    return value


def account_id(raw: dict[str, Any], key: str, system: bool) -> int | None:
    low, high = SYSTEM_ID_RANGE if system else ID_RANGE
    return integer(raw, key, minimum=low, maximum=high)


def validate_user_create(raw: Any) -> dict[str, Any]:
    p = params_object(
        raw,
        {
            "name", "full_name", "home", "shell", "uid", "primary_group", "groups",
            "system", "create_home",
        },
        frozenset({"name"}),
    )  # fmt: skip
    name = _not_protected(account_name(p, "name"), "name")
    system = boolean(p, "system", False)
    primary = p.get("primary_group")
    return {
        "name": name,
        "full_name": text(p, "full_name"),
        "home": path(p, "home"),
        "shell": path(p, "shell"),
        "uid": account_id(p, "uid", system),
        "primary_group": None
        if primary is None
        else account_name(p, "primary_group", "group name"),
        "groups": _names(p, "groups"),
        "system": system,
        "create_home": boolean(p, "create_home", True),
    }


_EDITS = ("full_name", "home", "shell", "primary_group", "groups", "add_groups", "remove_groups")


def validate_user_edit(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"name", "move_home", *_EDITS}, frozenset({"name"}))
    if not any(p.get(key) is not None for key in _EDITS):
        raise ValueError(f"nothing to change: give at least one of {', '.join(_EDITS)}")
    if p.get("groups") is not None and (
        p.get("add_groups") is not None or p.get("remove_groups") is not None
    ):
        raise ValueError("groups replaces the list: give it without add_groups or remove_groups")
    primary = p.get("primary_group")
    add = _names(p, "add_groups") if p.get("add_groups") is not None else []
    remove = _names(p, "remove_groups") if p.get("remove_groups") is not None else []
    both = set(add) & set(remove)
    out: dict[str, Any] = {
        "name": _not_protected(account_name(p, "name"), "name"),
        "full_name": text(p, "full_name"),
        "home": path(p, "home"),
        "move_home": boolean(p, "move_home", False),
        "shell": path(p, "shell"),
        "primary_group": None
        if primary is None
        else account_name(p, "primary_group", "group name"),
        "groups": None if p.get("groups") is None else _names(p, "groups"),
        "add_groups": add,
        "remove_groups": remove,
    }
    if out["move_home"] and out["home"] is None:
        raise ValueError("move_home needs home (the new home directory)")
    if both:
        raise ValueError(f"add_groups and remove_groups both name {', '.join(sorted(both))}")
    return out


def validate_user_delete(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"name", "remove_home"}, frozenset({"name"}))
    return {
        "name": _not_protected(account_name(p, "name"), "name"),
        "remove_home": boolean(p, "remove_home", False),
    }


def validate_user_name_only(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"name"}, frozenset({"name"}))
    return {"name": _not_protected(account_name(p, "name"), "name")}


def validate_group_create(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"name", "gid", "system"}, frozenset({"name"}))
    system = boolean(p, "system", False)
    return {
        "name": account_name(p, "name", "group name"),
        "gid": account_id(p, "gid", system),
        "system": system,
    }


def validate_group_delete(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"name"}, frozenset({"name"}))
    return {"name": _not_protected(account_name(p, "name", "group name"), "name")}


def validate_group_member(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"group", "user"}, frozenset({"group", "user"}))
    return {
        "group": _not_protected(account_name(p, "group", "group name"), "group"),
        "user": _not_protected(account_name(p, "user"), "user"),
    }


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }


_USER_NAME = {**_NAME_SCHEMA, "not": {"enum": sorted(PROTECTED)}}
_NAME_ONLY = _object({"name": _USER_NAME}, ["name"])

TYPES: tuple[ActionType, ...] = (
    ActionType(
        USER_CREATE,
        "Create user",
        validate_user_create,
        _object(
            {
                "name": _USER_NAME,
                "full_name": _FULL_NAME_SCHEMA,
                "home": _PATH_SCHEMA,
                "shell": _PATH_SCHEMA,
                "uid": _ID_SCHEMA,
                "primary_group": _NAME_SCHEMA,
                "groups": _NAMES_SCHEMA,
                "system": {"type": "boolean", "default": False},
                "create_home": {"type": "boolean", "default": True},
            },
            ["name"],
        ),
        default_timeout=120.0,
        description="create a user account (useradd); fails if it exists",
        tools=("useradd",),
    ),
    ActionType(
        USER_EDIT,
        "Edit user",
        validate_user_edit,
        _object(
            {
                "name": _USER_NAME,
                "full_name": _FULL_NAME_SCHEMA,
                "home": _PATH_SCHEMA,
                "move_home": {"type": "boolean", "default": False},
                "shell": _PATH_SCHEMA,
                "primary_group": _NAME_SCHEMA,
                "groups": {**_NAMES_SCHEMA, "description": "replaces the supplementary groups"},
                "add_groups": _NAMES_SCHEMA,
                "remove_groups": _NAMES_SCHEMA,
            },
            ["name"],
        ),
        default_timeout=300.0,
        description="change a user account (usermod)",
        tools=("usermod",),
    ),
    ActionType(
        USER_DELETE,
        "Delete user",
        validate_user_delete,
        _object(
            {"name": _USER_NAME, "remove_home": {"type": "boolean", "default": False}},
            ["name"],
        ),
        default_timeout=300.0,
        description="delete a user account (userdel), its home too if asked",
        tools=("userdel",),
    ),
    ActionType(
        USER_LOCK,
        "Lock user",
        validate_user_name_only,
        _NAME_ONLY,
        default_timeout=60.0,
        description="lock the password and expire the account: no login of any kind",
        tools=("usermod",),
    ),
    ActionType(
        USER_UNLOCK,
        "Unlock user",
        validate_user_name_only,
        _NAME_ONLY,
        default_timeout=60.0,
        description="unlock the password and clear the account's expiry",
        tools=("usermod",),
    ),
    ActionType(
        GROUP_CREATE,
        "Create group",
        validate_group_create,
        _object(
            {
                "name": _NAME_SCHEMA,
                "gid": _ID_SCHEMA,
                "system": {"type": "boolean", "default": False},
            },
            ["name"],
        ),
        default_timeout=60.0,
        description="create a group (groupadd); fails if it exists",
        tools=("groupadd",),
    ),
    ActionType(
        GROUP_DELETE,
        "Delete group",
        validate_group_delete,
        _object({"name": _USER_NAME}, ["name"]),
        default_timeout=60.0,
        description="delete a group (groupdel)",
        tools=("groupdel",),
    ),
    ActionType(
        GROUP_ADD_MEMBER,
        "Add group member",
        validate_group_member,
        _object({"group": _USER_NAME, "user": _USER_NAME}, ["group", "user"]),
        default_timeout=60.0,
        description="add a user to a group's members (gpasswd)",
        tools=("gpasswd",),
    ),
    ActionType(
        GROUP_REMOVE_MEMBER,
        "Remove group member",
        validate_group_member,
        _object({"group": _USER_NAME, "user": _USER_NAME}, ["group", "user"]),
        default_timeout=60.0,
        description="remove a user from a group's members (gpasswd)",
        tools=("gpasswd",),
    ),
)
