"""``taskfleet user`` and ``taskfleet unix-group`` (cli/accounts.py): each command posts
its typed activity with the parameters its options give, only those given, and each
such body is one the server's schema accepts."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from taskfleet.cli import root
from taskfleet.domain.actions import validate_action


@pytest.mark.parametrize(
    ("args", "type_", "params"),
    [
        (
            ["user", "create", "alice", "--full-name", "Alice A", "--home", "/srv/a",
             "--shell", "/bin/bash", "--uid", "1500", "--primary-group", "users",
             "--groups", "sudo, docker", "--no-create-home"],
            "user-create",
            {"name": "alice", "full_name": "Alice A", "home": "/srv/a", "shell": "/bin/bash",
             "uid": 1500, "primary_group": "users", "groups": ["sudo", "docker"],
             "system": False, "create_home": False},
        ),
        (["user", "create", "svc", "--system"], "user-create",
         {"name": "svc", "system": True, "create_home": True}),
        (
            ["user", "edit", "alice", "--shell", "/bin/zsh", "--add-group", "docker",
             "--add-group", "adm", "--remove-group", "sudo"],
            "user-edit",
            {"name": "alice", "shell": "/bin/zsh", "add_groups": ["docker", "adm"],
             "remove_groups": ["sudo"]},
        ),
        (["user", "edit", "alice", "--groups", "", "--home", "/srv/a", "--move-home"],
         "user-edit", {"name": "alice", "groups": [], "home": "/srv/a", "move_home": True}),
        (["user", "delete", "alice", "--remove-home"], "user-delete",
         {"name": "alice", "remove_home": True}),
        (["user", "delete", "alice"], "user-delete", {"name": "alice", "remove_home": False}),
        (["user", "lock", "alice"], "user-lock", {"name": "alice"}),
        (["user", "unlock", "alice"], "user-unlock", {"name": "alice"}),
        (["unix-group", "create", "docker", "--gid", "2000"], "group-create",
         {"name": "docker", "gid": 2000, "system": False}),
        (["unix-group", "delete", "docker"], "group-delete", {"name": "docker"}),
        (["unix-group", "add-member", "docker", "alice"], "group-add-member",
         {"group": "docker", "user": "alice"}),
        (["unix-group", "remove-member", "docker", "alice"], "group-remove-member",
         {"group": "docker", "user": "alice"}),
    ],
)  # fmt: skip
def test_each_command_posts_its_type_with_the_options_given(
    monkeypatch: pytest.MonkeyPatch, args: list[str], type_: str, params: dict[str, Any]
) -> None:
    sent: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    monkeypatch.setattr(
        "taskfleet.cli.accounts.submit", lambda t, p, **common: sent.append((t, p, common))
    )
    out = CliRunner().invoke(root, [*args, "--target", "computer:7", "--wait"])
    assert out.exit_code == 0, out.output
    ((sent_type, sent_params, common),) = sent
    assert (sent_type, sent_params) == (type_, params)
    assert common["target"] == "computer:7" and common["wait"] is True
    validate_action(sent_type, sent_params)  # the server would accept it
