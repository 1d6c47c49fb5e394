"""Accounts on the agent: users and groups with the system's own tools.

Contract (``domain/actions/accounts.py`` for the parameters): each handler reads the
managed system's ``ROOT/etc/passwd`` and ``ROOT/etc/group`` (``ROOT`` is
``ActionEnv.root``), refuses what it must never do, runs ``useradd``, ``usermod``,
``userdel``, ``groupadd``, ``groupdel`` or ``gpasswd`` as argv (``--root ROOT`` when
the managed system is not the agent's own; every value as ``--option=VALUE``, the
name after ``--``), reads the files again and says what changed.

Refused, nothing run: changing, deleting, locking or unlocking the agent's own user
or any account of uid 0 (deleting a group of gid 0, changing such a user's group
memberships); a user or group that does not exist; creating one that exists (Failed
"... already exists": the existing account may differ from the one asked for, and
an administrator must see that); ``remove_home`` of a home that is ``/``, a top-level
directory or shared with another account. Already as asked is Succeeded and says so
(a member already in the group, a user already locked, an edit that changes nothing).

Lock is ``usermod --lock --expiredate=1``: the password is disabled and the account
expired, so no login of any kind (an SSH key too). Unlock is ``usermod --unlock
--expiredate=``: it clears the expiry; a password that was never set stays unset
(the line says so). The lock state is read from ``ROOT/etc/shadow`` (never sent).
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from taskfleet.agent.actions.context import ActionContext, ActionEnv, ActionOutcome, AgentAction
from taskfleet.domain.actions.accounts import (
    GROUP_ADD_MEMBER,
    GROUP_CREATE,
    GROUP_DELETE,
    GROUP_REMOVE_MEMBER,
    USER_CREATE,
    USER_DELETE,
    USER_EDIT,
    USER_LOCK,
    USER_UNLOCK,
)

_TOOL_ENV = {"LC_ALL": "C"}  # the tools' messages, quoted in result lines, in English
_MAX_FILE = 16 * 1024 * 1024


class Refused(Exception):
    """The handler will not run the tool: its message is the result line."""


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    gecos: str
    home: str
    shell: str


@dataclass(frozen=True)
class Group:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class Accounts:
    users: dict[str, User]
    groups: dict[str, Group]

    def supplementary(self, user: str) -> list[str]:
        return sorted(g.name for g in self.groups.values() if user in g.members)

    def group_of(self, gid: int) -> str:
        return next((g.name for g in self.groups.values() if g.gid == gid), str(gid))


def _read(root: Path, rel: str) -> str:
    with open(root / rel, "rb") as f:
        data = f.read(_MAX_FILE + 1)
    if len(data) > _MAX_FILE:
        raise OSError(f"/{rel} is over {_MAX_FILE} bytes")
    return data.decode("utf-8", "replace")


def read_accounts(root: Path) -> Accounts:
    users: dict[str, User] = {}
    for line in _read(root, "etc/passwd").splitlines():
        parts = line.split(":")
        if len(parts) != 7 or not (parts[2].isdigit() and parts[3].isdigit()):
            continue
        name, _, uid, gid, gecos, home, shell = parts
        users.setdefault(name, User(name, int(uid), int(gid), gecos, home, shell))
    groups: dict[str, Group] = {}
    for line in _read(root, "etc/group").splitlines():
        parts = line.split(":")
        if len(parts) != 4 or not parts[2].isdigit():
            continue
        members = tuple(m for m in parts[3].split(",") if m)
        groups.setdefault(parts[0], Group(parts[0], int(parts[2]), members))
    return Accounts(users, groups)


def _shadow(root: Path, name: str) -> tuple[str, str] | None:
    """(password field, expiry field) of ``name`` in ROOT/etc/shadow, None if unknown."""
    try:
        text = _read(root, "etc/shadow")
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) == 9 and parts[0] == name:
            return parts[1], parts[7]
    return None


def _tool(ctx: ActionContext, name: str) -> list[str]:
    path = shutil.which(name)
    if path is None:
        raise Refused(f"{name} is not installed (not found in PATH)")
    argv = [path]
    if ctx.env.chrooted:
        argv += ["--root", str(ctx.env.root.resolve())]
    return argv


def _existing_user(ctx: ActionContext, acc: Accounts, name: str) -> User:
    """``name``'s account, if the agent may change it."""
    user = acc.users.get(name)
    if user is None:
        raise Refused(f"no user {name} on this computer")
    if name == ctx.env.own_user:
        raise Refused(f"{name} is the agent's own user: never changed by an activity")
    if user.uid == 0:
        raise Refused(f"{name} has uid 0: never changed by an activity")
    return user


def _existing_groups(acc: Accounts, names: list[str]) -> None:
    missing = [n for n in names if n not in acc.groups]
    if missing:
        raise Refused(f"no group {', '.join(missing)} on this computer")


def _groups_text(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


async def _change(ctx: ActionContext, argv: list[str]) -> ActionOutcome | None:
    """Run ``argv``; a failed outcome, or None when it succeeded."""
    ran = await ctx.run(argv, env=_TOOL_ENV)
    return None if ran.ok else ActionOutcome.failed(ran.why(), ran)


async def user_create(ctx: ActionContext) -> ActionOutcome:
    p = ctx.params
    name = p["name"]
    acc = read_accounts(ctx.env.root)
    if name in acc.users:
        return ActionOutcome.failed(
            f"user {name} already exists (uid {acc.users[name].uid}); nothing changed"
        )
    _existing_groups(acc, [*([p["primary_group"]] if p["primary_group"] else []), *p["groups"]])
    argv = _tool(ctx, "useradd")
    for option, key in (("comment", "full_name"), ("home-dir", "home"), ("shell", "shell")):
        if p[key] is not None:
            argv.append(f"--{option}={p[key]}")
    if p["uid"] is not None:
        argv.append(f"--uid={p['uid']}")
    if p["primary_group"] is not None:
        argv.append(f"--gid={p['primary_group']}")
    if p["groups"]:
        argv.append(f"--groups={','.join(p['groups'])}")
    if p["system"]:
        argv.append("--system")
    argv += ["--create-home" if p["create_home"] else "--no-create-home", "--", name]
    failed = await _change(ctx, argv)
    if failed:
        return failed
    after = read_accounts(ctx.env.root)
    user = after.users[name]
    groups = after.supplementary(name)
    extra = f", groups: {', '.join(groups)}" if groups else ""
    return ActionOutcome.succeeded(
        f"created user {name} (uid {user.uid}, primary group {after.group_of(user.gid)}{extra})"
    )


def _describe(before: User, after: User, acc_before: Accounts, acc_after: Accounts) -> list[str]:
    changes = []
    if before.gecos != after.gecos:
        changes.append(f"full name {after.gecos!r}")
    if before.home != after.home:
        changes.append(f"home {after.home}")
    if before.shell != after.shell:
        changes.append(f"shell {after.shell}")
    if before.gid != after.gid:
        changes.append(f"primary group {acc_after.group_of(after.gid)}")
    groups = acc_after.supplementary(after.name)
    if acc_before.supplementary(before.name) != groups:
        changes.append(f"groups: {_groups_text(groups)}")
    return changes


async def user_edit(ctx: ActionContext) -> ActionOutcome:
    p = ctx.params
    acc = read_accounts(ctx.env.root)
    user = _existing_user(ctx, acc, p["name"])
    current = acc.supplementary(user.name)
    if p["groups"] is not None:
        wanted = list(p["groups"])
    else:
        wanted = [g for g in current if g not in p["remove_groups"]]
        wanted += [g for g in p["add_groups"] if g not in wanted]
    _existing_groups(acc, [*([p["primary_group"]] if p["primary_group"] else []), *wanted])
    options = []
    if p["full_name"] is not None and p["full_name"] != user.gecos:
        options.append(f"--comment={p['full_name']}")
    if p["home"] is not None and p["home"] != user.home:
        options.append(f"--home={p['home']}")
        if p["move_home"]:
            options.append("--move-home")
    if p["shell"] is not None and p["shell"] != user.shell:
        options.append(f"--shell={p['shell']}")
    if p["primary_group"] is not None and acc.groups[p["primary_group"]].gid != user.gid:
        options.append(f"--gid={p['primary_group']}")
    if sorted(wanted) != current:
        options.append(f"--groups={','.join(wanted)}")
    if not options:
        return ActionOutcome.succeeded(f"user {user.name} unchanged: already as asked")
    failed = await _change(ctx, [*_tool(ctx, "usermod"), *options, "--", user.name])
    if failed:
        return failed
    after = read_accounts(ctx.env.root)
    changes = _describe(user, after.users[user.name], acc, after)
    return ActionOutcome.succeeded(f"edited user {user.name}: {'; '.join(changes) or 'no change'}")


async def user_delete(ctx: ActionContext) -> ActionOutcome:
    p = ctx.params
    acc = read_accounts(ctx.env.root)
    user = _existing_user(ctx, acc, p["name"])
    argv = _tool(ctx, "userdel")
    if p["remove_home"]:
        parts = [part for part in user.home.split("/") if part]
        if len(parts) < 2:
            raise Refused(f"{user.name}'s home {user.home} is not removed: not a user's own folder")
        shared = sorted(
            u.name for u in acc.users.values() if u.name != user.name and u.home == user.home
        )
        if shared:
            raise Refused(f"{user.name}'s home {user.home} is shared with {', '.join(shared)}")
        argv.append("--remove")
    failed = await _change(ctx, [*argv, "--", user.name])
    if failed:
        return failed
    home = f"home {user.home} removed" if p["remove_home"] else f"home {user.home} kept"
    return ActionOutcome.succeeded(f"deleted user {user.name} ({home})")


async def user_lock(ctx: ActionContext) -> ActionOutcome:
    acc = read_accounts(ctx.env.root)
    user = _existing_user(ctx, acc, ctx.params["name"])
    state = _shadow(ctx.env.root, user.name)
    if state is not None and state[0].startswith("!") and state[1] == "1":
        return ActionOutcome.succeeded(f"user {user.name} was already locked")
    argv = [*_tool(ctx, "usermod"), "--lock", "--expiredate=1", "--", user.name]
    failed = await _change(ctx, argv)
    return failed or ActionOutcome.succeeded(f"locked user {user.name}")


async def user_unlock(ctx: ActionContext) -> ActionOutcome:
    acc = read_accounts(ctx.env.root)
    user = _existing_user(ctx, acc, ctx.params["name"])
    state = _shadow(ctx.env.root, user.name)
    # A lone "!" is no password at all, not a locked one: usermod --unlock leaves it.
    if state is not None and not (state[0].startswith("!") and state[0] != "!") and not state[1]:
        return ActionOutcome.succeeded(f"user {user.name} was not locked")
    argv = [*_tool(ctx, "usermod"), "--unlock", "--expiredate=", "--", user.name]
    failed = await _change(ctx, argv)
    if failed:
        return failed
    after = _shadow(ctx.env.root, user.name)
    if after is not None and after[0] in ("", "!", "*", "!*"):
        return ActionOutcome.succeeded(
            f"unlocked user {user.name} (no password is set: password login stays off)"
        )
    return ActionOutcome.succeeded(f"unlocked user {user.name}")


async def group_create(ctx: ActionContext) -> ActionOutcome:
    p = ctx.params
    name = p["name"]
    acc = read_accounts(ctx.env.root)
    if name in acc.groups:
        return ActionOutcome.failed(
            f"group {name} already exists (gid {acc.groups[name].gid}); nothing changed"
        )
    argv = _tool(ctx, "groupadd")
    if p["gid"] is not None:
        argv.append(f"--gid={p['gid']}")
    if p["system"]:
        argv.append("--system")
    failed = await _change(ctx, [*argv, "--", name])
    if failed:
        return failed
    gid = read_accounts(ctx.env.root).groups[name].gid
    return ActionOutcome.succeeded(f"created group {name} (gid {gid})")


def _existing_group(acc: Accounts, name: str) -> Group:
    group = acc.groups.get(name)
    if group is None:
        raise Refused(f"no group {name} on this computer")
    if group.gid == 0:
        raise Refused(f"group {name} has gid 0: never changed by an activity")
    return group


async def group_delete(ctx: ActionContext) -> ActionOutcome:
    acc = read_accounts(ctx.env.root)
    group = _existing_group(acc, ctx.params["name"])
    failed = await _change(ctx, [*_tool(ctx, "groupdel"), "--", group.name])
    return failed or ActionOutcome.succeeded(f"deleted group {group.name}")


async def group_add_member(ctx: ActionContext) -> ActionOutcome:
    acc = read_accounts(ctx.env.root)
    group = _existing_group(acc, ctx.params["group"])
    user = _existing_user(ctx, acc, ctx.params["user"])
    if user.name in group.members:
        return ActionOutcome.succeeded(f"{user.name} was already in group {group.name}")
    argv = [*_tool(ctx, "gpasswd"), f"--add={user.name}", "--", group.name]
    failed = await _change(ctx, argv)
    return failed or ActionOutcome.succeeded(f"added {user.name} to group {group.name}")


async def group_remove_member(ctx: ActionContext) -> ActionOutcome:
    acc = read_accounts(ctx.env.root)
    group = _existing_group(acc, ctx.params["group"])
    user = _existing_user(ctx, acc, ctx.params["user"])
    if user.name not in group.members:
        if user.gid == group.gid:
            return ActionOutcome.failed(
                f"{group.name} is {user.name}'s primary group: change it with user-edit "
                "primary_group; nothing changed"
            )
        return ActionOutcome.succeeded(f"{user.name} was not in group {group.name}")
    argv = [*_tool(ctx, "gpasswd"), f"--delete={user.name}", "--", group.name]
    failed = await _change(ctx, argv)
    return failed or ActionOutcome.succeeded(f"removed {user.name} from group {group.name}")


def _refusing(
    run: Callable[[ActionContext], Awaitable[ActionOutcome]],
) -> Callable[[ActionContext], Awaitable[ActionOutcome]]:
    """``run`` with its refusals (and a managed system whose files it cannot read) as
    Failed outcomes that say why; nothing was run."""

    async def guarded(ctx: ActionContext) -> ActionOutcome:
        try:
            return await run(ctx)
        except Refused as exc:
            return ActionOutcome.failed(f"{exc}; nothing changed")
        except OSError as exc:
            return ActionOutcome.failed(f"cannot read the accounts: {exc}; nothing changed")

    return guarded


def _needs(tool: str) -> Callable[[ActionEnv], str | None]:
    def unsupported(env: ActionEnv) -> str | None:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (not found in PATH)"
        for rel in ("etc/passwd", "etc/group"):
            if not (env.root / rel).is_file():
                return f"{env.root / rel} not found"
        return None

    return unsupported


def _handler(run: Callable[[ActionContext], Awaitable[ActionOutcome]], tool: str) -> AgentAction:
    return AgentAction(_refusing(run), _needs(tool))


HANDLERS: dict[str, AgentAction] = {
    USER_CREATE: _handler(user_create, "useradd"),
    USER_EDIT: _handler(user_edit, "usermod"),
    USER_DELETE: _handler(user_delete, "userdel"),
    USER_LOCK: _handler(user_lock, "usermod"),
    USER_UNLOCK: _handler(user_unlock, "usermod"),
    GROUP_CREATE: _handler(group_create, "groupadd"),
    GROUP_DELETE: _handler(group_delete, "groupdel"),
    GROUP_ADD_MEMBER: _handler(group_add_member, "gpasswd"),
    GROUP_REMOVE_MEMBER: _handler(group_remove_member, "gpasswd"),
}

__all__ = ["HANDLERS", "Accounts", "read_accounts"]
