"""``taskfleet user`` and ``taskfleet unix-group``: accounts on the computers.

Contract: each command posts one typed activity (``domain/actions/accounts.py``;
docs/activity-types.md "Accounts") through ``cli/typed.py``: ``user
create|edit|delete|lock|unlock NAME`` and ``unix-group
create|delete|add-member|remove-member`` (``taskfleet group`` is computer groups).
Only the options given are sent; the server validates them.
"""

from __future__ import annotations

from typing import Any

import click

from taskfleet.cli.typed import submit, typed_options


def _given(**params: Any) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _list(value: str | None) -> list[str] | None:
    """``a,b`` as a list; ``""`` is the empty list."""
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


@click.group()
def user() -> None:
    """User accounts on the computers (typed activities: docs/activity-types.md)."""


@user.command("create")
@click.argument("name")
@click.option("--full-name", help="The full name (GECOS).")
@click.option("--home", help="Home directory [default: the system's, /home/NAME].")
@click.option("--shell", help="Login shell, an absolute path [default: the system's].")
@click.option("--uid", type=int, help="User ID: 1000..60000 (100..999 with --system).")
@click.option("--primary-group", help="Primary group [default: a new group NAME].")
@click.option("--groups", help="Supplementary groups, comma-separated.")
@click.option("--system", is_flag=True, help="A system account.")
@click.option(
    "--create-home/--no-create-home", default=True, show_default=True, help="Create the home."
)
@typed_options
def user_create(
    name: str,
    full_name: str | None,
    home: str | None,
    shell: str | None,
    uid: int | None,
    primary_group: str | None,
    groups: str | None,
    system: bool,
    create_home: bool,
    **common: Any,
) -> None:
    """Create user NAME (it must not exist). No password: set keys or passwords by other
    means."""
    params = _given(
        name=name,
        full_name=full_name,
        home=home,
        shell=shell,
        uid=uid,
        primary_group=primary_group,
        groups=_list(groups),
    )
    submit("user-create", {**params, "system": system, "create_home": create_home}, **common)


@user.command("edit")
@click.argument("name")
@click.option("--full-name", help="The full name (GECOS).")
@click.option("--home", help="New home directory.")
@click.option("--move-home", is_flag=True, help="Move the old home's content to --home.")
@click.option("--shell", help="Login shell, an absolute path.")
@click.option("--primary-group", help="Primary group.")
@click.option("--groups", help="Replace the supplementary groups (comma-separated; '' = none).")
@click.option("--add-group", multiple=True, help="Add to this supplementary group (repeatable).")
@click.option(
    "--remove-group", multiple=True, help="Remove from this supplementary group (repeatable)."
)
@typed_options
def user_edit(
    name: str,
    full_name: str | None,
    home: str | None,
    move_home: bool,
    shell: str | None,
    primary_group: str | None,
    groups: str | None,
    add_group: tuple[str, ...],
    remove_group: tuple[str, ...],
    **common: Any,
) -> None:
    """Change user NAME: only what is given changes."""
    params = _given(
        name=name,
        full_name=full_name,
        home=home,
        shell=shell,
        primary_group=primary_group,
        groups=_list(groups),
        add_groups=list(add_group) or None,
        remove_groups=list(remove_group) or None,
    )
    if move_home:
        params["move_home"] = True
    submit("user-edit", params, **common)


@user.command("delete")
@click.argument("name")
@click.option("--remove-home", is_flag=True, help="Remove the home directory and mail spool too.")
@typed_options
def user_delete(name: str, remove_home: bool, **common: Any) -> None:
    """Delete user NAME."""
    submit("user-delete", {"name": name, "remove_home": remove_home}, **common)


@user.command("lock")
@click.argument("name")
@typed_options
def user_lock(name: str, **common: Any) -> None:
    """Lock user NAME: password disabled and account expired (no login, SSH keys too)."""
    submit("user-lock", {"name": name}, **common)


@user.command("unlock")
@click.argument("name")
@typed_options
def user_unlock(name: str, **common: Any) -> None:
    """Unlock user NAME: password enabled again, account expiry cleared."""
    submit("user-unlock", {"name": name}, **common)


@click.group("unix-group")
def unix_group() -> None:
    """Groups of user accounts on the computers (not computer groups: taskfleet group)."""


@unix_group.command("create")
@click.argument("name")
@click.option("--gid", type=int, help="Group ID: 1000..60000 (100..999 with --system).")
@click.option("--system", is_flag=True, help="A system group.")
@typed_options
def unix_group_create(name: str, gid: int | None, system: bool, **common: Any) -> None:
    """Create group NAME (it must not exist)."""
    submit("group-create", {**_given(name=name, gid=gid), "system": system}, **common)


@unix_group.command("delete")
@click.argument("name")
@typed_options
def unix_group_delete(name: str, **common: Any) -> None:
    """Delete group NAME (not a user's primary group)."""
    submit("group-delete", {"name": name}, **common)


@unix_group.command("add-member")
@click.argument("group")
@click.argument("user")
@typed_options
def unix_group_add_member(group: str, user: str, **common: Any) -> None:
    """Add USER to GROUP's members."""
    submit("group-add-member", {"group": group, "user": user}, **common)


@unix_group.command("remove-member")
@click.argument("group")
@click.argument("user")
@typed_options
def unix_group_remove_member(group: str, user: str, **common: Any) -> None:
    """Remove USER from GROUP's members."""
    submit("group-remove-member", {"group": group, "user": user}, **common)
