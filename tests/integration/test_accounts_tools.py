"""The accounts handlers (agent/actions/accounts.py) run the real useradd, usermod,
userdel, groupadd, groupdel and gpasswd, through a real ActionContext and the process
executor, against a throw-away root (``--root``): the files they change, the result
lines, and what the agent refuses (nothing run, nothing changed). This machine's own
accounts files are checked unchanged at the end of the module."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskfleet.agent.actions.context import ActionContext, ActionEnv, ActionOutcome
from taskfleet.agent.actions.registry import capabilities, handler
from taskfleet.domain.actions import validate_action
from taskfleet.process import RunningScript, ScriptSpec, start_script
from tests.accounts_root import host_accounts, line_of, make_root

ACCOUNT_TYPES = [
    "user-create", "user-edit", "user-delete", "user-lock", "user-unlock",
    "group-create", "group-delete", "group-add-member", "group-remove-member",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _host_accounts_untouched() -> Iterator[None]:
    before = host_accounts()
    yield
    assert host_accounts() == before, "this machine's own /etc accounts files changed"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "system")


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for name in ("passwd", "group", "shadow", "gshadow"):
        h.update((root / "etc" / name).read_bytes())
    return h.hexdigest()


def _only_under(root: Path) -> Callable[[ScriptSpec], Awaitable[RunningScript]]:
    """The process executor, for commands that name the throw-away root only: a handler
    that lost its ``--root`` fails here instead of changing this machine's accounts."""

    async def start(spec: ScriptSpec) -> RunningScript:
        argv = spec.argv or []
        assert argv[1:3] == ["--root", str(root.resolve())], argv
        return await start_script(spec)

    return start


async def act(
    root: Path, type_: str, params: dict[str, Any], *, own_user: str = "agent", check: bool = True
) -> ActionOutcome:
    """Run ``type_`` as the agent does (validated parameters, unless ``check`` is off to
    reach the agent's own refusals past the schema's)."""
    env = ActionEnv(root=root, own_user=own_user, tmp_dir=root.parent)
    ctx = ActionContext(
        env,
        op=1,
        params=validate_action(type_, params) if check else params,
        timeout=60,
        start=_only_under(root),
    )
    return await _handler(type_).run(ctx)


async def test_create_a_user_in_groups(root: Path) -> None:
    out = await act(
        root,
        "user-create",
        {"name": "alice", "full_name": "Alice A", "shell": "/bin/bash", "groups": ["sudo"]},
    )
    assert (out.status, out.line) == (
        "succeeded",
        "created user alice (uid 1000, primary group alice, groups: sudo)",
    )
    assert line_of(root, "passwd", "alice") == "alice:x:1000:1000:Alice A:/home/alice:/bin/bash"
    assert line_of(root, "group", "sudo") == "sudo:x:27:alice"
    assert line_of(root, "group", "alice") == "alice:x:1000:"
    assert (root / "home/alice").is_dir() and (root / "home/alice").stat().st_uid == 1000
    assert line_of(root, "shadow", "alice") is not None

    out = await act(
        root,
        "user-create",
        {"name": "bob", "uid": 1500, "primary_group": "users", "create_home": False},
    )
    assert out.line == "created user bob (uid 1500, primary group users)"
    assert line_of(root, "passwd", "bob") == "bob:x:1500:100::/home/bob:/bin/sh"
    assert not (root / "home/bob").exists() and line_of(root, "group", "bob") is None

    out = await act(root, "user-create", {"name": "backup_d$", "system": True})
    assert out.status == "succeeded", out.line
    assert 100 <= int(line_of(root, "passwd", "backup_d$").split(":")[2]) <= 999


async def test_creating_a_user_that_exists_fails_and_changes_nothing(root: Path) -> None:
    await act(root, "user-create", {"name": "alice"})
    before = _digest(root)
    for params, says in [
        ({"name": "alice"}, "user alice already exists (uid 1000); nothing changed"),
        ({"name": "daemon", "shell": "/bin/sh"}, "user daemon already exists (uid 1)"),
        ({"name": "carol", "groups": ["sudo", "nope"]}, "no group nope on this computer"),
        ({"name": "carol", "primary_group": "nope"}, "no group nope on this computer"),
    ]:
        out = await act(root, "user-create", params)
        assert out.status == "failed" and says in out.line, out.line
    # useradd's own refusal, quoted.
    out = await act(root, "user-create", {"name": "carol", "uid": 1000})
    assert out.status == "failed"
    assert out.line == "useradd exited 4: useradd: UID 1000 is not unique", out.line
    assert _digest(root) == before and not (root / "home/carol").exists()


async def test_edit_a_user(root: Path) -> None:
    await act(root, "user-create", {"name": "alice", "groups": ["sudo"]})
    await act(root, "group-create", {"name": "docker"})
    (root / "srv").mkdir()
    out = await act(
        root,
        "user-edit",
        {
            "name": "alice",
            "full_name": "Alice B",
            "shell": "/bin/zsh",
            "home": "/srv/alice",
            "move_home": True,
            "add_groups": ["docker"],
            "remove_groups": ["sudo"],
        },
    )
    assert (out.status, out.line) == (
        "succeeded",
        "edited user alice: full name 'Alice B'; home /srv/alice; shell /bin/zsh; groups: docker",
    )
    assert line_of(root, "passwd", "alice") == "alice:x:1000:1000:Alice B:/srv/alice:/bin/zsh"
    assert line_of(root, "group", "sudo") == "sudo:x:27:"
    assert line_of(root, "group", "docker") == "docker:x:1001:alice"
    assert (root / "srv/alice").is_dir() and not (root / "home/alice").exists()

    out = await act(root, "user-edit", {"name": "alice", "groups": [], "primary_group": "users"})
    assert out.line == "edited user alice: primary group users; groups: none"
    assert line_of(root, "group", "docker") == "docker:x:1001:"

    before = _digest(root)
    out = await act(root, "user-edit", {"name": "alice", "shell": "/bin/zsh", "groups": []})
    assert (out.status, out.line) == ("succeeded", "user alice unchanged: already as asked")
    out = await act(root, "user-edit", {"name": "alice", "add_groups": ["nope"]})
    assert (out.status, out.line) == ("failed", "no group nope on this computer; nothing changed")
    assert _digest(root) == before


async def test_lock_and_unlock(root: Path) -> None:
    await act(root, "user-create", {"name": "alice"})
    out = await act(root, "user-lock", {"name": "alice"})
    assert (out.status, out.line) == ("succeeded", "locked user alice")
    fields = line_of(root, "shadow", "alice").split(":")
    assert fields[1].startswith("!") and fields[7] == "1"  # password off, account expired
    out = await act(root, "user-lock", {"name": "alice"})
    assert (out.status, out.line) == ("succeeded", "user alice was already locked")

    out = await act(root, "user-unlock", {"name": "alice"})
    assert out.status == "succeeded"
    assert out.line == "unlocked user alice (no password is set: password login stays off)"
    assert line_of(root, "shadow", "alice").split(":")[7] == ""
    out = await act(root, "user-unlock", {"name": "alice"})
    assert (out.status, out.line) == ("succeeded", "user alice was not locked")

    # A user with a password: it is kept behind the '!' and comes back on unlock.
    shadow = root / "etc/shadow"
    shadow.write_text(shadow.read_text().replace("alice:!:", "alice:$y$j9T$salt$hash:"))
    await act(root, "user-lock", {"name": "alice"})
    assert line_of(root, "shadow", "alice").split(":")[1] == "!$y$j9T$salt$hash"
    out = await act(root, "user-unlock", {"name": "alice"})
    assert (out.status, out.line) == ("succeeded", "unlocked user alice")
    assert line_of(root, "shadow", "alice").split(":")[1] == "$y$j9T$salt$hash"


async def test_delete_a_user(root: Path) -> None:
    await act(root, "user-create", {"name": "alice"})
    await act(root, "user-create", {"name": "bob"})
    (root / "home/alice/notes").write_text("x")
    out = await act(root, "user-delete", {"name": "alice", "remove_home": True})
    assert (out.status, out.line) == ("succeeded", "deleted user alice (home /home/alice removed)")
    assert line_of(root, "passwd", "alice") is None and line_of(root, "shadow", "alice") is None
    assert not (root / "home/alice").exists()
    out = await act(root, "user-delete", {"name": "bob"})
    assert (out.status, out.line) == ("succeeded", "deleted user bob (home /home/bob kept)")
    assert (root / "home/bob").is_dir() and line_of(root, "passwd", "bob") is None

    before = _digest(root)
    out = await act(root, "user-delete", {"name": "alice"})
    assert (out.status, out.line) == ("failed", "no user alice on this computer; nothing changed")
    assert _digest(root) == before


async def test_a_home_that_is_not_the_user_s_own_is_never_removed(root: Path) -> None:
    (root / "srv").mkdir()
    await act(root, "user-create", {"name": "alice", "home": "/home/shared"})
    await act(root, "user-create", {"name": "bob", "home": "/home/shared", "create_home": False})
    before = _digest(root)
    out = await act(root, "user-delete", {"name": "svc", "remove_home": True})
    assert out.status == "failed"
    assert out.line == "svc's home /srv is not removed: not a user's own folder; nothing changed"
    out = await act(root, "user-delete", {"name": "bob", "remove_home": True})
    assert out.line == "bob's home /home/shared is shared with alice; nothing changed"
    assert _digest(root) == before and (root / "srv").is_dir() and (root / "home/shared").is_dir()


@pytest.mark.parametrize(
    ("type_", "params"),
    [
        ("user-edit", {"name": "USER", "shell": "/bin/sh"}),
        ("user-delete", {"name": "USER", "remove_home": True}),
        ("user-lock", {"name": "USER"}),
        ("user-unlock", {"name": "USER"}),
        ("group-add-member", {"group": "sudo", "user": "USER"}),
        ("group-remove-member", {"group": "sudo", "user": "USER"}),
    ],
)
@pytest.mark.parametrize(
    ("user", "says"),
    [
        ("toor", "toor has uid 0: never changed by an activity; nothing changed"),
        ("agent", "agent is the agent's own user: never changed by an activity; nothing changed"),
        ("root", "root is the agent's own user: never changed by an activity; nothing changed"),
        ("ghost", "no user ghost on this computer; nothing changed"),
    ],
)
async def test_the_agent_refuses_its_own_user_a_uid_0_one_and_a_missing_one(
    root: Path, type_: str, params: dict[str, Any], user: str, says: str
) -> None:
    group = root / "etc/group"  # a member, so that a removal would change something
    group.write_text(group.read_text().replace("sudo:x:27:", f"sudo:x:27:{user}"))
    before = _digest(root)
    params = {k: (user if v == "USER" else v) for k, v in params.items()}
    own = "root" if user == "root" else "agent"
    out = await act(root, type_, params, own_user=own, check=False)
    assert (out.status, out.line) == ("failed", says)
    assert _digest(root) == before


async def test_groups_and_their_members(root: Path) -> None:
    await act(root, "user-create", {"name": "alice"})
    out = await act(root, "group-create", {"name": "docker", "gid": 2000})
    assert (out.status, out.line) == ("succeeded", "created group docker (gid 2000)")
    assert line_of(root, "group", "docker") == "docker:x:2000:"
    assert line_of(root, "gshadow", "docker") is not None
    out = await act(root, "group-create", {"name": "adm_x", "system": True})
    assert out.status == "succeeded" and out.line.startswith("created group adm_x (gid ")
    assert int(line_of(root, "group", "adm_x").split(":")[2]) < 1000

    out = await act(root, "group-add-member", {"group": "docker", "user": "alice"})
    assert (out.status, out.line) == ("succeeded", "added alice to group docker")
    assert line_of(root, "group", "docker") == "docker:x:2000:alice"
    assert line_of(root, "gshadow", "docker").endswith(":alice")
    out = await act(root, "group-add-member", {"group": "docker", "user": "alice"})
    assert (out.status, out.line) == ("succeeded", "alice was already in group docker")

    out = await act(root, "group-remove-member", {"group": "docker", "user": "alice"})
    assert (out.status, out.line) == ("succeeded", "removed alice from group docker")
    assert line_of(root, "group", "docker") == "docker:x:2000:"
    out = await act(root, "group-remove-member", {"group": "docker", "user": "alice"})
    assert (out.status, out.line) == ("succeeded", "alice was not in group docker")

    before = _digest(root)
    for type_, params, says in [
        ("group-remove-member", {"group": "alice", "user": "alice"}, "alice is alice's primary"),
        ("group-add-member", {"group": "nope", "user": "alice"}, "no group nope on this computer"),
        ("group-add-member", {"group": "docker", "user": "ghost"}, "no user ghost on this"),
        ("group-create", {"name": "docker"}, "group docker already exists (gid 2000)"),
        ("group-delete", {"name": "nope"}, "no group nope on this computer; nothing changed"),
        ("group-delete", {"name": "alice"}, "cannot remove the primary group of user 'alice'"),
    ]:
        out = await act(root, type_, params)
        assert out.status == "failed" and says in out.line, (type_, out.line)
    assert _digest(root) == before

    out = await act(root, "group-delete", {"name": "docker"})
    assert (out.status, out.line) == ("succeeded", "deleted group docker")
    assert line_of(root, "group", "docker") is None and line_of(root, "gshadow", "docker") is None


async def test_a_group_of_gid_0_is_never_deleted_nor_changed(root: Path) -> None:
    group = root / "etc/group"
    group.write_text(group.read_text() + "wheel:x:0:\n")
    before = _digest(root)
    for type_, params in [
        ("group-delete", {"name": "wheel"}),
        ("group-add-member", {"group": "wheel", "user": "svc"}),
        ("group-delete", {"name": "root"}),
    ]:
        out = await act(root, type_, params, check=False)
        assert out.status == "failed", out.line
        assert "has gid 0: never changed by an activity; nothing changed" in out.line
    assert _digest(root) == before


def test_unsupported_without_the_tool_or_the_accounts_files(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = ActionEnv(root=root)
    assert capabilities(env, ACCOUNT_TYPES) == (sorted(ACCOUNT_TYPES), {})
    empty = tmp_path / "empty"
    empty.mkdir()
    runs, cannot = capabilities(ActionEnv(root=empty), ACCOUNT_TYPES)
    assert runs == [] and cannot["user-lock"] == f"{empty}/etc/passwd not found"
    (root / "etc/group").unlink()
    assert capabilities(env, ["group-create"])[1] == {"group-create": f"{root}/etc/group not found"}
    monkeypatch.setenv("PATH", str(empty))
    runs, cannot = capabilities(ActionEnv(root=make_root(tmp_path / "r2")), ACCOUNT_TYPES)
    assert runs == []
    assert cannot["user-create"] == "useradd is not installed (not found in PATH)"
    assert cannot["group-add-member"] == "gpasswd is not installed (not found in PATH)"


class _Stop(Exception):
    pass


@pytest.mark.parametrize("chrooted", [True, False])
async def test_argv_with_root_only_for_a_managed_root_never_a_shell(
    root: Path, chrooted: bool
) -> None:
    seen: list[ScriptSpec] = []

    async def start(spec: ScriptSpec) -> Any:
        seen.append(spec)
        raise _Stop  # nothing runs: the machine's own system is never touched

    env = ActionEnv(root=root if chrooted else Path("/"), own_user="agent")
    name = f"tf-test-{os.getpid()}"  # a group this machine does not have
    params = validate_action("group-create", {"name": name, "gid": 1234})
    ctx = ActionContext(env, op=1, params=params, timeout=60, start=start)
    with pytest.raises(_Stop):
        await _handler("group-create").run(ctx)
    (spec,) = seen
    assert spec.script is None and spec.argv is not None
    root_args = ["--root", str(root.resolve())] if chrooted else []
    assert spec.argv[1:] == [*root_args, "--gid=1234", "--", name]
    assert spec.argv[0].endswith("/groupadd") and spec.env == {"LC_ALL": "C"}


def _handler(name: str) -> Any:
    found = handler(name)
    assert found is not None, name
    return found
