"""``taskfleet tenant``, ``taskfleet account``, ``--tenant`` and ``login-link`` from the
command line, against a real server (docs/tenants.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.acceptance.test_cli import tf
from tests.conftest import Server


def tf_in(
    server: Server, *args: str, token: str | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TASKFLEET_SERVER": server.url,
        "TASKFLEET_TOKEN": token or server.admin_token,
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "taskfleet", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        input=stdin,
    )


def test_the_super_admin_creates_lists_disables_and_enables_tenants(server):
    out = tf(server, "tenant", "create", "acme")
    assert "created tenant acme" in out.stdout and "shown only once" in out.stdout
    token = out.stdout.split("first admin token: ")[1].split()[0]
    assert token.startswith("tfa_")
    rows = json.loads(tf(server, "tenant", "list", "--json").stdout)
    assert [(r["name"], r["disabled"]) for r in rows] == [("default", False), ("acme", False)]
    # Its admin token works in it, and only there; it manages no tenants.
    assert json.loads(tf(server, "group", "list", "--json", token=token).stdout) == []
    refused = tf(server, "tenant", "list", token=token, check=False)
    assert refused.returncode == 2 and "only the super-admin manages tenants" in refused.stderr
    # The super-admin mints a token in the tenant with --tenant.
    made = tf(
        server,
        "token",
        "create",
        "--tenant",
        "acme",
        "--name",
        "ops",
        "--role",
        "operator",
        "--json",
    )
    ops = json.loads(made.stdout)
    assert ops["role"] == "operator"
    names = [
        t["name"] for t in json.loads(tf(server, "token", "list", "--json", token=token).stdout)
    ]
    assert names == ["first-admin", "ops"]
    assert "ops" not in [
        t["name"] for t in json.loads(tf(server, "token", "list", "--json").stdout)
    ]
    assert "tenant acme disabled" in tf(server, "tenant", "disable", "acme").stdout
    refused = tf(server, "group", "list", token=token, check=False)
    assert refused.returncode == 2 and "disabled" in refused.stderr
    assert "tenant acme enabled" in tf(server, "tenant", "enable", "acme").stdout
    assert tf(server, "group", "list", token=token).returncode == 0
    # Bad input: a clear error, nothing changed.
    for name, words in [
        ("acme", "exists"),
        ("bad name", "letters, digits"),
        ("x" * 65, "at most 64"),
    ]:
        bad = tf(server, "tenant", "create", name, check=False)
        assert bad.returncode == 2 and words in bad.stderr, bad.stderr
    bad = tf(server, "tenant", "disable", "nope", check=False)
    assert bad.returncode == 2 and "no tenant 'nope'" in bad.stderr
    assert len(json.loads(tf(server, "tenant", "list", "--json").stdout)) == 2


def test_accounts_are_made_with_a_password_from_stdin_never_from_argv(server):
    tf(server, "tenant", "create", "acme")
    out = tf_in(
        server,
        "account",
        "create",
        "ann",
        "--tenant",
        "acme",
        "--role",
        "operator",
        "--password-stdin",
        stdin="a long enough password\n",
    )
    assert out.returncode == 0, out.stderr
    assert "created account ann (operator)" in out.stdout
    rows = json.loads(tf(server, "account", "list", "--tenant", "acme", "--json").stdout)
    assert [(r["name"], r["role"]) for r in rows] == [("ann", "operator")]
    assert json.loads(tf(server, "account", "list", "--json").stdout) == []  # default's
    # No --password option exists; no terminal and no --password-stdin: refused.
    bad = tf_in(server, "account", "create", "bob", "--role", "viewer", "--password", "x" * 20)
    assert bad.returncode == 2 and "No such option" in bad.stderr
    bad = tf_in(server, "account", "create", "bob", "--role", "viewer")
    assert bad.returncode == 2 and "--password-stdin" in bad.stderr
    short = tf_in(
        server, "account", "create", "bob", "--role", "viewer", "--password-stdin", stdin="short\n"
    )
    assert short.returncode == 2 and "too short" in short.stderr
    out = tf_in(
        server,
        "account",
        "password",
        "ann",
        "--tenant",
        "acme",
        "--password-stdin",
        stdin="another long password\n",
    )
    assert out.returncode == 0 and "password of account ann set" in out.stdout, out.stderr
    assert "disabled" in tf(server, "account", "disable", "ann", "--tenant", "acme").stdout
    # A tenant admin cannot reach another tenant's account (404 like a missing one).
    bad = tf(server, "account", "disable", "ann", check=False)
    assert bad.returncode == 2 and "no account 'ann'" in bad.stderr


def test_login_link_prints_a_one_time_url(server):
    out = tf(server, "login-link")
    url = out.stdout.strip()
    assert url.startswith(server.url + "/ui/login/link?code=")
